"""The AutoAWQ "GEMM" tensor format (also read by vLLM, TGI and LMDeploy).

For a linear layer ``y = x @ W`` with ``W`` of shape ``[K, N]`` (``K`` = in_features, the transpose of
``nn.Linear.weight``) quantized to 4 bits asymmetrically in groups of ``G`` rows along ``K``::

    qweight  int32   [K, N // 8]       eight 4-bit codes per int32, nibble order 0,2,4,6,1,3,5,7
    qzeros   int32   [K // G, N // 8]  zero points, packed the same way
    scales   float16 [K // G, N]

    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

Within one int32 of packed column ``j``, nibble ``i`` (bits ``4i..4i+3``) holds column ``8j + ORDER[i]``.
"""

from __future__ import annotations

import torch

from lmkiln.errors import QuantConfigError

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4_columns(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in [0, 15] of shape ``[R, N]`` into int32 ``[R, N // 8]`` in AWQ nibble order."""
    if codes.dim() != 2 or codes.shape[1] % 8:
        raise QuantConfigError(f"cannot pack codes of shape {tuple(codes.shape)}: N must be a multiple of 8")
    r, n = codes.shape
    c = codes.to(torch.int32).reshape(r, n // 8, 8)[:, :, list(AWQ_PACK_ORDER)]
    # int32 arithmetic wraps like the C layout: nibble 7 lands in the sign bit.
    return (c << _SHIFTS.to(c.device)).sum(dim=-1, dtype=torch.int32)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_columns`: int32 ``[R, N // 8]`` to uint8 codes ``[R, N]``."""
    r, n8 = packed.shape
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # [R, N/8, 8] in pack order
    inv = [AWQ_PACK_ORDER.index(i) for i in range(8)]
    return nib[:, :, inv].reshape(r, n8 * 8).to(torch.uint8)


def pack_awq(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> dict[str, torch.Tensor]:
    """AWQ tensors from integer codes ``[K, N]``, integer zeros ``[K//G, N]`` and scales ``[K//G, N]``."""
    return {
        "qweight": pack_int4_columns(codes),
        "qzeros": pack_int4_columns(zeros),
        "scales": scales.to(torch.float16).contiguous(),
    }


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Return ``(codes [K, N] uint8, zeros [K//G, N] uint8, scales [K//G, N], group_size)``."""
    codes = unpack_int4_columns(qweight)
    zeros = unpack_int4_columns(qzeros)
    k, n = codes.shape
    if zeros.shape[1] != n or scales.shape != zeros.shape or k % scales.shape[0]:
        raise QuantConfigError(
            f"inconsistent AWQ tensors: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    return codes, zeros, scales, k // scales.shape[0]


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantized ``W`` of shape ``[K, N]`` (so ``nn.Linear.weight == W.T``)."""
    codes, zeros, s, g = unpack_awq(qweight, qzeros, scales)
    z = zeros.to(dtype).repeat_interleave(g, dim=0)
    return (codes.to(dtype) - z) * s.to(dtype).repeat_interleave(g, dim=0)
