"""Continuous batching: which tokens of which sequences run in the next step (CPU bookkeeping only).

Every step has a token budget (``max_num_batched_tokens``; a decode costs one token) and a prompt budget
(``max_prefill_token_num``). Running sequences are served first (decodes, then unfinished prompt chunks),
then waiting ones join while the budgets, ``max_num_seqs`` and the free blocks allow; a prompt that does not
fit the budget is split into chunks and fused with other requests' decodes (dynamic split & fuse).

When a running sequence needs a block and none is free, memory is reclaimed in this order: idle sessions'
KV blocks, waiting sequences' blocks, then the most recently arrived running sequence is preempted (its
blocks are freed and it is recomputed later, prefix-cache hits included). A sequence that alone outgrows
the whole cache is finished with reason ``length``. Nothing here waits or raises on a full cache.

With ``sink_entries`` (quantized KV caches), a sequence takes an attention-sink entry for its first token
when it starts running (:class:`~lmkiln.engine.kv_sink.SinkTable`) and gives it back when it finishes, is
aborted or preempted.
"""

from __future__ import annotations

import logging
from collections import deque

from lmkiln.engine.block_manager import BlockManager
from lmkiln.engine.errors import RequestError
from lmkiln.engine.kv_sink import SinkTable
from lmkiln.engine.outputs import ModelRunnerOutput, ScheduledSequence, SchedulerOutput
from lmkiln.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from lmkiln.engine.session import SessionManager

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        session_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_prefill_token_num: int = 8192,
        sink_entries: int = 0,
    ) -> None:
        """``sink_entries``: attention-sink entries of the KV cache (``EngineConfig.sink_entries``), or 0."""
        self.block_manager = block_manager
        self.session_len = session_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_token_num = max_prefill_token_num
        self.sessions = SessionManager(block_manager)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._finished_ids: list[int] = []
        self.num_preemptions = 0
        self.sinks = SinkTable(sink_entries) if sink_entries > 0 else None

    # ----------------------------------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; refuse one that can never run (too long for the session or the cache)."""
        if seq.request_id in self.requests:
            raise RequestError(f"request id {seq.request_id!r} is already in use; pick a unique id")
        if seq.num_tokens >= self.session_len:
            where = f"session {seq.session_id!r} history + prompt" if seq.num_history_tokens else "prompt"
            raise RequestError(
                f"{where} has {seq.num_tokens} tokens but session_len is {self.session_len} "
                "(room for at least one generated token is needed); shorten the prompt, end the session, "
                "or raise --session-len"
            )
        bm = self.block_manager
        if bm.blocks_for(seq.num_tokens + 1) > bm.num_blocks:
            raise RequestError(
                f"request {seq.request_id!r} needs {bm.blocks_for(seq.num_tokens + 1)} KV blocks of "
                f"{bm.block_size} tokens but the whole cache has {bm.num_blocks}; raise "
                "--cache-max-entry-count or shorten the prompt"
            )
        self.sessions.attach(seq)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Finish a request now and free all its blocks; False if it is unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return True

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        if seq.finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = status
        if seq.has_pending_token:  # finished while a step sampling for it runs: that token is dropped
            seq.token_ids.pop()
        self._release_sink(seq)
        self.sessions.detach(seq)  # a session keeps a finished (not an aborted) turn's blocks
        self.block_manager.free(seq)
        self.requests.pop(seq.request_id, None)
        self._finished_ids.append(seq.seq_id)

    def end_session(self, session_id: str) -> bool:
        """Abort the session's running turn, if any, free its blocks and forget it."""
        s = self.sessions.get(session_id)
        if s is None:
            return False
        if s.active_request is not None:
            self.abort(s.active_request)
        self.sessions.end(session_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --------------------------------------------------------------------------------------- scheduling

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        chosen: dict[int, ScheduledSequence] = {}
        budget = self.max_num_batched_tokens
        prefill_budget = self.max_prefill_token_num

        decodes = [s for s in self.running if not s.is_prefill]
        prefills = [s for s in self.running if s.is_prefill]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if seq.is_prefill:
                n = min(n, prefill_budget)
            if n <= 0:
                continue
            preempted = len(out.preempted_seq_ids)
            ok = self._allocate_running(seq, n, chosen, out)
            if len(out.preempted_seq_ids) != preempted:  # preempted sequences give their tokens back
                budget = self.max_num_batched_tokens - sum(c.num_new_tokens for c in chosen.values())
                prefill_budget = self.max_prefill_token_num - sum(
                    c.num_new_tokens for c in chosen.values() if c.is_prefill
                )
            if not ok:
                continue
            start = seq.num_computed_tokens
            item = ScheduledSequence(seq, start, n, n == seq.num_uncomputed_tokens, seq.sink)
            chosen[seq.seq_id] = item
            budget -= n
            if item.is_prefill:
                prefill_budget -= n

        if not out.preempted_seq_ids:
            budget, prefill_budget = self._admit_waiting(chosen, budget, prefill_budget)

        out.scheduled = list(chosen.values())
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        out.num_prefill_tokens = sum(s.num_new_tokens for s in out.scheduled if s.is_prefill)
        return out

    def _allocate_running(
        self, seq: Sequence, n: int, chosen: dict[int, ScheduledSequence], out: SchedulerOutput
    ) -> bool:
        """Blocks for ``n`` more tokens of a running sequence, reclaiming memory if needed."""
        while not self.block_manager.allocate(seq, n):
            if self.sessions.evict_one():
                continue
            holder = next((w for w in reversed(self.waiting) if w.block_table), None)
            if holder is not None:
                self._release_waiting(holder)
                continue
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                log.warning(
                    "request %r needs more than the whole KV cache (%d blocks of %d tokens); "
                    "finishing it with reason 'length'",
                    seq.request_id,
                    self.block_manager.num_blocks,
                    self.block_manager.block_size,
                )
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)
                return False
            self._preempt(victim, chosen, out)
            if victim is seq:
                return False
        return True

    def _admit_waiting(
        self, chosen: dict[int, ScheduledSequence], budget: int, prefill_budget: int
    ) -> tuple[int, int]:
        bm = self.block_manager
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0 and prefill_budget > 0:
            seq = self.waiting[0]
            cached = bm.match_prefix(seq) if not seq.block_table else []
            num_computed = max(seq.num_computed_tokens, len(cached) * bm.block_size)
            n = seq.num_tokens - num_computed
            n = min(n, budget, prefill_budget) if n > 1 else n
            while not bm.allocate(seq, n, cached):
                if not self._reclaim_for_waiting(seq):
                    return budget, prefill_budget
                if seq.finished:
                    break
                cached = bm.match_prefix(seq) if not seq.block_table else []
                num_computed = max(seq.num_computed_tokens, len(cached) * bm.block_size)
                n = seq.num_tokens - num_computed
                n = min(n, budget, prefill_budget) if n > 1 else n
            if seq.finished:
                continue
            if seq.num_preemptions == 0 and num_computed > seq.num_computed_tokens:
                seq.num_cached_tokens = num_computed
            seq.num_computed_tokens = num_computed
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.sinks is not None:
                seq.sink = self.sinks.acquire(seq.token_ids[0], num_computed == 0)
            item = ScheduledSequence(seq, num_computed, n, num_computed + n == seq.num_tokens, seq.sink)
            chosen[seq.seq_id] = item
            budget -= n
            prefill_budget -= n
        return budget, prefill_budget

    def _reclaim_for_waiting(self, seq: Sequence) -> bool:
        """Free memory for the head of the queue; False if it should wait for running ones instead."""
        if self.sessions.evict_one():
            return True
        if self.running:
            return False  # they will finish or be preempted by each other; then it fits
        holder = next((w for w in reversed(self.waiting) if w.block_table and w is not seq), None)
        if holder is not None:
            self._release_waiting(holder)
            return True
        if seq.block_table:
            self._release_waiting(seq)
            return True
        log.warning(
            "request %r (%d tokens) cannot fit the whole KV cache (%d blocks of %d tokens); "
            "finishing it with reason 'length'",
            seq.request_id,
            seq.num_tokens,
            self.block_manager.num_blocks,
            self.block_manager.block_size,
        )
        self.finish(seq, SequenceStatus.FINISHED_LENGTH)
        return True

    def _preempt(self, seq: Sequence, chosen: dict[int, ScheduledSequence], out: SchedulerOutput) -> None:
        chosen.pop(seq.seq_id, None)
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._release_sink(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted_seq_ids.append(seq.seq_id)
        log.debug("KV cache full: preempted %r (%d tokens) for recompute", seq.request_id, seq.num_tokens)
        if self.num_preemptions == 1 or self.num_preemptions % 100 == 0:  # one line per 100, not thousands
            log.warning(
                "KV cache full: %d preemptions so far (requests recomputed); more KV blocks "
                "(--cache-max-entry-count, --quant-policy 8) or a lower --max-batch-size avoid them",
                self.num_preemptions,
            )

    def _release_sink(self, seq: Sequence) -> None:
        if seq.sink >= 0 and self.sinks is not None:
            self.sinks.release(seq.sink)
        seq.sink = -1

    def _release_waiting(self, seq: Sequence) -> None:
        """Free the blocks a waiting sequence holds (a session turn's history); it will recompute them."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0

    # ----------------------------------------------------------------------------------- after the step

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[Sequence]:
        """Advance the scheduled sequences by what ran; append sampled tokens; finish on stop/length.

        Returns the sequences that received a token (finished ones included). The same as
        :meth:`advance` then :meth:`commit`.
        """
        self.advance(out)
        return self.commit(out, result)

    def advance(self, out: SchedulerOutput) -> None:
        """A launched step's tokens count as computed; every sequence that samples gets a pending token.

        With async scheduling the engine calls this right after launching a step, before its sampled tokens
        reach the host, so the next step can be scheduled (the pending token is that step's decode input,
        read on the device); :meth:`commit` fills the values in.
        """
        for item in out.scheduled:
            seq = item.seq
            if seq.finished:
                continue
            seq.num_computed_tokens = item.start + item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if item.sample:
                seq.append_token(PENDING_TOKEN)

    def commit(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[Sequence]:
        """Fill in the sampled tokens of an advanced step; finish sequences on stop token / length.

        Sequences finished in between (aborted, or stopped by their previous token while this step ran)
        are skipped. Returns the sequences that received a token (finished ones included)."""
        sampled = dict(zip(result.seq_ids, result.token_ids, strict=True))
        touched: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            if not item.sample or seq.finished:
                continue
            token = sampled[seq.seq_id]
            seq.fill_pending(token)
            touched.append(seq)
            if token in seq.stop_ids and seq.num_output_tokens > seq.params.min_tokens:
                self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.session_len:
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)
        return touched
