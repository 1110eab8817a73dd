"""Interactive sessions: a conversation's KV blocks kept between turns.

A session holds the token ids of every finished turn and the blocks with their KV. A new turn's sequence
starts from that history and inherits the blocks, so it prefills only its new tokens. When the cache runs
short the scheduler evicts idle sessions' blocks (least recently used first) before it preempts anything;
an evicted session keeps its token history, so its next turn still works: it recomputes the history
(prefix-cache hits included).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from lmkiln.engine.block_manager import BlockManager
from lmkiln.engine.errors import RequestError
from lmkiln.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    active_request: str | None = None
    last_used: float = field(default_factory=time.monotonic)


class SessionManager:
    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self._sessions: dict[str, Session] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def history(self, session_id: str) -> list[int]:
        """Token ids of the session's finished turns (empty for a new session)."""
        s = self._sessions.get(session_id)
        return list(s.token_ids) if s else []

    @property
    def num_blocks_held(self) -> int:
        return sum(len(s.block_table) for s in self._sessions.values())

    def attach(self, seq: Sequence) -> None:
        """Start a turn: ``seq`` (built on :meth:`history`) takes over the session's KV blocks."""
        if seq.session_id is None:
            return
        s = self._sessions.setdefault(seq.session_id, Session(seq.session_id))
        if s.active_request is not None:
            raise RequestError(
                f"session {seq.session_id!r} is already running request {s.active_request!r}; "
                "wait for it to finish (or abort it) before sending the next turn"
            )
        if seq.token_ids[: len(s.token_ids)] != s.token_ids or seq.num_history_tokens != len(s.token_ids):
            raise RequestError(
                f"request {seq.request_id!r} was not built on session {seq.session_id!r}'s history"
            )
        s.active_request = seq.request_id
        s.last_used = time.monotonic()
        if s.block_table:
            seq.block_table, seq.block_hashes = s.block_table, s.block_hashes
            seq.num_computed_tokens = seq.num_cached_tokens = s.num_computed_tokens
            s.block_table, s.block_hashes, s.num_computed_tokens = [], [], 0

    def detach(self, seq: Sequence) -> None:
        """End a turn. A finished turn leaves its tokens and blocks to the session; an aborted one is
        dropped from the history (its blocks were freed by the scheduler)."""
        if seq.session_id is None:
            return
        s = self._sessions.get(seq.session_id)
        if s is None or s.active_request != seq.request_id:
            return  # the session was ended meanwhile
        s.active_request = None
        s.last_used = time.monotonic()
        if seq.status is SequenceStatus.FINISHED_ABORTED:
            return
        s.token_ids = list(seq.token_ids)
        s.num_computed_tokens = seq.num_computed_tokens
        s.block_table, s.block_hashes = seq.block_table, seq.block_hashes
        seq.block_table, seq.block_hashes = [], []

    def evict_one(self) -> bool:
        """Free the KV blocks of the least recently used idle session; False if none holds any."""
        idle = [s for s in self._sessions.values() if s.active_request is None and s.block_table]
        if not idle:
            return False
        s = min(idle, key=lambda x: x.last_used)
        log.info("evicting the KV cache of idle session %r (%d blocks)", s.session_id, len(s.block_table))
        self._release(s)
        return True

    def end(self, session_id: str) -> Session | None:
        """Forget a session and free its blocks (an active turn must be aborted by the caller first)."""
        s = self._sessions.pop(session_id, None)
        if s is not None:
            self._release(s)
        return s

    def _release(self, s: Session) -> None:
        self.block_manager.free_blocks(s.block_table)
        s.block_table, s.block_hashes, s.num_computed_tokens = [], [], 0
