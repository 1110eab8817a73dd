"""Runs one scheduled step on the device: builds the flattened batch, runs the model, samples.

This is the only part of the engine that touches tensors: it owns the model, the paged KV cache, the
attention backend and the sampler. It makes no scheduling decisions; it carries out a ``SchedulerOutput``.

Decode steps (one new token per sequence) run on CUDA from graphs captured once, after the KV cache is
allocated, at bucketed batch sizes (:func:`graph_batch_sizes`), largest first, in one memory pool (as vLLM
and nano-vllm do). A step is padded up to its bucket (:func:`pad_decode_inputs`): pad rows have slot -1 (the
KV write skips them) and ``seq_len`` 0 (attention reads nothing for them); block tables are padded to a
fixed ``max_blocks = ceil(session_len / block_size)`` columns and ``max_seq_len`` is
``max_blocks * block_size``. Prefill and mixed steps, and ``EngineConfig.eager`` (the oracle), run eagerly.
Logits and sampling stay outside the graphs.

With async scheduling a decode input may be a token the previous step sampled but the host has not read
(:data:`~lmkiln.engine.sequence.PENDING_TOKEN`): :meth:`ModelRunner.launch` takes that step's
:class:`PendingStep` and copies those tokens on the device, so the host never waits for the GPU in between.

A quantized cache with attention sinks (``EngineConfig.sink_entries``) gets two more inputs a step: each
sequence's sink entry (``sink_idx``, read for its key position 0) and, per token, the entry its exact K/V is
written to (``sink_slot``: set only for position 0 of a sequence with an entry). Pad rows have -1 for both.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from lmkiln.engine.attention import AttentionMetadata, make_attention_backend
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import CacheMemoryError, EngineConfigError
from lmkiln.engine.kv_cache import KVCache
from lmkiln.engine.loader import GIB, LoadedModel
from lmkiln.engine.outputs import Logprobs, ModelRunnerOutput, SchedulerOutput
from lmkiln.engine.sampler import Sampler
from lmkiln.engine.sequence import PENDING_TOKEN
from lmkiln.engine.transfer import StagedCopy, to_device
from lmkiln.models.llama import use_fused_ops

log = logging.getLogger(__name__)
# 0: a decode step's input copies and its tokens' copy to the host on the compute stream (an A/B switch)
SIDE_COPIES_ENV = "LMKILN_SIDE_COPIES"


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_num_blocks(config: EngineConfig, loaded: LoadedModel, session_len: int) -> int:
    """KV blocks to allocate: ``cache_max_entry_count`` as a block count, or as a fraction of free memory
    (then never more than ``max_num_seqs`` full-length sessions can use)."""
    cfg = loaded.config
    per_block = KVCache.bytes_per_block(
        cfg.num_layers, config.block_size, cfg.num_kv_heads, cfg.head_dim, loaded.dtype, config.quant_policy
    )
    sinks = KVCache.sink_bytes(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, loaded.dtype, config.quant_policy, config.sink_entries
    )
    entry = config.cache_max_entry_count
    if isinstance(entry, int):
        return entry
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        num = max(0, int(free * entry) - sinks) // per_block
        if num < config.max_num_seqs:
            raise CacheMemoryError(
                f"not enough GPU memory for the KV cache: {loaded.device} has {free / GIB:.2f} GiB free of "
                f"{total / GIB:.2f} GiB after {loaded.weight_bytes / GIB:.2f} GiB of weights; "
                f"cache_max_entry_count={entry} gives {num} blocks of {per_block / (1 << 20):.1f} MiB "
                f"({config.block_size} tokens) but max_num_seqs={config.max_num_seqs} sequences need one "
                "block each; lower --max-batch-size, raise --cache-max-entry-count, use --quant-policy 8/4 "
                "or a smaller model"
            )
        return min(num, _useful_blocks(config, session_len))
    budget = min(config.cpu_cache_bytes, _host_available_bytes())
    num = max(0, int(budget * entry) - sinks) // per_block
    if num < 1:
        raise CacheMemoryError(
            f"not enough host memory for one KV block: a block of {config.block_size} tokens takes "
            f"{per_block / (1 << 20):.1f} MiB, the budget is {budget * entry / (1 << 20):.1f} MiB "
            f"(cpu_cache_bytes={config.cpu_cache_bytes}, x cache_max_entry_count={entry}); raise them or "
            "pass a block count"
        )
    return min(num, _useful_blocks(config, session_len))


def _useful_blocks(config: EngineConfig, session_len: int) -> int:
    return config.max_num_seqs * -(-session_len // config.block_size)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes decode graphs are captured at: 1, 2, 4, 8, 16, 24, 32, ... below ``max_num_seqs``, then
    ``max_num_seqs`` itself."""
    if max_num_seqs < 1:
        raise EngineConfigError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8)
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


