"""Attention over the paged KV cache: per-step metadata and the backend that runs it.

The model calls ``backend.forward(q, k, v, layer_cache, meta, scale[, rope])`` in every layer; the backend
writes the new K/V into the cache and attends over it. :class:`TorchAttentionBackend` runs the pure-torch
references of :mod:`lmkiln.kernels.attention_ref` (the CPU path and the oracle);
:class:`TritonAttentionBackend` (same interface) runs the Triton kernels of :mod:`lmkiln.kernels.kv_cache` and
:mod:`lmkiln.kernels.paged_attention`, the GPU path (capturable in CUDA graphs for decode steps).
:func:`make_attention_backend` picks one for a device (``LMKILN_ATTENTION=torch|triton`` overrides).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmkiln.engine.errors import EngineConfigError
from lmkiln.engine.kv_cache import LayerKVCache

log = logging.getLogger(__name__)

ATTENTION_ENV = "LMKILN_ATTENTION"


@dataclass
class AttentionMetadata:
    """Where one step's tokens go in the cache and what each sequence attends to.

    ``slot_mapping [T]``: cache slot of every new token. ``block_tables [B, max_blocks]`` (int32, padded
    with -1). ``query_start_loc [B + 1]``: the new tokens of sequence ``b`` are rows
    ``query_start_loc[b]:query_start_loc[b + 1]``. ``seq_lens [B]``: tokens cached after this step.
    Attention sinks (quantized caches with sink entries; None otherwise): ``sink_idx [B]`` (int32) is the
    entry sequence ``b`` reads its key position 0 from, ``sink_slot [T]`` (int64) the entry a token's exact
    K/V is written to; -1 for none.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int
    sink_idx: torch.Tensor | None = None
    sink_slot: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class _Backend:
    """``forward``: the int4 cache's rotation (see :mod:`lmkiln.engine.kv_cache`) around writing the new K/V
    (``_write_kv``, with the cache's K offset and attention sinks) and ``_attend``.

    ``rope = (cos, sin)`` (the model's fused path): q and k still need their rotary embedding, applied in
    place by the Triton kernels: inside the KV write where the backend can (``fuses_rope``, no cache
    rotation, which must come after it), else by ``kernels.fused.rotary_`` first. Where ``_writes_new_kv``
    (the Triton backend's batch-1 decode steps over an unquantized cache), the decode kernel itself applies
    the rotary, stores the new K/V and attends: one launch."""

    name = ""
    fuses_rope = False
    _write_kv: Callable[..., None]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        pending: bool = False,
    ) -> torch.Tensor:
        """Attention output ``[T, Hq, D]``. ``pending``: q, k, v are views of a float32 split-K accumulator
        (only where :meth:`takes_pending_qkv` said so), which the decode kernel rounds, reads and zeroes."""
        rot = cache.rotation
        fused_rope = {}
        if pending and (rope is None or not self.takes_pending_qkv(cache, meta, q.shape[0])):
            raise RuntimeError("a pending qkv accumulator reached a path that cannot consume it (engine bug)")
        if rope is not None:
            if self.fuses_rope and rot is None:
                if self._writes_new_kv(q.shape[0], cache, meta):  # one launch: rotary, KV write, attention
                    new_kv = (k, v, meta.slot_mapping, *rope)
                    return self._attend(q, cache, meta, scale, new_kv=new_kv, consume=pending)
                fused_rope = {"rope": (q, *rope)}
            else:
                from lmkiln.kernels.fused import rotary_

                rotary_(q, k, *rope)
        if rot is not None:
            rot = rot.to(q.dtype)
            q, k, v = q @ rot, k @ rot, v @ rot
        sink = cache.sink if meta.sink_slot is not None else None
        self._write_kv(
            k,
            v,
            cache.k,
            cache.v,
            meta.slot_mapping,
            cache.k_sz,
            cache.v_sz,
            cache.bits,
            cache.k_offset,
            sink,
            meta.sink_slot if sink is not None else None,
            **fused_rope,
        )
        out = self._attend(q, cache, meta, scale)
        return out if rot is None else out @ rot.T

    def _attend(
        self,
        q: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        new_kv: tuple[torch.Tensor, ...] | None = None,
        consume: bool = False,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _writes_new_kv(self, num_tokens: int, cache: LayerKVCache, meta: AttentionMetadata) -> bool:
        """Whether ``_attend(..., new_kv=...)`` rotates and stores the step's K/V (then no ``_write_kv``)."""
        return False

    def takes_pending_qkv(self, cache: LayerKVCache, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step's q, k, v may come as a pending float32 split-K accumulator
        (``Int4Linear.matmul_acc``), asked by the model before its qkv GEMM: exactly where :meth:`forward`
        (given ``rope``) takes the ``new_kv`` path, whose decode kernel rounds, reads and zeroes it."""
        return self.fuses_rope and cache.rotation is None and self._writes_new_kv(num_tokens, cache, meta)


class TorchAttentionBackend(_Backend):
    """Reference attention: write K/V with ``write_kv_ref``, attend with ``paged_attention_ref``."""

    name = "torch"

    def __init__(self) -> None:
        from lmkiln.kernels.attention_ref import paged_attention_ref, write_kv_ref

        self._write_kv = write_kv_ref
        self._ref = paged_attention_ref

    def _attend(
        self,
        q: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        new_kv: tuple[torch.Tensor, ...] | None = None,
        consume: bool = False,
    ) -> torch.Tensor:
        return self._ref(
            q,
            cache.k,
            cache.v,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            cache.k_sz,
            cache.v_sz,
            cache.bits,
            *_sinks(cache, meta),
        )


def _sinks(cache: LayerKVCache, meta: AttentionMetadata) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(sink, sink_idx)`` for the attention read: both, or neither when the step or the cache has none."""
    if cache.sink is None or meta.sink_idx is None:
        return None, None
    return cache.sink, meta.sink_idx


class TritonAttentionBackend(_Backend):
    """Triton kernels: ``write_kv`` (quantizing for int8/int4 caches), then the split-KV decode kernel for
    decode-only steps or the varlen prefill kernel (prefix hits, chunked prefill, mixed batches). The decode
    kernel merges its splits itself, through split counters the backend keeps per device (made at the
    first decode step, which the runner runs eagerly before it captures a graph)."""

    name = "triton"
    fuses_rope = True

    def __init__(self) -> None:
        from lmkiln.kernels import kv_cache, paged_attention

        self._write_kv = kv_cache.write_kv
        self._decode = paged_attention.paged_decode
        self._prefill = paged_attention.paged_prefill
        self._make_counters = paged_attention.make_counters
        self._counters: dict[torch.device, torch.Tensor] = {}

    def _split_counters(self, q: torch.Tensor, cache: LayerKVCache) -> torch.Tensor | None:
        """Zeroed counters for a decode launch of ``q``'s batch, or None where they are too few: the launch
        makes its own (from the graph's pool when captured). Never replaced: captured graphs hold them."""
        counters = self._counters.get(q.device)
        if counters is None:
            counters = self._counters[q.device] = self._make_counters(q.device)
        return counters if counters.numel() >= q.shape[0] * cache.k.shape[2] else None

    def _writes_new_kv(self, num_tokens: int, cache: LayerKVCache, meta: AttentionMetadata) -> bool:
        """Batch-1 decode steps over an unquantized cache: the decode kernel takes this step's K/V
        (``new_kv``). H100, 7B int4 (notes/engine.md, session 7): batch 1 2.262 -> 2.225 ms a step, but
        batch 4 3.51 -> 3.60 ms, so larger batches keep the KV-write launch."""
        return cache.bits == 0 and num_tokens == 1 and self._is_decode(num_tokens, meta)

    @staticmethod
    def _is_decode(num_tokens: int, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and num_tokens == meta.num_seqs

    def _attend(
        self,
        q: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
        new_kv: tuple[torch.Tensor, ...] | None = None,
        consume: bool = False,
    ) -> torch.Tensor:
        sink, sink_idx = _sinks(cache, meta)
        if self._is_decode(q.shape[0], meta):
            return self._decode(
                q,
                cache.k,
                cache.v,
                meta.block_tables,
                meta.seq_lens,
                scale,
                cache.k_sz,
                cache.v_sz,
                cache.bits,
                sink=sink,
                sink_idx=sink_idx,
                counters=self._split_counters(q, cache),
                new_kv=new_kv,  # type: ignore[arg-type]
                consume=consume,
            )
        return self._prefill(
            q,
            cache.k,
            cache.v,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            meta.max_query_len,
            scale,
            cache.k_sz,
            cache.v_sz,
            cache.bits,
            sink=sink,
            sink_idx=sink_idx,
        )


def make_attention_backend(device: torch.device | str) -> TorchAttentionBackend | TritonAttentionBackend:
    """Triton on CUDA, the torch reference elsewhere; ``LMKILN_ATTENTION=torch|triton`` overrides (on the CPU,
    ``triton`` needs ``TRITON_INTERPRET=1``: a debugging aid, very slow)."""
    choice = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if choice not in ("", "torch", "triton"):
        raise EngineConfigError(f"{ATTENTION_ENV}={choice!r}: use 'torch' or 'triton' (or leave it unset)")
    if not choice:
        choice = "triton" if torch.device(device).type == "cuda" else "torch"
    if choice == "triton":
        try:
            backend: TorchAttentionBackend | TritonAttentionBackend = TritonAttentionBackend()
        except ImportError as e:
            raise EngineConfigError(
                f"the Triton attention backend needs triton ({e}); set {ATTENTION_ENV}=torch"
            ) from e
    else:
        backend = TorchAttentionBackend()
    log.info("attention backend: %s", backend.name)
    return backend
