"""Attention over the paged KV cache: per-step metadata and the backend that runs it.

The model calls ``backend.forward(q, k, v, layer_cache, meta, scale)`` in every layer; the backend writes
the new K/V into the cache and attends over it. :class:`TorchAttentionBackend` runs the pure-torch
references of :mod:`lmkiln.kernels.attention_ref` (the CPU path and the oracle); a Triton backend with the
same interface is the GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkiln.engine.kv_cache import LayerKVCache


@dataclass
class AttentionMetadata:
    """Where one step's tokens go in the cache and what each sequence attends to.

    ``slot_mapping [T]``: cache slot of every new token. ``block_tables [B, max_blocks]`` (int32, padded
    with -1). ``query_start_loc [B + 1]``: the new tokens of sequence ``b`` are rows
    ``query_start_loc[b]:query_start_loc[b + 1]``. ``seq_lens [B]``: tokens cached after this step.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class TorchAttentionBackend:
    """Reference attention: write K/V with ``write_kv_ref``, attend with ``paged_attention_ref``."""

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        from lmkiln.kernels.attention_ref import paged_attention_ref, write_kv_ref

        write_kv_ref(k, v, cache.k, cache.v, meta.slot_mapping, cache.k_sz, cache.v_sz, cache.bits)
        return paged_attention_ref(
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
        )
