"""Attention sinks of quantized KV caches: the SinkTable's bookkeeping (hits, misses, LRU eviction, no
leaks through the scheduler's finish / abort / preempt / sessions), the runner's per-step sink inputs, and
the engine on real models (position 0 kept exact brings int4 closer to the fp cache; the padded decode path
equals eager)."""

from __future__ import annotations

import pytest
import torch

from lmkiln.engine import EngineConfigError, LLMEngine, SamplingParams, load_model
from lmkiln.engine.attention import TorchAttentionBackend
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.kv_sink import SinkTable
from lmkiln.engine.outputs import ScheduledSequence, SchedulerOutput
from lmkiln.engine.sequence import Sequence, SequenceStatus

# ---------------------------------------------------------------------------------------------- SinkTable


def test_hit_miss_full_and_release() -> None:
    t = SinkTable(2)
    assert t.acquire(5, computes_position_0=True) == 0  # miss: assigned, written by this step
    assert t.acquire(5, computes_position_0=False) == 0  # hit: a cached position 0 reads the ready entry
    assert t.acquire(6, computes_position_0=False) == -1  # cached position 0, no entry: the quantized one
    assert t.acquire(6, computes_position_0=True) == 1
    assert t.acquire(7, computes_position_0=True) == -1  # full, every entry referenced
    assert [e.refs for e in t.entries] == [2, 1] and t.num_refs == 3
    t.release(0)
    t.release(0)
    assert t.entries[0].ready and t.slot_of(5) == 0  # an unreferenced entry stays ready
    assert t.acquire(5, computes_position_0=False) == 0
    assert (t.num_hits, t.num_misses) == (2, 2)
    for slot in (0, 1):
        t.release(slot)
    assert t.num_refs == 0
    t.check()
    with pytest.raises(RuntimeError, match="released more often"):
        t.release(1)


def test_eviction_takes_the_least_recently_released_unreferenced_entry() -> None:
    t = SinkTable(3)
    slots = {tok: t.acquire(tok, True) for tok in (1, 2, 3)}
    t.release(slots[2])
    t.release(slots[1])  # 3 stays referenced
    assert t.acquire(4, True) == slots[2] and t.slot_of(2) is None  # LRU: 2 was released first
    assert t.entries[slots[2]].refs == 1 and t.entries[slots[2]].token == 4
    assert t.acquire(2, computes_position_0=False) == -1  # its entry is gone; a cached position 0 can't help
    assert t.acquire(5, True) == slots[1] and t.slot_of(1) is None
    assert t.acquire(6, True) == -1  # 3, 4, 5 are all referenced
    t.check()


def test_sink_settings_are_validated() -> None:
    with pytest.raises(EngineConfigError, match="at least one entry"):
        SinkTable(0)
    for bad in (-1, True, 2.0):
        with pytest.raises(EngineConfigError, match="kv_sink_entries"):
            EngineConfig("unused", kv_sink_entries=bad)
    assert EngineConfig("unused", quant_policy=4).sink_entries == 64
    assert EngineConfig("unused", quant_policy=4, kv_sink_entries=0).sink_entries == 0
    assert EngineConfig("unused", quant_policy=0, kv_sink_entries=64).sink_entries == 0  # fp caches need none


# ------------------------------------------------------------------------------------- through the scheduler


def _sinks(out) -> dict[str, int]:
    return {i.seq.request_id: i.sink for i in out.scheduled}


def test_scheduler_hands_out_and_returns_sinks_under_preemption(make_scheduler) -> None:
    """Two entries for six first tokens, a cache small enough to preempt: every chunk carries its sequence's
    entry (the one of its first token), sequences beyond the table get -1, and no reference outlives its
    sequence (FakeStep checks the table after every step)."""
    fs = make_scheduler(num_blocks=12, prefix=True, sink_entries=2)
    seqs = [fs.add(list(range(i, i + 5 + 3 * i)), max_tokens=16) for i in range(6)]
    sinks = fs.scheduler.sinks
    given = set()
    while fs.scheduler.has_unfinished():
        for item in fs.step().scheduled:
            given.add(item.sink)
            if item.sink >= 0 and not item.seq.finished:
                assert item.sink == item.seq.sink and sinks.entries[item.sink].token == item.seq.token_ids[0]
    assert fs.scheduler.num_preemptions > 0 and all(s.finished and s.sink == -1 for s in seqs)
    assert given == {-1, 0, 1} and sinks.num_refs == 0 and sinks.num_misses > 0


