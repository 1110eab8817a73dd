"""Helpers for the engine tests: a scripted model step for scheduler tests and HF greedy references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmkiln.engine.block_manager import BlockManager
from lmkiln.engine.outputs import ModelRunnerOutput, SchedulerOutput
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.engine.scheduler import Scheduler
from lmkiln.engine.sequence import Sequence, SequenceCounter


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Engine tests run with one intra-op thread: decode-sized ops gain nothing from more, and on a busy
    2-core runner OpenMP threads spinning against other processes made the real-model tests 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FakeStep:
    """Drives a :class:`Scheduler` without a model: every sampled token is ``token_fn(seq)``."""

    def __init__(self, scheduler: Scheduler, token_fn: Callable[[Sequence], int] | None = None) -> None:
        self.scheduler = scheduler
        self.token_fn = token_fn or (lambda seq: 100 + seq.num_tokens)
        self.ids = SequenceCounter()
        self.history: list[SchedulerOutput] = []

    def add(self, prompt: list[int], max_tokens: int = 4, request_id: str | None = None, **kw) -> Sequence:
        session_id = kw.pop("session_id", None)
        history = self.scheduler.sessions.history(session_id) if session_id else []
        params = SamplingParams(max_tokens=max_tokens, temperature=0, **kw)
        sid = self.ids()
        seq = Sequence(sid, request_id or f"r{sid}", prompt, params, (), session_id, history)
        self.scheduler.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.history.append(out)
        # tokens a real runner could compute: every scheduled slot lies inside the block table
        bs = self.scheduler.block_manager.block_size
        for item in out.scheduled:
            if len(item.seq.block_table) * bs < item.start + item.num_new_tokens:
                raise AssertionError(f"{item.seq} scheduled past its blocks")
        sampled = [i.seq for i in out.scheduled if i.sample]
        result = ModelRunnerOutput(
            [s.seq_id for s in sampled], [self.token_fn(s) for s in sampled], [None] * len(sampled)
        )
        self.scheduler.update(out, result)
        self.scheduler.block_manager.check()
        sinks = self.scheduler.sinks
        if sinks is not None:  # every reference is held by a running sequence, and each of those holds one
            sinks.check()
            assert sinks.num_refs == sum(s.sink >= 0 for s in self.scheduler.running)
            assert all(s.sink == -1 for s in self.scheduler.waiting)
        return out

    def run(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.scheduler.has_unfinished():
            self.step()
            steps += 1
            if steps > max_steps:
                raise AssertionError("the scheduler did not finish (hang)")
        return steps


@pytest.fixture()
def make_scheduler() -> Callable[..., FakeStep]:
    def make(
        num_blocks: int = 32, block_size: int = 4, prefix: bool = False, session_len: int = 1000, **kw
    ) -> FakeStep:
        bm = BlockManager(num_blocks, block_size, prefix)
        return FakeStep(Scheduler(bm, session_len, **kw))

    return make


def _hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy references from transformers (one prompt at a time: no padding effects; eos included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)
            outs.append(ids[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """``hf_greedy(model_dir, prompts, max_new_tokens) -> output token ids`` per prompt."""
    return _hf_greedy


def run_to_completion(eng) -> dict:
    """Step ``eng`` until no request is left; the final output of each request by id."""
    final = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    return final


@pytest.fixture()
def drain():
    """:func:`run_to_completion`."""
    return run_to_completion


