"""Block manager: allocation, reference counts, prefix caching, LRU eviction, no leaks."""

from __future__ import annotations

from lmkiln.engine.block_manager import BlockManager
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.engine.sequence import Sequence


def _seq(i: int, tokens: list[int]) -> Sequence:
    return Sequence(i, f"r{i}", tokens, SamplingParams())


def test_allocate_grows_and_free_returns_everything() -> None:
    bm = BlockManager(8, 4)
    s = _seq(0, list(range(10)))
    assert bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate(s, 2)  # 12 tokens: still 3 blocks
    assert len(s.block_table) == 3
    assert bm.allocate(s, 3)  # 13 tokens: a 4th block
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []
    bm.check()


def test_allocate_refuses_without_side_effects() -> None:
    bm = BlockManager(4, 4)
    a, b = _seq(0, list(range(12))), _seq(1, list(range(8)))
    assert bm.allocate(a, 12)
    assert not bm.allocate(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.free(a)
    assert bm.num_free_blocks == 4
    bm.check()


def test_prefix_blocks_are_shared_with_reference_counts() -> None:
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(11))
    a = _seq(0, prompt)
    assert bm.match_prefix(a) == []
    assert bm.allocate(a, 11)
    a.num_computed_tokens = 11
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 2  # tokens 0..7; the third block is partial
    b = _seq(1, [*prompt[:9], 99, 98])
    hit = bm.match_prefix(b)
    assert hit == a.block_table[:2]
    assert bm.allocate(b, 3, hit)
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.num_cached_blocks == 2  # freed but still cached
    assert bm.num_prefix_hits == 2
    bm.reset_prefix_cache()  # forgets the prefixes and their hit count
    assert bm.num_cached_blocks == 0 and bm.num_prefix_hits == 0
    assert bm.match_prefix(_seq(2, prompt)) == []
    bm.check()


def test_never_matches_the_last_token() -> None:
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = _seq(0, list(range(8)))
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    bm.free(a)
    same = _seq(1, list(range(8)))
    assert len(bm.match_prefix(same)) == 1  # the second block holds the last token: recomputed


def test_freed_cached_blocks_are_revived_or_evicted_lru() -> None:
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = _seq(0, [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    # a revived cached block counts against the free list
    b = _seq(1, [1, 2, 3, 4, 9])
    hit = bm.match_prefix(b)
    assert len(hit) == 2 and bm.allocate(b, 1, hit)
    assert bm.num_free_blocks == 1
    bm.free(b)
    # filling the cache evicts cached blocks (uncached ones go first)
    c = _seq(2, list(range(50, 58)))
    assert bm.allocate(c, 8)
    assert bm.num_cached_blocks == 0
    bm.free(c)
    assert bm.num_free_blocks == 4
    bm.check()


def test_hash_chain_distinguishes_prefixes() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=True)
    a = _seq(0, [1, 2, 3, 4, 0])
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    b = _seq(1, [9, 9, 3, 4, 0])  # same second block, different first
    assert bm.match_prefix(b) == []
