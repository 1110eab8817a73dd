"""Async scheduling: step N+1 is launched before step N's tokens reach the host, with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkiln.engine import LLMEngine, SamplingParams
from lmkiln.engine.model_runner import PendingStep
from lmkiln.engine.sequence import PENDING_TOKEN

PROMPTS = [
    list(range(3, 24)),
    [7, 8],
    list(range(40, 53)),
    [*range(3, 19), 200, 201],
    [5],
    [*range(3, 24), 99],
]


def _engine(path: Path, **kw) -> LLMEngine:
    """4-token blocks and small step budgets, so prompts are chunked and blocks fill often."""
    small = {
        "block_size": 4,
        "cache_max_entry_count": 64,
        "max_prefill_token_num": 8,
        "max_num_batched_tokens": 10,
    }
    return LLMEngine.from_pretrained(path, **{**small, **kw})


def _run(eng: LLMEngine, params: list[SamplingParams]) -> list[tuple]:
    outs = eng.generate(PROMPTS, params)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert all(PENDING_TOKEN not in o.token_ids for o in outs)
    return [(o.token_ids, o.finish_reason, o.text) for o in outs]


def _trace(eng: LLMEngine) -> list[tuple[str, int]]:
    """Log ("launch", k) / ("result", k) events of the engine's runner, k numbering the launched steps."""
    events: list[tuple[str, int]] = []
    launch = eng.runner.launch

    class Traced(PendingStep):
        def result(self):  # type: ignore[override]
            events.append(("result", self.k))
            return super().result()

    def traced(out, prev=None):
        p = launch(out, prev)
        t = Traced(p.seq_ids, p.tokens, p.logprobs, p.host, p.ready)
        t.k = sum(1 for e in events if e[0] == "launch")
        events.append(("launch", t.k))
        return t

    eng.runner.launch = traced  # type: ignore[method-assign]
    return events


@pytest.mark.parametrize("kw", [{}, {"enable_prefix_caching": True}, {"cache_max_entry_count": 12}])
def test_async_outputs_equal_sync(tmp_path, make_tiny_model, kw) -> None:
    """Greedy and seeded sampling, stop tokens hit mid-run, different lengths, a penalized request, prefix
    caching and preemption (12 blocks): the same tokens, texts and finish reasons with and without async."""
    varied_model = make_tiny_model(tmp_path / "tiny", "llama", initializer_range=0.3)  # greedy tokens vary
    greedy = [SamplingParams(temperature=0, max_tokens=9)] * len(PROMPTS)
    first = _run(_engine(varied_model, async_scheduling=False, **kw), greedy)[0][0]
    stop = first[3]  # request 0 stops at the first occurrence of its 4th token
    params = [
        SamplingParams(temperature=0, max_tokens=9, stop_token_ids=[stop]),
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=7, seed=5),
        SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.7, top_k=20, max_tokens=10, seed=11, stop_token_ids=[stop]),
    ]
    sync = _run(_engine(varied_model, async_scheduling=False, **kw), params)
    eng = _engine(varied_model, **kw)
    assert eng.async_scheduling
    assert _run(eng, params) == sync
    assert sync[0][1] == "stop" and sync[0][0] == first[: first.index(stop) + 1]


def test_steps_overlap_unless_a_penalty_needs_the_tokens(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir, max_prefill_token_num=64, max_num_batched_tokens=64)
    events = _trace(eng)
    same_length = [list(range(i, i + 9)) for i in (3, 30, 60, 90)]  # prefilled together, finish together
    eng.generate(same_length, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    order = {e: i for i, e in enumerate(events)}
    overlapped = [
        k
        for (kind, k) in events
        if kind == "launch" and ("result", k - 1) in order and order["launch", k] < order["result", k - 1]
    ]
    launches = sum(1 for e in events if e[0] == "launch")
    assert launches == 9 and overlapped == list(range(1, 8))  # not the first, nor the one after max_tokens

    eng = _engine(tiny_llama_dir)
    events = _trace(eng)
    eng.generate(
        PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.5, ignore_eos=True)
    )
    order = {e: i for i, e in enumerate(events)}
    assert all(order["result", k - 1] < order["launch", k] for (kind, k) in events if kind == "launch" and k)


def test_abort_while_a_step_is_in_flight(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    ids = [
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in PROMPTS[:3]
    ]
    seen: dict[str, list[int]] = {}
    for _ in range(6):
        for o in eng.step():
            seen[o.request_id] = o.token_ids
    victim = eng.scheduler.requests[ids[1]]
    assert victim.has_pending_token  # a step that samples for it is in flight
    assert eng.abort_request(ids[1])
    assert not victim.has_pending_token and PENDING_TOKEN not in victim.token_ids
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id != ids[1]
            seen[o.request_id] = o.token_ids
    assert len(seen[ids[0]]) == len(seen[ids[2]]) == 20
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert eng.step() == []
