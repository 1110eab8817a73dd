"""One request's tokens and bookkeeping (CPU only: no tensors here)."""

from __future__ import annotations

import enum
import itertools
import time

from lmkiln.engine.sampling_params import SamplingParams

PENDING_TOKEN = -1  # a sampled token still on the device (async scheduling); see Sequence.fill_pending


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # stop token id or stop string
    FINISHED_LENGTH = "length"  # max_tokens or session_len reached
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


class Sequence:
    """Token ids of one request (prompt, then generated) and where its KV cache lives.

    ``token_ids[:num_computed_tokens]`` have their K/V in the blocks of ``block_table``; the scheduler
    moves ``num_computed_tokens`` forward as steps run. For a session turn, ``token_ids`` starts with
    the session's history, whose KV blocks the sequence inherits, and ``num_prompt_tokens`` covers history
    and the new prompt. ``block_hashes[i]`` is the prefix-cache hash of full block ``i`` once computed.
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        session_id: str | None = None,
        history_token_ids: list[int] | None = None,
    ) -> None:
        history = list(history_token_ids or ())
        self.seq_id = seq_id
        self.request_id = request_id
        self.params = params
        self.session_id = session_id
        self.token_ids: list[int] = history + list(prompt_token_ids)
        self.num_history_tokens = len(history)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens not prefilled (prefix cache hits, session KV)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.sink = -1  # attention-sink entry held while running (lmkiln.engine.kv_sink), -1 for none
        self.status = SequenceStatus.WAITING
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens (or recomputed ones after preemption) remain to be computed."""
        return self.num_uncomputed_tokens > 1

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        """Append a sampled token, or :data:`PENDING_TOKEN` for one the device has not returned yet."""
        if self.first_token_time is None and token_id != PENDING_TOKEN:
            self.first_token_time = time.monotonic()
        self.token_ids.append(token_id)

    @property
    def has_pending_token(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PENDING_TOKEN

    def fill_pending(self, token_id: int) -> None:
        """The sampled value of the trailing :data:`PENDING_TOKEN`."""
        if not self.has_pending_token:
            raise RuntimeError(f"{self!r} has no pending token to fill (engine bug)")
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids[-1] = token_id

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)}, {self.status.value})"
        )


class SequenceCounter:
    """Hands out sequence ids (one per engine, so no module-level state)."""

    def __init__(self) -> None:
        self._it = itertools.count()

    def __call__(self) -> int:
        return next(self._it)
