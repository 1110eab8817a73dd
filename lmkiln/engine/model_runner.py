"""Runs one scheduled step on the device: builds the flattened batch, runs the model, samples.

This is the only part of the engine that touches tensors: it owns the model, the paged KV cache, the
attention backend and the sampler. It makes no scheduling decisions; it carries out a ``SchedulerOutput``.
"""

from __future__ import annotations

import itertools
import logging
import os

import torch

from lmkiln.engine.attention import AttentionMetadata, TorchAttentionBackend
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import CacheMemoryError
from lmkiln.engine.kv_cache import KVCache
from lmkiln.engine.loader import GIB, LoadedModel
from lmkiln.engine.outputs import ModelRunnerOutput, SchedulerOutput
from lmkiln.engine.sampler import Sampler

log = logging.getLogger(__name__)


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
    entry = config.cache_max_entry_count
    if isinstance(entry, int):
        return entry
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        num = int(free * entry) // per_block
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
    num = int(budget * entry) // per_block
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


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_blocks: int, config: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.block_size = config.block_size
        cfg = loaded.config
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
        self.backend = TorchAttentionBackend()  # the Triton backend plugs in here on CUDA
        self.sampler = Sampler(config.seed)
        log.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB, quant_policy %d)",
            num_blocks,
            config.block_size,
            self.kv_cache.nbytes() / GIB,
            config.quant_policy,
        )

    def _prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        lens: list[int] = []
        logits_rows: list[int] = []
        for item in out.scheduled:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            ids.extend(seq.token_ids[start : start + n])
            table = seq.block_table
            for p in range(start, start + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
            if item.sample:
                logits_rows.append(qsl[-1] - 1)
        width = max(len(item.seq.block_table) for item in out.scheduled)
        tables = [item.seq.block_table + [-1] * (width - len(item.seq.block_table)) for item in out.scheduled]
        dev = self.device

        def as_tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=as_tensor(slots, torch.long),
            block_tables=as_tensor(tables, torch.int32),
            query_start_loc=as_tensor(qsl, torch.int32),
            seq_lens=as_tensor(lens, torch.int32),
            max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
            max_seq_len=max(lens),
        )
        return as_tensor(ids, torch.long), as_tensor(pos, torch.long), meta, logits_rows

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.sampler.forget(out.finished_seq_ids)
        if out.is_empty:
            return ModelRunnerOutput()
        input_ids, positions, meta, rows = self._prepare(out)
        hidden = self.model.forward_paged(input_ids, positions, self.kv_cache.layers, meta, self.backend)
        sampling = [item.seq for item in out.scheduled if item.sample]
        if not sampling:
            return ModelRunnerOutput()
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        sampled = self.sampler(logits, sampling)
        return ModelRunnerOutput(
            seq_ids=[s.seq_id for s in sampling],
            token_ids=sampled.token_ids.tolist(),  # the step's one host sync
            logprobs=sampled.logprobs,
        )
