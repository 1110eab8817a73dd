"""Pure-torch references for the W4A16 kernels (used by the tests and as the CPU path).

The packed weight's exact value is ``W = q * s + m`` computed in float32 (exact; see lmkiln/quant/pack.py).
The kernels round ``W`` once to the activation dtype before the tensor-core product (``mma``,
``dequant_mm``) or keep it in float32 (``gemv``); both match :func:`w4a16_matmul_ref` to fp16/bf16 rounding.
"""

from __future__ import annotations

import torch

from lmkiln.errors import QuantConfigError
from lmkiln.quant.pack import (
    GATE_UP_BLOCK,
    PACK_K,
    PACK_N,
    SUPPORTED_GROUP_SIZES,
    check_gate_up_width,
    dequantize_packed,
)

ACT_DTYPES = (torch.float16, torch.bfloat16)


def check_w4a16_inputs(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor | None = None
) -> tuple[int, int, int, int]:
    """Validate a 2-D activation ``[M, K]`` and packed weights; return ``(M, N, K, group_size)``.

    Every problem is a :class:`QuantConfigError` saying what is wrong, so a bad input never gives a silently
    wrong result.
    """
    if x.dtype not in ACT_DTYPES:
        raise QuantConfigError(
            f"W4A16 activations must be float16 or bfloat16, got {x.dtype}; cast the input (x.half())"
        )
    if x.dim() != 2:
        raise QuantConfigError(f"expected 2-D activations [M, K], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise QuantConfigError(
            f"W4A16 activations must be contiguous (got strides {x.stride()} for shape {tuple(x.shape)}); "
            "call .contiguous() first"
        )
    if qweight.dtype != torch.int32 or qweight.dim() != 3 or qweight.shape[2] != PACK_N:
        raise QuantConfigError(
            f"packed qweight must be int32 [N/{PACK_N}, K/8, {PACK_N}] (layout lmkiln-w4-tiled v1), got "
            f"{qweight.dtype} {tuple(qweight.shape)}; build it with lmkiln.quant.pack.pack"
        )
    if not qweight.is_contiguous() or not sz.is_contiguous():
        raise QuantConfigError("packed qweight and sz must be contiguous")
    n, k = qweight.shape[0] * PACK_N, qweight.shape[1] * 8
    if x.shape[1] != k:
        raise QuantConfigError(f"activation has K={x.shape[1]} features but the packed weight expects K={k}")
    if k % PACK_K:
        raise QuantConfigError(f"K={k} must be a multiple of {PACK_K} for the packed int4 layout")
    if sz.dtype != torch.float16 or sz.dim() != 3 or tuple(sz.shape[1:]) != (n, 2) or sz.shape[0] == 0:
        raise QuantConfigError(f"packed sz must be float16 [K/G, {n}, 2], got {sz.dtype} {tuple(sz.shape)}")
    if k % sz.shape[0] or (k // sz.shape[0]) not in SUPPORTED_GROUP_SIZES:
        raise QuantConfigError(
            f"K={k} with {sz.shape[0]} scale groups gives group size {k / sz.shape[0]:g}; the kernels "
            "support "
            f"group sizes {SUPPORTED_GROUP_SIZES} with K a multiple of the group size"
        )
    if zeros is not None and (
        zeros.dtype != torch.uint8 or tuple(zeros.shape) != (sz.shape[0], n) or not zeros.is_contiguous()
    ):
        raise QuantConfigError(
            f"packed zeros must be contiguous uint8 [{sz.shape[0]}, {n}], "
            f"got {zeros.dtype} {tuple(zeros.shape)}"
        )
    devices = {x.device, qweight.device, sz.device} | ({zeros.device} if zeros is not None else set())
    if len(devices) > 1:
        raise QuantConfigError(
            f"tensors on different devices: x {x.device}, qweight {qweight.device}, sz {sz.device}"
        )
    return x.shape[0], n, k, k // sz.shape[0]


def check_scratch(scratch: torch.Tensor | None, tiles: int, device: torch.device) -> torch.Tensor:
    """``scratch`` (zeroed int32 split-K counters, at least ``tiles`` on ``device``), validated; zeros made
    here if None. Shared by the Triton and CUDA launchers."""
    if scratch is None:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    if scratch.dtype != torch.int32 or scratch.device != device or scratch.numel() < tiles:
        raise QuantConfigError(
            f"split-K scratch must be a zeroed int32 tensor with at least {tiles} elements on {device}, got "
            f"{scratch.dtype} [{scratch.numel()}] on {scratch.device}; make one with w4a16.make_scratch()"
        )
    return scratch


def dequant_ref(qweight: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W [K, N]`` from packed tensors, rounded once to ``dtype``."""
    return dequantize_packed(qweight, sz).to(dtype)


def w4a16_matmul_ref(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W (+ bias)`` for activations of any leading shape, accumulated in float32, in ``x.dtype``."""
    k = qweight.shape[1] * 8
    if x.shape[-1] != k:
        raise QuantConfigError(f"activation has {x.shape[-1]} features, the packed weight expects K={k}")
    w = dequantize_packed(qweight, sz.to(qweight.device)).to(x.device)
    y = x.reshape(-1, k).float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def gate_up_silu_ref(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a GEMM output over a ``gate_up_interleave``-d weight: ``y [..., 2I]`` holds
    blocks ``[g_0, u_0, g_1, u_1, ...]`` of ``GATE_UP_BLOCK`` columns -> ``[..., I]``."""
    check_gate_up_width(y.shape[-1])
    blocks = y.unflatten(-1, (-1, 2, GATE_UP_BLOCK))
    out = torch.nn.functional.silu(blocks[..., 0, :]) * blocks[..., 1, :]
    return out.flatten(-2)