def test_cached_position_0_reads_only_a_ready_entry(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=32, block_size=4, prefix=True, sink_entries=1)
    fs.add(list(range(13)), max_tokens=2, request_id="a")
    assert _sinks(fs.step()) == {"a": 0}
    fs.run()
    fs.add([*range(12), 99], max_tokens=2, request_id="hit")  # position 0 from the prefix cache: entry ready
    assert _sinks(fs.step()) == {"hit": 0}
    fs.run()
    fs.add([50, 51, 52], max_tokens=2, request_id="other")  # evicts token 0's entry (unreferenced)
    assert _sinks(fs.step()) == {"other": 0}
    fs.run()
    seq = fs.add([*range(12), 98], max_tokens=2, request_id="late")  # cached position 0, no ready entry
    assert _sinks(fs.step()) == {"late": -1} and seq.num_cached_tokens == 12
    fs.run()
    assert fs.scheduler.sinks.num_refs == 0


def test_abort_and_sessions_release_their_entries(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=16, block_size=4, sink_entries=4)
    fs.add(list(range(10)), max_tokens=30, request_id="run")
    fs.add(list(range(30, 52)), max_tokens=30, request_id="chunked")
    fs.step()
    fs.step()
    fs.add([7, 7], request_id="waiting")
    assert fs.scheduler.sinks.num_refs == 2
    for rid in ("run", "chunked", "waiting"):
        assert fs.scheduler.abort(rid)
    assert fs.scheduler.sinks.num_refs == 0
    # a session: turn 2 starts from the kept blocks (position 0 cached) and reads turn 1's ready entry
    fs.add([3, 4, 5], max_tokens=2, session_id="s", request_id="t1")
    assert _sinks(fs.step()) == {"t1": 2}
    fs.run()
    t2 = fs.add([6], max_tokens=20, session_id="s", request_id="t2")
    out = fs.step()
    assert _sinks(out) == {"t2": 2} and out.scheduled[0].start > 0
    fs.step()
    assert fs.scheduler.end_session("s")  # aborts the running turn
    assert t2.status is SequenceStatus.FINISHED_ABORTED and fs.scheduler.sinks.num_refs == 0
    fs.scheduler.sinks.check()


def test_the_engine_gives_its_scheduler_the_table(tiny_llama_dir) -> None:
    kw = dict(block_size=4, cache_max_entry_count=16, session_len=64)
    eng = LLMEngine.from_pretrained(tiny_llama_dir, quant_policy=4, kv_sink_entries=5, **kw)
    assert eng.scheduler.sinks.num_entries == eng.runner.kv_cache.sink_entries == 5
    fp = LLMEngine.from_pretrained(tiny_llama_dir, quant_policy=0, kv_sink_entries=5, **kw)
    assert fp.scheduler.sinks is None


# ------------------------------------------------------------------------------------------------ runner


def test_runner_builds_the_sink_inputs(tiny_llama_dir) -> None:
    kw = dict(block_size=4, cache_max_entry_count=16, session_len=64)
    eng = LLMEngine.from_pretrained(tiny_llama_dir, quant_policy=4, kv_sink_entries=3, **kw)
    runner = eng.runner
    assert runner.kv_cache[0].sink.shape == (3, 2, 2, 32) and runner.kv_cache.sink_entries == 3
    p = SamplingParams()
    a, b, c = (Sequence(i, f"r{i}", list(range(10 + i, 18)), p) for i in range(3))
    for s, blocks in ((a, [0, 1]), (b, [2, 3]), (c, [4])):
        s.block_table = blocks
    out = SchedulerOutput(
        [
            ScheduledSequence(a, 0, 3, False, 1),
            ScheduledSequence(b, 5, 1, True, 0),
            ScheduledSequence(c, 0, 2, True),
        ]
    )
    step = runner._collect(out)
    assert step.sink_idx == [1, 0, -1] and step.sink_slot == [1, -1, -1, -1, -1, -1]
    _, _, meta = runner._prepare(step)
    assert meta.sink_idx.dtype == torch.int32 and meta.sink_idx.tolist() == [1, 0, -1]
    assert meta.sink_slot.tolist() == step.sink_slot
    with pytest.raises(EngineConfigError, match="kv_sink_entries must match"):
        runner._collect(SchedulerOutput([ScheduledSequence(a, 0, 3, False, 3)]))
    fp = LLMEngine.from_pretrained(tiny_llama_dir, quant_policy=0, kv_sink_entries=3, **kw).runner
    assert (
        fp.kv_cache[0].sink is None
        and fp.kv_cache.nbytes() == fp.kv_cache.num_blocks * 4 * 2 * 2 * 2 * 32 * 4
    )
    step = fp._collect(SchedulerOutput([ScheduledSequence(a, 0, 3, False)]))
    assert step.sink_idx is None and fp._prepare(step)[2].sink_slot is None  # the fp path is untouched


# ------------------------------------------------------------------------------------------------ engine


