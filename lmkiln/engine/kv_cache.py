"""The paged KV cache tensors and how many blocks fit in a memory budget.

An int4 cache (``quant_policy`` 4) stores K and V in a rotated basis: the backends multiply q, k and v by
an orthonormal Hadamard matrix ``H`` before the cache write and the attention output by ``H^T`` after it.
``(qH)(kH)^T = qk^T`` and ``softmax(.)(vH)H^T = softmax(.)v``, so the result is unchanged in exact
arithmetic, but the rotation spreads K's outlier channels over the whole head, so 16 levels per token and
head lose far less (SmolLM2-135M, CPU: +12.3 % ppl without it, +5.1 % with it). int8 needs no rotation.

A quantized cache also subtracts a per-layer K offset before quantizing when the model directory has
calibrated K statistics (``kv_stats.safetensors``, see :mod:`lmkiln.quant.kv_stats`): the mean of K after
RoPE, per KV head and channel. Shifting every key by the same vector ``c`` changes a query's scores by the
constant ``q . c``, which softmax ignores, so attention is unchanged; but K's large per-channel means no
longer inflate every token's range (SmolLM2-135M int4 on Pride and Prejudice, CPU fp32: +5.4 % ppl ->
+3.4 %, and +2.8 % with the int4 range search of :func:`lmkiln.kernels.attention_ref.quantize_kv_ref`).

A quantized cache can also keep *attention sinks*: ``sink_entries`` exact (model dtype) copies of position
0's K and V, one per distinct first token, beside the blocks (``LayerKVCache.sink [entries, 2, Hk, D]``, K in
the quantizer's basis: rotated and offset). Position 0 attends only to itself and RoPE is the identity there,
so its K/V depend on its token alone and one entry serves every sequence starting with that token (the
scheduler's :class:`~lmkiln.engine.kv_sink.SinkTable` hands entries out). Attention reads position 0 from the
sink, so the token most queries attend to most carries no quantization error.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lmkiln.engine.errors import EngineConfigError

log = logging.getLogger(__name__)

SZ_DTYPE = torch.float16  # (scale, zero) of quantized K/V, per token and head


@dataclass
class LayerKVCache:
    """One layer's cache (layouts in :mod:`lmkiln.kernels.attention_ref`); ``bits`` 0 means unquantized."""

    k: torch.Tensor
    v: torch.Tensor
    k_sz: torch.Tensor | None = None
    v_sz: torch.Tensor | None = None
    bits: int = 0
    rotation: torch.Tensor | None = None  # [head_dim, head_dim] orthonormal, applied by the backends
    k_offset: torch.Tensor | None = None  # [num_kv_heads, head_dim] float32, subtracted before quantizing
    sink: torch.Tensor | None = None  # [entries, 2, num_kv_heads, head_dim] model dtype: position 0's K, V


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two); symmetric, ``H @ H = I``."""
    if n < 1 or n & (n - 1):
        raise EngineConfigError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


class KVCache:
    """Every layer's K/V blocks, allocated once: ``[num_blocks, block_size, num_kv_heads, head_dim]`` each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        quant_policy: int = 0,
        k_offsets: list[torch.Tensor] | None = None,
        sink_entries: int = 0,
    ) -> None:
        """``k_offsets``: one ``[num_kv_heads, head_dim]`` K mean per layer (quantized caches use them).
        ``sink_entries``: attention-sink entries per layer (quantized caches only; ignored by an fp cache)."""
        if quant_policy == 4 and head_dim % 2:
            raise EngineConfigError(f"quant_policy 4 packs two values per byte; head_dim {head_dim} is odd")
        if sink_entries < 0:
            raise EngineConfigError(f"sink_entries must be >= 0, got {sink_entries}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.quant_policy = quant_policy
        self.sink_entries = sink_entries if quant_policy else 0
        shape = (num_blocks, block_size, num_kv_heads)
        # zeros, not empty: the reference attention multiplies masked (zero-weight) slots, and 0 * NaN = NaN
        if quant_policy:
            width = head_dim if quant_policy == 8 else head_dim // 2
            data = torch.zeros((2, num_layers, *shape, width), dtype=torch.uint8, device=device)
            sz = torch.zeros((2, num_layers, *shape, 2), dtype=SZ_DTYPE, device=device)
            rotation = None
            if quant_policy == 4 and not head_dim & (head_dim - 1):
                rotation = hadamard_matrix(head_dim, dtype, device)
            elif quant_policy == 4:
                log.warning(
                    "head_dim %d is not a power of two: int4 KV without the Hadamard rotation", head_dim
                )
            offsets = self._offsets(k_offsets, num_layers, num_kv_heads, head_dim, rotation, device)
            sinks: list[torch.Tensor | None] = [None] * num_layers
            if self.sink_entries:
                sink = torch.zeros(
                    (num_layers, self.sink_entries, 2, num_kv_heads, head_dim), dtype=dtype, device=device
                )
                sinks = list(sink)
            self.layers = [
                LayerKVCache(
                    data[0, i], data[1, i], sz[0, i], sz[1, i], quant_policy, rotation, offsets[i], sinks[i]
                )
                for i in range(num_layers)
            ]
        else:
            data = torch.zeros((2, num_layers, *shape, head_dim), dtype=dtype, device=device)
            self.layers = [LayerKVCache(data[0, i], data[1, i]) for i in range(num_layers)]

    @staticmethod
    def _offsets(
        k_offsets: list[torch.Tensor] | None,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        rotation: torch.Tensor | None,
        device: torch.device | str,
    ) -> list[torch.Tensor | None]:
        """Per-layer float32 K offsets in the cache's basis (rotated like K when the cache is rotated)."""
        if k_offsets is None:
            return [None] * num_layers
        if len(k_offsets) != num_layers:
            raise EngineConfigError(f"got K offsets for {len(k_offsets)} layers, the model has {num_layers}")
        out: list[torch.Tensor | None] = []
        for i, c in enumerate(k_offsets):
            if c.shape != (num_kv_heads, head_dim):
                raise EngineConfigError(
                    f"layer {i}: K offset of shape {list(c.shape)}, the cache holds {num_kv_heads} KV heads "
                    f"of dim {head_dim}; rebuild kv_stats.safetensors for this model"
                )
            c = c.to(device=device, dtype=torch.float32)
            if rotation is not None:
                c = c @ rotation.float()
            out.append(c.contiguous())
        return out

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return self.num_layers

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        quant_policy: int,
    ) -> int:
        """Bytes one block takes across all layers (K and V, plus scale/zero when quantized)."""
        if quant_policy:
            per_head = head_dim * quant_policy // 8 + 2 * torch.finfo(SZ_DTYPE).bits // 8
        else:
            per_head = head_dim * torch.finfo(dtype).bits // 8
        return 2 * num_layers * block_size * num_kv_heads * per_head

    @staticmethod
    def sink_bytes(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, quant_policy: int, entries: int
    ) -> int:
        """Bytes of the attention sinks across all layers (0 for an unquantized cache)."""
        if not quant_policy:
            return 0
        return 2 * num_layers * entries * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def nbytes(self) -> int:
        """Bytes of every tensor of the cache: blocks, scales/zeros and sinks."""
        n, hk, d, dt, qp = self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.quant_policy
        blocks = self.num_blocks * self.bytes_per_block(n, self.block_size, hk, d, dt, qp)
        return blocks + self.sink_bytes(n, hk, d, dt, qp, self.sink_entries)
