"""The synchronous engine: requests in, one scheduled step at a time, request outputs out.

An engine step is: ``scheduler.schedule()`` -> ``runner.execute()`` -> ``scheduler.update()`` -> detokenize,
match stop strings and build :class:`RequestOutput` s. New requests may be added and old ones aborted between
any two steps (continuous batching).

Async scheduling (``EngineConfig.async_scheduling``, the default on one rank; vLLM v1 does the same): step
N+1 is scheduled and launched while step N still runs on the device, and only then does the host wait for
step N's tokens, fill them in (``scheduler.commit``) and build N's outputs, so the GPU does not idle while
the host schedules, prepares inputs and detokenizes. Step N+1's decode inputs are step N's tokens, copied on
the device; the sequences carry a pending token meanwhile (``scheduler.advance``). A sequence that stops on
step N's token has one wasted row in step N+1, whose token is dropped. A step is not overlapped (the host
waits for the step in flight first) while a running sequence uses repetition/presence/frequency penalties
(the sampler reads its token history) or has reached its length limit. :meth:`LLMEngine.step` then returns
the outputs of the step before the one it launched.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkiln.engine.block_manager import BlockManager
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.detokenizer import IncrementalDetokenizer
from lmkiln.engine.errors import EngineConfigError, RequestError
from lmkiln.engine.loader import LoadedModel, load_model
from lmkiln.engine.model_runner import ModelRunner, PendingStep, plan_num_blocks
from lmkiln.engine.outputs import Logprobs, ModelRunnerOutput, SchedulerOutput
from lmkiln.engine.parallel import ParallelModelRunner, ShardBuilder
from lmkiln.engine.request_output import RequestOutput
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.engine.scheduler import Scheduler
from lmkiln.engine.sequence import Sequence, SequenceCounter, SequenceStatus

log = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages
# prompt lengths of the start-up warm-up: the top of each M range of the int4 GEMM tables (1, 2, 3-4, 5-8,
# ..., 257-512) and one above it, as Triton specialises integer arguments on == 1 and on divisibility by 16
WARMUP_TOKEN_COUNTS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)


def warmup_token_counts(limit: int) -> list[int]:
    """The warm-up's prompt lengths up to ``limit`` (the longest prefill chunk the engine can run): those of
    :data:`WARMUP_TOKEN_COUNTS` that fit, and ``limit`` itself (from 514 tokens on the int4 GEMMs take one
    path, dequantize + cuBLAS)."""
    if limit < 1:
        return []
    return sorted({n for n in WARMUP_TOKEN_COUNTS if n <= limit} | {limit})


@dataclass
class _Request:
    seq: Sequence
    prompt_token_ids: list[int]
    detok: IncrementalDetokenizer
    logprobs: list[Logprobs] | None
    sent_tokens: int = 0


def _eos_ids(model_dir: Path, tokenizer: Any, hf_config: Any) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(x: Any) -> None:
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, list | tuple):
            ids.update(i for i in x if isinstance(i, int))

    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", gen)
    if not ids:
        add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any = None,
        loaded: LoadedModel | None = None,
        shard_builder: ShardBuilder | None = None,
    ) -> None:
        """``loaded``: reuse a model already loaded from ``config.model_dir`` (weights are read-only).
        With ``config.tp > 1`` every rank loads its own shard instead (``shard_builder``: how; default from
        ``config.model_dir``, see :mod:`lmkiln.engine.parallel`); call :meth:`shutdown` when done."""
        self.config = config
        runner: ParallelModelRunner | None = None
        if config.tp > 1:
            if loaded is not None:
                raise EngineConfigError(
                    "with tp > 1 every rank loads its own shard: pass shard_builder, not loaded"
                )
            runner = ParallelModelRunner(config, shard_builder)  # starts ranks 1..tp-1; rank 0 is here
            loaded = runner.loaded
        elif loaded is None:
            loaded = load_model(config.model_dir, config.device, config.dtype, verify=config.verify_artifact)
        self.loaded = loaded
        self.model_config = loaded.config
        self.session_len = config.session_len or loaded.config.max_position_embeddings
        num_blocks = runner.num_blocks if runner else plan_num_blocks(config, loaded, self.session_len)
        max_num_seqs = config.max_num_seqs
        if num_blocks < max_num_seqs:
            log.info("the KV cache holds %d blocks: at most %d sequences run at once", num_blocks, num_blocks)
            max_num_seqs = num_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            self.session_len,
            max_num_seqs,
            config.max_num_batched_tokens or config.max_prefill_token_num,
            config.max_prefill_token_num,
            sink_entries=config.sink_entries,
        )
        self.runner = runner or ModelRunner(loaded, num_blocks, config)
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(Path(config.model_dir))
        self.eos_token_ids = _eos_ids(Path(config.model_dir), self.tokenizer, loaded.config.hf_config)
        self._requests: dict[str, _Request] = {}
        self._seq_ids = SequenceCounter()
        self.last_schedule: SchedulerOutput | None = None
        # async scheduling needs the runner's launch(); tensor-parallel steps run synchronously
        self.async_scheduling = config.async_scheduling and isinstance(self.runner, ModelRunner)
        self._inflight: tuple[SchedulerOutput, PendingStep] | None = None
        if config.warmup and loaded.device.type == "cuda":
            t0 = time.perf_counter()
            counts = self.warm_up()
            log.info("warm-up: prefilled prompts of %s tokens in %.2f s", counts, time.perf_counter() - t0)

    def warm_up(self, counts: Seq[int] | None = None) -> list[int]:
        """Prefill one dummy prompt of each length in ``counts`` (default: :func:`warmup_token_counts` up to
        the longest prefill chunk that fits the cache and the session) and decode one token after it, one
        prompt at a time, so that the kernels a request can meet are compiled (or loaded from Triton's disk
        cache) before the first request comes, as vLLM's and LMDeploy's start-up runs do. A cold start's first
        request paid up to 5 s of compiles without it (H100, notes/engine.md, session 11). Leaves no trace:
        the blocks are freed and the prefix cache is emptied. Returns the lengths it ran."""
        bs = self.config.block_size
        limit = min(
            self.config.max_prefill_token_num, self.session_len - 2, (self.block_manager.num_blocks - 1) * bs
        )
        counts = warmup_token_counts(limit) if counts is None else [n for n in counts if 1 <= n <= limit]
        if self.has_unfinished_requests():
            raise RequestError("warm_up runs on an idle engine; finish or abort the running requests first")
        rng = random.Random(self.config.seed)
        vocab = self.model_config.vocab_size
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for n in counts:
            self.generate([[rng.randrange(vocab) for _ in range(n)]], params)
        self.block_manager.reset_prefix_cache()
        return counts

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig(model_dir=model_dir, **kwargs))

    @staticmethod
    def _load_tokenizer(model_dir: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:  # transformers raises many types for a missing/odd tokenizer
            log.warning("no usable tokenizer in %s (%s): only token-id prompts, no text output", model_dir, e)
            return None

    # ----------------------------------------------------------------------------------------- prompts

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt: text, chat messages (through the chat template) or token ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestError("this model directory has no tokenizer: pass token ids instead of text")
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model has no chat template: pass a text prompt instead of messages")
            out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        raise RequestError(
            f"a prompt is text, a list of token ids or a list of chat messages, got {type(prompt)}"
        )

    # ---------------------------------------------------------------------------------------- requests

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. With ``session_id``, ``prompt`` is the *new* part of the
        conversation: it is appended to the session's earlier turns, whose KV cache is reused."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        ids = self.encode(prompt)
        if not ids and not (session_id and self.scheduler.sessions.history(session_id)):
            raise RequestError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        history = self.scheduler.sessions.history(session_id) if session_id is not None else []
        seq = Sequence(
            self._seq_ids(),
            request_id,
            ids,
            params,
            self.eos_token_ids,
            session_id,
            history,
        )
        self.scheduler.add(seq)
        detok = IncrementalDetokenizer(self.tokenizer, seq.token_ids, params)
        self._requests[request_id] = _Request(seq, ids, detok, [] if params.logprobs is not None else None)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; all its KV blocks are freed at once. False if unknown or finished."""
        self._requests.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def end_session(self, session_id: str) -> bool:
        """Abort the session's running turn (if any) and free the session's KV blocks."""
        s = self.scheduler.sessions.get(session_id)
        if s is not None and s.active_request is not None:
            self._requests.pop(s.active_request, None)
        return self.scheduler.end_session(session_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()  # a step in flight holds only running or finished sequences

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    # -------------------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs of the requests that got a token or finished (with async
        scheduling: launch one step, return the outputs of the one before)."""
        if not self.async_scheduling:
            sched = self.scheduler.schedule()
            self.last_schedule = sched
            result = self.runner.execute(sched)
            return self._outputs(sched, self.scheduler.update(sched, result), result)
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        if prev is not None and not self._can_overlap():
            outputs, prev = self._complete(*prev), None
        sched = self.scheduler.schedule()
        self.last_schedule = sched
        pending = self.runner.launch(sched, prev[1] if prev is not None else None)
        if prev is not None:
            outputs += self._complete(*prev)  # the host reads step N's tokens while step N + 1 runs
        self.scheduler.advance(sched)
        if not sched.is_empty:
            self._inflight = (sched, pending)
        return outputs

    def _can_overlap(self) -> bool:
        """Whether the next step may be scheduled before the step in flight returns its tokens."""
        for seq in self.scheduler.running:
            p = seq.params
            if p.has_penalties or seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.session_len:
                return False
        return True

    def _complete(self, sched: SchedulerOutput, pending: PendingStep) -> list[RequestOutput]:
        result = pending.result()
        return self._outputs(sched, self.scheduler.commit(sched, result), result)

    def _outputs(
        self, sched: SchedulerOutput, touched: list[Sequence], result: ModelRunnerOutput
    ) -> list[RequestOutput]:
        for seq_id, lp in zip(result.seq_ids, result.logprobs, strict=True):
            if lp is not None:
                seq = next(s.seq for s in sched.scheduled if s.seq.seq_id == seq_id)
                req = self._requests.get(seq.request_id)
                if req is not None and req.logprobs is not None:
                    req.logprobs.append(lp)
        outputs = []
        touched_ids = {s.seq_id for s in touched}
        for rid, req in list(self._requests.items()):
            seq = req.seq
            if seq.seq_id not in touched_ids and not seq.finished:
                continue
            new = seq.token_ids[seq.num_prompt_tokens + req.sent_tokens :]
            text_ids = new
            stopped_by_id = seq.status is SequenceStatus.FINISHED_STOPPED and new and new[-1] in seq.stop_ids
            if stopped_by_id and not seq.params.include_stop_str_in_output:
                text_ids = new[:-1]  # a stop token's text is not part of the output
            if text_ids and req.detok.add_tokens(text_ids) and not seq.finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            if seq.finished:
                req.detok.flush()
                del self._requests[rid]
            outputs.append(self._output(req, new))
        return outputs

    def _output(self, req: _Request, new: list[int]) -> RequestOutput:
        seq = req.seq
        req.sent_tokens += len(new)
        stop_reason: str | int | None = None
        if seq.status is SequenceStatus.FINISHED_STOPPED:
            stop_reason = req.detok.stop_matched if req.detok.stop_matched is not None else seq.last_token_id
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=req.detok.text,
            delta_token_ids=new,
            delta_text=req.detok.delta(seq.finished),
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=stop_reason,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            session_id=seq.session_id,
        )

    # ---------------------------------------------------------------------------------------- batch API

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and not isinstance(prompts[0], str | list)
        )
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        plist = list(params) if isinstance(params, list | tuple) else [params] * len(batch)
        if len(plist) != len(batch):
            raise RequestError(f"{len(batch)} prompts but {len(plist)} sampling parameter sets")
        ids = [self.add_request(p, sp) for p, sp in zip(batch, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    __call__ = generate

    # ---------------------------------------------------------------------------------------- lifetime

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do with one device). Also runs at exit."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
