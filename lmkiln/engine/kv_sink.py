"""Attention-sink entries of a quantized KV cache: which entry holds position 0 of which first token.

For a causal LM the K and V of position 0 depend on its token alone (it attends only to itself, and RoPE at
position 0 is the identity), so one exact copy per distinct first token serves every sequence that starts
with it, across prefix-cache hits and session turns. The tensors live beside the cache blocks
(``LayerKVCache.sink``); this table is the scheduler's CPU bookkeeping for them, like the block manager's for
blocks: a fixed number of entries, each with its token, a reference count (live sequences reading it), a
``ready`` flag (its tensors hold that token's K/V) and a place in an LRU order of unreferenced entries.

An entry's K/V are written by the forward pass of a sequence whose scheduled chunk starts at position 0.
Inside one forward every layer writes the step's K/V before any attention reads them, so that sequence (and
any other in the same step) can read the entry at once: it is marked ready when it is handed out. A sequence
whose position 0 is already cached (prefix hit, session history) and finds no ready entry gets none, and
reads its quantized position 0 instead (correct, only less exact).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from lmkiln.engine.errors import EngineConfigError

log = logging.getLogger(__name__)


@dataclass
class SinkEntry:
    token: int | None = None
    refs: int = 0
    ready: bool = False


class SinkTable:
    """``num_entries`` sink entries: :meth:`acquire` one for a sequence when it is scheduled, :meth:`release`
    it when the sequence finishes, is aborted or preempted. Unreferenced entries stay ready (a later sequence
    with the same first token reuses them) until the least recently used one is taken for another token."""

    def __init__(self, num_entries: int) -> None:
        if num_entries < 1:
            raise EngineConfigError(f"a sink table needs at least one entry, got {num_entries}")
        self.num_entries = num_entries
        self.entries = [SinkEntry() for _ in range(num_entries)]
        self._by_token: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # ready entries with no reference, LRU first
        self._free = list(range(num_entries - 1, -1, -1))  # never used (popped from the end: 0 first)
        self.num_hits = 0  # acquisitions served by a ready entry (statistics)
        self.num_misses = 0  # acquisitions that got no entry

    def check(self) -> None:
        """Raise if the entries, the token map and the LRU order disagree (used by tests)."""
        for slot, e in enumerate(self.entries):
            mapped = e.token is not None and self._by_token.get(e.token) == slot
            idle = slot in self._idle
            free = slot in self._free
            ok = (free and e.token is None and not e.refs and not idle) or (
                mapped and e.ready and idle == (e.refs == 0) and not free
            )
            if not ok:
                raise RuntimeError(f"sink entry {slot}: {e}, idle {idle}, free {free}, mapped {mapped}")

    @property
    def num_refs(self) -> int:
        """References held by live sequences (0 when no sequence holds an entry)."""
        return sum(e.refs for e in self.entries)

    def slot_of(self, token: int) -> int | None:
        """The entry assigned to ``token`` (ready or not), or None."""
        return self._by_token.get(token)

    def acquire(self, first_token: int, computes_position_0: bool) -> int:
        """An entry for a sequence starting with ``first_token``, or -1 (it reads its quantized position 0).

        ``computes_position_0``: the sequence's chunk in this step starts at position 0, so this step's
        forward writes the entry; otherwise its position 0 is already cached and only a ready entry helps."""
        slot = self._by_token.get(first_token)
        if slot is not None and self.entries[slot].ready:
            self.num_hits += 1
            return self._ref(slot)
        if not computes_position_0:
            self.num_misses += 1
            return -1
        if slot is None:
            slot = self._take()
            if slot is None:
                self.num_misses += 1
                return -1
            self.entries[slot].token = first_token
            self._by_token[first_token] = slot
        self.entries[slot].ready = True  # written by this step's forward before any layer reads it
        return self._ref(slot)

    def release(self, slot: int) -> None:
        """Drop one reference to ``slot`` (the entry stays ready for later sequences)."""
        entry = self.entries[slot]
        if entry.refs < 1:
            raise RuntimeError(f"sink entry {slot} released more often than acquired (engine bug)")
        entry.refs -= 1
        if entry.refs == 0:
            self._idle[slot] = None

    def _ref(self, slot: int) -> int:
        entry = self.entries[slot]
        entry.refs += 1
        self._idle.pop(slot, None)
        return slot

    def _take(self) -> int | None:
        """A never-used entry, else the least recently used unreferenced one (its token forgotten)."""
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        entry = self.entries[slot]
        log.debug("sink entry %d: token %s evicted", slot, entry.token)
        del self._by_token[entry.token]  # type: ignore[arg-type]
        entry.token, entry.ready = None, False
        return slot