def pick_bucket(sizes: list[int], n: int) -> int | None:
    """The smallest captured size that holds ``n`` sequences (``sizes`` ascending), or None."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if n >= 1 and i < len(sizes) else None


@dataclass
class StepInputs:
    """One step's flattened batch as host lists (what :meth:`ModelRunner.execute` sends to the device)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    sink_idx: list[int] | None = None  # per sequence (None: the cache has no sinks)
    sink_slot: list[int] | None = None  # per token
    pending_rows: list[int] = field(default_factory=list)  # rows whose input is a pending token (0 here)
    pending_seqs: list[int] = field(default_factory=list)  # ... and their sequences' ids

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one new token."""
        return len(self.input_ids) == self.num_seqs


def pad_decode_inputs(step: StepInputs, bucket: int, max_blocks: int) -> StepInputs:
    """``step`` (a decode step) padded to ``bucket`` rows: pad rows have token 0 at position 0, slot -1,
    ``seq_len`` 0, an all -1 block table and no sink entry; every block table is padded with -1 to
    ``max_blocks``."""
    n = step.num_seqs
    if not step.is_decode or n > bucket:
        raise EngineConfigError(
            f"cannot pad a step of {n} sequences / {len(step.input_ids)} tokens to a decode batch of {bucket}"
        )
    widest = max((len(t) for t in step.block_tables), default=0)
    if widest > max_blocks:
        raise EngineConfigError(f"a block table of {widest} blocks exceeds max_blocks={max_blocks}")
    pad = bucket - n
    tables = [t + [-1] * (max_blocks - len(t)) for t in step.block_tables]
    return StepInputs(
        input_ids=step.input_ids + [0] * pad,
        positions=step.positions + [0] * pad,
        slot_mapping=step.slot_mapping + [-1] * pad,
        query_start_loc=list(range(bucket + 1)),
        seq_lens=step.seq_lens + [0] * pad,
        block_tables=tables + [[-1] * max_blocks] * pad,
        logits_rows=list(step.logits_rows),
        sink_idx=None if step.sink_idx is None else step.sink_idx + [-1] * pad,
        sink_slot=None if step.sink_slot is None else step.sink_slot + [-1] * pad,
    )


class DecodeGraphs:
    """Static input buffers and one CUDA graph per bucket for decode steps.

    ``capture=False`` keeps the static buffers and the padding but runs the model eagerly on them (how the
    CPU tests check the padded path against the plain one).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list,
        backend: object,
        sizes: list[int],
        max_blocks: int,
        block_size: int,
        device: torch.device,
        side_stream: bool = True,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes, self.max_blocks, self.block_size = sizes, max_blocks, block_size
        b = sizes[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.block_tables = torch.full((b, max_blocks), -1, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.sink_idx: torch.Tensor | None = None
        self.sink_slot: torch.Tensor | None = None
        # the static buffers a step fills, named as the StepInputs fields they take
        self.inputs = ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")
        if kv_caches and kv_caches[0].sink is not None:  # a quantized cache with attention sinks
            self.sink_idx = torch.full((b,), -1, dtype=torch.int32, device=device)
            self.sink_slot = torch.full((b,), -1, dtype=torch.long, device=device)
            self.inputs += ("sink_idx", "sink_slot")
        # rows whose input is a token of the step in flight, and where that step's tokens hold it
        self.pending_rows = torch.zeros(b, dtype=torch.long, device=device)
        self.pending_src = torch.zeros(b, dtype=torch.long, device=device)
        # the step's inputs, without a pinned allocation a step, copied beside the previous step's logits
        staged = [getattr(self, name) for name in self.inputs] + [self.pending_rows, self.pending_src]
        self.staging = StagedCopy(staged, side_stream=side_stream)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's hidden states [b, hidden], its own memory
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            sink_idx=None if self.sink_idx is None else self.sink_idx[:b],
            sink_slot=None if self.sink_slot is None else self.sink_slot[:b],
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward_paged(
            self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b), self.backend
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool (all rows are pad rows)."""
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            self._forward(b)  # warm up: compile / tune the kernels outside the capture
            with torch.cuda.graph(graph, self.pool):
                out = self._forward(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b], self.outputs[b] = graph, out
            torch.cuda.synchronize()

    def can_run(self, step: StepInputs) -> bool:
        return (
            step.is_decode
            and step.num_seqs <= self.sizes[-1]
            and all(len(t) <= self.max_blocks for t in step.block_tables)
        )

    def run(self, step: StepInputs, pending: PendingInputs | None = None) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of a decode step (replayed if captured); ``pending``: tokens of the
        step in flight, written into the input ids first."""
        n = step.num_seqs
        b = pick_bucket(self.sizes, n)
        if b is None:
            raise EngineConfigError(f"no decode graph holds {n} sequences (largest {self.sizes[-1]})")
        p = pad_decode_inputs(step, b, self.max_blocks)
        values = [getattr(p, name) for name in self.inputs]
        values = [v if v is not None else [-1] * b for v in values]  # no sink entries: -1
        rows, src = (pending.rows, pending.src) if pending is not None else ([], [])
        self.staging.copy([*values, rows, src])
        if pending is not None:
            pending.write(self.input_ids, self.pending_rows[: len(rows)], self.pending_src[: len(src)])
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
            out = self.outputs[b]  # overwritten by this graph's next replay
        else:
            out = self._forward(b)
        self.staging.release()  # the next step's inputs may land once this step's forward is done
        return out[:n]


@dataclass
class PendingInputs:
    """Input tokens of a step that the step in flight sampled and the host has not read: row ``rows[i]``
    of the input ids takes ``tokens[src[i]]``."""

    rows: list[int]
    src: list[int]
    tokens: torch.Tensor  # the step in flight's sampled tokens, on the device

    def write(self, input_ids: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
        """``input_ids[rows] = tokens[src]`` on the device; ``rows`` / ``src``: :attr:`rows` / :attr:`src`
        already on the device (one launch where ``src`` takes every token in order, the common case)."""
        every = self.src == list(range(self.tokens.shape[0]))
        input_ids.index_copy_(0, rows, self.tokens if every else self.tokens.index_select(0, src))


@dataclass
class PendingStep:
    """A launched step: the ids of the sequences that sample and their tokens, still on the device.

    On CUDA the tokens' copy to (pinned) host memory is queued right behind the step's sampler, with an
    event: :meth:`result` waits for that event only, not for steps launched after this one (a plain
    ``tokens.tolist()`` would queue its copy behind them). With a ``stream`` the copy runs there, so the next
    step's kernels do not queue behind it."""

    seq_ids: list[int] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [len(seq_ids)] int64, on the device
    logprobs: list[Logprobs | None] = field(default_factory=list)
    host: torch.Tensor | None = None  # the tokens' host copy (filled when `ready` fires)
    ready: torch.cuda.Event | None = None

    @classmethod
    def of(
        cls,
        seq_ids: list[int],
        tokens: torch.Tensor,
        logprobs: list[Logprobs | None],
        stream: torch.cuda.Stream | None = None,
    ) -> PendingStep:
        if tokens.device.type != "cuda":
            return cls(seq_ids, tokens, logprobs, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        ready = torch.cuda.Event()
        if stream is None:
            host.copy_(tokens, non_blocking=True)
            ready.record()
        else:
            stream.wait_stream(torch.cuda.current_stream(tokens.device))  # behind the sampler
            with torch.cuda.stream(stream):
                host.copy_(tokens, non_blocking=True)
                ready.record(stream)
            tokens.record_stream(stream)  # its memory outlives the copy even if the caller drops it
        return cls(seq_ids, tokens, logprobs, host, ready)

    def result(self) -> ModelRunnerOutput:
        """The sampled tokens on the host (waits for this step: its one host sync)."""
        if self.host is None:
            return ModelRunnerOutput()
        if self.ready is not None:
            self.ready.synchronize()
        return ModelRunnerOutput(self.seq_ids, self.host.tolist(), self.logprobs)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, config: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = config.block_size
        cfg = loaded.config
        fuse_silu = getattr(self.model, "fuse_gate_up_silu", None)  # before the cache takes the memory
        if fuse_silu is not None and use_fused_ops(self.device) and fuse_silu():
            log.info("int4 gate/up interleaved: the decode GEMV applies SiLU·mul as it writes")
        try:
            self.kv_cache = KVCache(
                cfg.num_layers,
                num_blocks,
                config.block_size,
                cfg.num_kv_heads,
                cfg.head_dim,
                loaded.dtype,
                loaded.device,
                config.quant_policy,
                self._k_offsets(config.quant_policy),
                config.sink_entries,
            )
        except (torch.OutOfMemoryError, RuntimeError) as e:
            per_block = KVCache.bytes_per_block(
                cfg.num_layers,
                config.block_size,
                cfg.num_kv_heads,
                cfg.head_dim,
                loaded.dtype,
                config.quant_policy,
            )
            raise CacheMemoryError(
                f"cannot allocate the KV cache: {num_blocks} blocks x {per_block / (1 << 20):.1f} MiB = "
                f"{num_blocks * per_block / GIB:.2f} GiB on {loaded.device} ({e}); lower "
                "--cache-max-entry-count"
            ) from e
        self.backend = make_attention_backend(self.device)  # Triton on CUDA (LMKILN_ATTENTION overrides)
        self.sampler = Sampler(config.seed)
        log.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB, quant_policy %d, %d attention-sink entries)",
            num_blocks,
            config.block_size,
            self.kv_cache.nbytes() / GIB,
            config.quant_policy,
            self.kv_cache.sink_entries,
        )
        self.session_len = config.session_len or cfg.max_position_embeddings
        self.max_blocks = -(-self.session_len // config.block_size)  # block-table width in the graphs
        rotary = getattr(self.model, "rotary", None)
        if hasattr(rotary, "build_table"):  # cos / sin of every position a sequence reaches, gathered a step
            rotary.build_table(self.session_len, loaded.dtype, self.device)
        self.max_num_seqs = min(config.max_num_seqs, num_blocks)
        # input and output copies of decode steps off the compute stream (LMKILN_SIDE_COPIES=0: on it)
        cuda = self.device.type == "cuda"
        choice = os.environ.get(SIDE_COPIES_ENV, "").strip()
        if choice not in ("", "0", "1"):
            raise EngineConfigError(
                f"{SIDE_COPIES_ENV}={choice!r}: use 0 (copies on the compute stream), 1 or leave it unset"
            )
        self.side_copies = cuda and choice != "0"
        self._d2h_stream = torch.cuda.Stream(self.device) if self.side_copies else None
        self.decode_graphs: DecodeGraphs | None = None
        if cuda and not config.eager:
            self.enable_decode_graphs(capture=True)

    def _k_offsets(self, quant_policy: int) -> list[torch.Tensor] | None:
        """The layers' calibrated K means for a quantized cache (None: unquantized, or no kv_stats)."""
        if not quant_policy:
            return None
        means = [layer.self_attn.k_mean for layer in self.model.model.layers]
        if any(m is None for m in means):
            log.info(
                "no K statistics (kv_stats.safetensors) in the model directory: the int%d KV cache is not "
                "centered (int4 loses more; an AWQ or packed build from `lmkiln lite auto_awq` has them)",
                quant_policy,
            )
            return None
        return means  # type: ignore[return-value]

    def enable_decode_graphs(self, capture: bool = True) -> None:
        """Run decode steps through :class:`DecodeGraphs` (``capture``: record CUDA graphs; CUDA only)."""
        if capture and getattr(self.backend, "name", "torch") == "torch":
            log.warning(
                "the %s attention backend cannot be captured in CUDA graphs (it syncs with the host); "
                "decode runs eagerly",
                getattr(self.backend, "name", type(self.backend).__name__),
            )
            return
        graphs = DecodeGraphs(
            self.model,
            self.kv_cache.layers,
            self.backend,
            graph_batch_sizes(self.max_num_seqs),
            self.max_blocks,
            self.block_size,
            self.device,
            self.side_copies,
        )
        if capture:
            t0 = time.perf_counter()
            graphs.capture()
            sizes = graphs.sizes
            log.info(
                "captured %d decode CUDA graphs (batch %d..%d, %d blocks a table) in %.1f s",
                len(sizes), sizes[0], sizes[-1], self.max_blocks, time.perf_counter() - t0,
            )
        self.decode_graphs = graphs

    def _collect(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        sinks = self.kv_cache.sink_entries
        step = StepInputs()
        if sinks:
            step.sink_idx, step.sink_slot = [], []
        for item in out.scheduled:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            ids = seq.token_ids[start : start + n]
            if ids and ids[-1] == PENDING_TOKEN:  # only a sequence's last token can still be on the device
                step.pending_rows.append(len(step.input_ids) + n - 1)
                step.pending_seqs.append(seq.seq_id)
                ids = [*ids[:-1], 0]
            step.input_ids.extend(ids)
            table = seq.block_table
            for p in range(start, start + n):
                step.positions.append(p)
                step.slot_mapping.append(table[p // bs] * bs + p % bs)
            step.query_start_loc.append(step.query_start_loc[-1] + n)
            step.seq_lens.append(start + n)
            step.block_tables.append(table)
            if item.sample:
                step.logits_rows.append(step.query_start_loc[-1] - 1)
            if step.sink_idx is not None and step.sink_slot is not None:
                if not -1 <= item.sink < sinks:
                    raise EngineConfigError(
                        f"sequence {seq.seq_id} was given attention-sink entry {item.sink} but the KV cache "
                        f"has {sinks} (the scheduler's kv_sink_entries must match the cache's)"
                    )
                step.sink_idx.append(item.sink)
                step.sink_slot.extend([item.sink if start == 0 else -1] + [-1] * (n - 1))
        return step

    def _prepare(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        width = max(len(t) for t in step.block_tables)
        tables = [t + [-1] * (width - len(t)) for t in step.block_tables]
        qsl = step.query_start_loc
        dev = self.device

        def as_tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(x, dtype, dev)

        meta = AttentionMetadata(
            slot_mapping=as_tensor(step.slot_mapping, torch.long),
            block_tables=as_tensor(tables, torch.int32),
            query_start_loc=as_tensor(qsl, torch.int32),
            seq_lens=as_tensor(step.seq_lens, torch.int32),
            max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
            max_seq_len=max(step.seq_lens),
        )
        if step.sink_idx is not None and step.sink_slot is not None:
            meta.sink_idx = as_tensor(step.sink_idx, torch.int32)
            meta.sink_slot = as_tensor(step.sink_slot, torch.long)
        return as_tensor(step.input_ids, torch.long), as_tensor(step.positions, torch.long), meta

    def _pending(self, step: StepInputs, prev: PendingStep | None) -> PendingInputs | None:
        """The step's pending inputs, taken from ``prev``'s samples."""
        if not step.pending_rows:
            return None
        where = {sid: i for i, sid in enumerate(prev.seq_ids)} if prev is not None else {}
        if prev is None or prev.tokens is None or any(s not in where for s in step.pending_seqs):
            raise RuntimeError(
                f"sequences {step.pending_seqs} have a pending token but the step in flight did not sample "
                "them (engine bug)"
            )
        return PendingInputs(step.pending_rows, [where[s] for s in step.pending_seqs], prev.tokens)

    def _hidden(
        self, step: StepInputs, eager: bool = False, pending: PendingInputs | None = None
    ) -> torch.Tensor:
        if not eager and self.decode_graphs is not None and self.decode_graphs.can_run(step):
            return self.decode_graphs.run(step, pending)
        input_ids, positions, meta = self._prepare(step)
        if pending is not None:
            rows, src = (to_device(x, torch.long, self.device) for x in (pending.rows, pending.src))
            pending.write(input_ids, rows, src)
        try:
            return self.model.forward_paged(input_ids, positions, self.kv_cache.layers, meta, self.backend)
        except BaseException:
            # a GEMV may have left its atomic accumulator to a consumer that never ran: the next step's
            # GEMV would add into it (Int4Linear.matmul_acc)
            from lmkiln.layers.linear import reset_accumulators

            reset_accumulators(self.model)
            raise

    @torch.inference_mode()
    def prompt_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits ``[T, vocab]`` of every scheduled token (eager; for prompt logprobs and perplexity)."""
        return self.model.compute_logits(self._hidden(self._collect(out), eager=True))

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run a step and wait for its sampled tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: PendingStep | None = None) -> PendingStep:
        """Queue a step's forward and sampling on the device and return at once (no host sync for greedy
        and plain temperature sampling). ``prev``: the step still in flight, whose sampled tokens are the
        inputs of this step's pending rows."""
        self.sampler.forget(out.finished_seq_ids)
        if out.is_empty:
            return PendingStep()
        step = self._collect(out)
        hidden = self._hidden(step, pending=self._pending(step, prev))
        rows = step.logits_rows
        sampling = [item.seq for item in out.scheduled if item.sample]
        if not sampling:
            return PendingStep()
        if rows[-1] != len(rows) - 1 or len(rows) != hidden.shape[0]:  # not simply every row, in order
            hidden = hidden[to_device(rows, torch.long, hidden.device)]
        sampled = self.sampler(self.model.compute_logits(hidden), sampling)
        seq_ids = [s.seq_id for s in sampling]
        return PendingStep.of(seq_ids, sampled.token_ids, sampled.logprobs, self._d2h_stream)
