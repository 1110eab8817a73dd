"""Asymmetric round-to-nearest int4 quantization in groups along the input dimension.

All functions take ``nn.Linear``-shaped weights ``[out, in]`` and quantize groups of ``group_size``
consecutive input channels, as AutoAWQ does (zero point, codes in [0, 2**bits - 1]). Scales are rounded
to fp16 before the codes are computed, so the fake-quantized weight equals what a kernel reconstructs
from the stored fp16 scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkiln.errors import QuantConfigError

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(
                f"--w-bits {self.bits} is not supported: lmkiln builds 4-bit weights only (use --w-bits 4)"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantConfigError(
                f"--w-group-size {self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES}"
            )
        if not self.zero_point:
            raise QuantConfigError("only asymmetric quantization with a zero point is supported")

    @property
    def max_int(self) -> int:
        return 2**self.bits - 1

    def check_in_features(self, name: str, in_features: int) -> None:
        if in_features % self.group_size:
            raise QuantConfigError(
                f"{name} has {in_features} input features, not divisible by group size "
                f"{self.group_size}; choose a group size that divides it (e.g. "
                f"{', '.join(str(g) for g in SUPPORTED_GROUP_SIZES if in_features % g == 0) or 'none'})"
            )


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scales, zeros)`` of shape ``[out, in // G]``; scales already rounded to fp16."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // spec.group_size, spec.group_size)
    mx, mn = g.amax(dim=-1), g.amin(dim=-1)
    scales = ((mx - mn).clamp(min=1e-5) / spec.max_int).to(torch.float16).to(w.dtype)
    zeros = (-torch.round(mn / scales)).clamp(0, spec.max_int)
    return scales, zeros


def quantize_codes(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] uint8, zeros [out, in//G] uint8, scales [out, in//G] fp16)``."""
    scales, zeros = quant_params(w, spec)
    s = scales.repeat_interleave(spec.group_size, dim=1)
    z = zeros.repeat_interleave(spec.group_size, dim=1)
    codes = (torch.round(w / s) + z).clamp(0, spec.max_int)
    return codes.to(torch.uint8), zeros.to(torch.uint8), scales.to(torch.float16)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``w`` (same shape and dtype): what the int4 model computes with."""
    out_f, in_f = w.shape
    scales, zeros = quant_params(w, spec)
    g = w.reshape(out_f, in_f // spec.group_size, spec.group_size)
    s, z = scales.unsqueeze(-1), zeros.unsqueeze(-1)
    q = (torch.round(g / s) + z).clamp(0, spec.max_int)
    return ((q - z) * s).reshape(out_f, in_f)


def to_awq_tensors(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors (qweight/qzeros/scales) of an ``[out, in]`` weight."""
    from lmkiln.quant.awq_format import pack_awq

    codes, zeros, scales = quantize_codes(w.float(), spec)
    return pack_awq(codes.t().contiguous(), zeros.t().contiguous(), scales.t().contiguous())
