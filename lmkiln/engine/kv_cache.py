"""The paged KV cache tensors and how many blocks fit in a memory budget."""

from __future__ import annotations

import logging
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
    ) -> None:
        if quant_policy == 4 and head_dim % 2:
            raise EngineConfigError(f"quant_policy 4 packs two values per byte; head_dim {head_dim} is odd")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.quant_policy = quant_policy
        shape = (num_blocks, block_size, num_kv_heads)
        # zeros, not empty: the reference attention multiplies masked (zero-weight) slots, and 0 * NaN = NaN
        if quant_policy:
            width = head_dim if quant_policy == 8 else head_dim // 2
            data = torch.zeros((2, num_layers, *shape, width), dtype=torch.uint8, device=device)
            sz = torch.zeros((2, num_layers, *shape, 2), dtype=SZ_DTYPE, device=device)
            self.layers = [
                LayerKVCache(data[0, i], data[1, i], sz[0, i], sz[1, i], quant_policy)
                for i in range(num_layers)
            ]
        else:
            data = torch.zeros((2, num_layers, *shape, head_dim), dtype=dtype, device=device)
            self.layers = [LayerKVCache(data[0, i], data[1, i]) for i in range(num_layers)]

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

    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype, self.quant_policy
        )
