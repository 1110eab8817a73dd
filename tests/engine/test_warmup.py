"""The start-up warm-up (``LLMEngine.warm_up``): which prompt lengths it runs, and that it leaves no trace."""

from __future__ import annotations

import pytest

from lmkiln.engine import LLMEngine, RequestError, SamplingParams
from lmkiln.engine.llm_engine import warmup_token_counts

PROMPTS = [list(range(3, 24)), [7, 8], [*range(3, 19), 200]]
GREEDY = SamplingParams(temperature=0, max_tokens=6)


def test_warmup_token_counts_cover_each_gemm_range_and_the_limit() -> None:
    assert warmup_token_counts(10) == [1, 2, 3, 4, 5, 8, 9, 10]
    full = warmup_token_counts(8192)
    assert full[-3:] == [512, 513, 8192] and 1024 not in full
    assert warmup_token_counts(513)[-1] == 513 and warmup_token_counts(0) == []


def _engine(path, **kw) -> LLMEngine:
    kw = {"block_size": 4, "cache_max_entry_count": 16, "max_prefill_token_num": 8, "session_len": 40, **kw}
    return LLMEngine.from_pretrained(path, **kw)


def test_warm_up_leaves_the_engine_as_it_found_it(tiny_llama_dir) -> None:
    want = _engine(tiny_llama_dir, enable_prefix_caching=True).generate(PROMPTS, GREEDY)
    eng = _engine(tiny_llama_dir, enable_prefix_caching=True)  # the CPU engine does not warm up by itself
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    # the longest prefill chunk (8 tokens) is the limit here (the session allows 38, the cache 60)
    assert eng.warm_up([1, 5, 30, 1000]) == [1, 5]
    assert eng.warm_up() == [1, 2, 3, 4, 5, 8]
    assert not eng.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_blocks == 0 and bm.num_prefix_hits == 0
    bm.check()
    got = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_warm_up_refuses_a_busy_engine(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    eng.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(RequestError, match="idle engine"):
        eng.warm_up([3])