class PadSkippingBackend(TorchAttentionBackend):
    """The reference backend with the CUDA-graph contract (slots < 0 are not written); records the sink
    slots written by decode-only steps."""

    def __init__(self) -> None:
        super().__init__()
        self.decode_sink_writes = 0
        ref = self._write_kv

        def write(k, v, kc, vc, slots, ksz, vsz, bits, off, sink=None, sink_slot=None):
            keep = slots >= 0
            ss = None if sink_slot is None else sink_slot[keep]
            ref(k[keep], v[keep], kc, vc, slots[keep], ksz, vsz, bits, off, sink, ss)

        self._write_kv = write

    def forward(self, q, k, v, cache, meta, scale, rope=None, pending=False):
        if meta.is_decode_only and meta.sink_slot is not None:
            self.decode_sink_writes += int((meta.sink_slot >= 0).sum())
        return super().forward(q, k, v, cache, meta, scale, rope)


def _run(eng, params, late) -> list:
    """Prompts 0-2 at once, then ``late`` (a one-token prompt) while they decode: its position 0 is written
    by a decode-only step."""
    ids = [eng.add_request(p, params) for p in ([3, *range(10, 30)], [7, 8], [3, 40, 41, 5])]
    final = {}
    for i in range(12):
        if i == 3:
            ids.append(eng.add_request(late, params))
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    return [final[i] for i in ids]


def test_padded_decode_path_with_sinks_matches_eager(tiny_llama_dir) -> None:
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    kw = dict(
        block_size=4,
        cache_max_entry_count=64,
        max_num_seqs=6,
        session_len=64,
        quant_policy=4,
        kv_sink_entries=4,
    )
    want = _run(LLMEngine.from_pretrained(tiny_llama_dir, **kw), p, [9])
    eng = LLMEngine.from_pretrained(tiny_llama_dir, **kw)
    runner = eng.runner
    runner.backend = PadSkippingBackend()
    runner.enable_decode_graphs(capture=False)
    got = _run(eng, p, [9])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want, strict=True):
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-5)
    assert runner.decode_graphs.sink_idx.shape == runner.decode_graphs.sink_slot.shape == (6,)
    assert runner.backend.decode_sink_writes == eng.model_config.num_layers  # the late prompt's position 0
    sinks = eng.scheduler.sinks
    assert sinks.num_hits == 1 and sinks.num_refs == 0  # the two prompts starting with 3 share one entry
    used = [s for s in range(4) if sinks.entries[s].ready]
    assert len(used) == 3 and all(runner.kv_cache[0].sink[s].abs().sum() > 0 for s in used)
    assert not runner.kv_cache[0].sink[3].any()


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir, "cpu", "float32")


def test_sinks_bring_int4_closer_to_the_fp_cache(smollm2_dir, smol, smollm2_tokenizer) -> None:
    """SmolLM2-135M: perplexity on 192 tokens of gensim's Wikipedia sample (chunks of 64 read the cache)
    through the scheduler's table. Chat prompts (all starting with <|im_start|>) share one entry; the fp cache
    ignores kv_sink_entries (same greedy tokens and logprobs with 64 or 0)."""
    from lmkiln.data.calib import eval_token_windows
    from lmkiln.data.texts import wiki_sample_text
    from lmkiln.eval.engine_ppl import engine_perplexity

    text = wiki_sample_text()  # in the gensim wheel: a fresh checkout has no prepared resources/text
    windows = eval_token_windows(smollm2_tokenizer, text, 192, 192, False)
    chats = [
        list(
            smollm2_tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for q in ("What is the capital of France?", "Hi")
    ]
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=1)
    ppl, outs = {}, {}
    for policy, entries in ((0, 64), (0, 0), (4, 0), (4, 64)):
        cfg = EngineConfig(
            smollm2_dir,
            block_size=16,
            cache_max_entry_count=48,
            quant_policy=policy,
            kv_sink_entries=entries,
            max_prefill_token_num=24,
            session_len=256,
        )
        eng = LLMEngine(cfg, loaded=smol)
        if (policy, entries) != (0, 0):
            ppl[policy, entries] = engine_perplexity(eng, windows, chunk=64)
        if policy == 0 or entries:
            outs[policy, entries] = [
                (o.token_ids, [x.logprob for x in o.logprobs]) for o in eng.generate(chats, params)
            ]
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    sinks = eng.scheduler.sinks
    assert sinks.num_hits == 1 and sinks.num_refs == 0 and eng.runner.kv_cache.sink_entries == 64
    assert all(len(t) == 2 for t, _ in outs[4, 64])
    assert outs[0, 64] == outs[0, 0]
    base = ppl[0, 64]  # 22.53; int4 23.46 (+4.1 %) without sinks, 23.06 (+2.4 %) with them
    assert ppl[4, 64] / base - 1 < 0.75 * (ppl[4, 0] / base - 1), ppl
