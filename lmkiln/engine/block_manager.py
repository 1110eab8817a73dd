"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts, one free list, prefix caching.

This is the only owner of the free list. A block is *free* when no sequence or session references it;
free blocks sit in an LRU queue. With prefix caching, a full block is registered under a hash of its
tokens chained with its predecessor's hash; when it is freed it keeps its contents and its hash (it stays
*cached*) until the LRU queue hands it out again, so a later request with the same prefix can reuse it.
Blocks that never held a cached prefix are handed out first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from lmkiln.engine.errors import EngineConfigError
from lmkiln.engine.sequence import Sequence

log = logging.getLogger(__name__)


class _Block:
    __slots__ = ("block_id", "hash", "ref_count", "tokens")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of a full block: its tokens chained with the hash of the block before it."""
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise EngineConfigError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_hits = 0  # blocks reused through the prefix cache (statistics)

    # ------------------------------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence or session references (cached ones included: they can be reused)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq`` (full blocks only, never its last token).

        At least one token is always left to compute, so the model produces logits for the next one.
        Reference counts are not touched: pass the result to :meth:`allocate`.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        bs = self.block_size
        out: list[int] = []
        parent = None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block_id = self._cached.get(h)
            if block_id is None or self._blocks[block_id].tokens != tokens:
                break
            out.append(block_id)
            parent = h
        return out

    # ------------------------------------------------------------------------------------------ updates

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: Iterable[int] = ()) -> bool:
        """Make ``seq.block_table`` cover its computed tokens plus ``num_new_tokens``.

        ``cached_blocks`` (from :meth:`match_prefix`, only for a sequence without blocks) become the head of
        the table. Returns False, changing nothing, if there are not enough free blocks.
        """
        cached = list(cached_blocks)
        if cached and seq.block_table:
            raise EngineConfigError("cached prefix blocks can only start an empty block table")
        num_computed = max(seq.num_computed_tokens, len(cached) * self.block_size)
        have = len(seq.block_table) + len(cached)
        need = max(self.blocks_for(num_computed + num_new_tokens) - have, 0)
        revived = sum(1 for b in cached if self._blocks[b].ref_count == 0)
        if need + revived > len(self._free):
            return False
        for block_id in cached:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.hash)  # type: ignore[arg-type]  # cached blocks have hashes
        self.num_prefix_hits += len(cached)
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:  # evict its cached contents
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = block.tokens = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full of computed tokens under their prefix hash."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self._blocks[seq.block_table[i]]
            if block.hash is None and h not in self._cached:
                block.hash, block.tokens = h, tokens
                self._cached[h] = block.block_id
            seq.block_hashes.append(h)
            parent = h

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (last block first, so a shared prefix stays cached longest)."""
        self.free_blocks(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def free_blocks(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated (engine bug)")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # nothing worth keeping: hand it out first
                    self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and the hits counted on it (blocks in use keep their contents)."""
        for block in self._blocks:
            block.hash = block.tokens = None
        self._cached.clear()
        self.num_prefix_hits = 0

    def check(self) -> None:
        """Raise if the reference counts and the free list disagree (used by tests)."""
        for block in self._blocks:
            in_free = block.block_id in self._free
            if block.ref_count < 0 or in_free != (block.ref_count == 0):
                raise RuntimeError(
                    f"block {block.block_id}: ref_count {block.ref_count}, in free list {in_free}"
                )
