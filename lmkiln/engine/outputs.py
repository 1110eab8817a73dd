"""The plain data passed between the scheduler, the model runner and the engine, once per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkiln.engine.sequence import Sequence


@dataclass
class ScheduledSequence:
    """Compute ``seq.token_ids[start : start + num_new_tokens]`` this step, then sample if ``sample``.

    ``sink``: the attention-sink entry the sequence reads its position 0 from (and writes, when this chunk
    starts at 0); -1 for none (see :mod:`lmkiln.engine.kv_sink`)."""

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool
    sink: int = -1

    @property
    def is_prefill(self) -> bool:
        return self.num_new_tokens > 1 or self.start < self.seq.num_prompt_tokens - 1


@dataclass
class SchedulerOutput:
    """One step's work, decided by the scheduler and carried out by the model runner.

    ``finished_seq_ids`` lists sequences that left since the previous step (finished, aborted), so the
    runner can drop per-request state such as random generators. ``preempted_seq_ids`` lists the ones
    preempted while scheduling this step (their KV blocks are gone; they will be recomputed).
    """

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    preempted_seq_ids: list[int] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def num_new_tokens(self, seq_id: int) -> int:
        """Tokens scheduled this step for one sequence (0 if not scheduled)."""
        return next((s.num_new_tokens for s in self.scheduled if s.seq.seq_id == seq_id), 0)


@dataclass
class Logprobs:
    """Log probabilities of one sampled token: its own and the ``top`` most likely tokens'."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class ModelRunnerOutput:
    """Sampled tokens of the scheduled sequences that sample this step, in schedule order."""

    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs | None] = field(default_factory=list)
