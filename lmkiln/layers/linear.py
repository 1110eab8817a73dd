"""``Int4Linear``: a linear layer over packed int4 weights (layout ``lmkiln-w4-tiled`` v1).

On CUDA the forward pass calls the ``lmkiln::w4a16_mm`` custom op (Triton kernels; capturable by CUDA graphs
and ``torch.compile``); on the CPU it runs the pure-torch reference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from lmkiln.errors import ArtifactError, QuantConfigError
from lmkiln.quant.pack import check_packed_tensors

log = logging.getLogger(__name__)

SCRATCH_TILES = 1 << 14  # split-K counters; 64 KiB per layer on the GPU


class Int4Linear(nn.Module):
    """``y = x @ W + b`` with ``W [K, N]`` stored as packed int4 codes, fp16 ``(s, -z*s)`` pairs and zeros."""

    def __init__(
        self,
        qweight: torch.Tensor,
        sz: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        try:
            k, n, g = check_packed_tensors(qweight, sz, zeros)
        except ArtifactError as e:
            raise QuantConfigError(str(e)) from e
        if bias is not None and tuple(bias.shape) != (n,):
            raise QuantConfigError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        if in_features is not None and not 0 < in_features <= k:
            raise QuantConfigError(f"in_features={in_features} does not fit the packed K={k}")
        # The packer pads K up to the layout's chunk with zero weights; activations get zero-padded here.
        self.in_features, self.packed_k, self.out_features, self.group_size = in_features or k, k, n, g
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("sz", sz.contiguous())
        self.register_buffer("zeros", zeros.contiguous())
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        # split-K counters: zero, and every kernel launch leaves them zero; not part of the state dict
        self.register_buffer("scratch", torch.zeros(0, dtype=torch.int32), persistent=False)
        # float32 [1, N] output of the atomic split-K GEMV (matmul_acc): zero between a GEMV and its consumer
        self.register_buffer("acc", None, persistent=False)

    @classmethod
    def from_packed(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str, in_features: int | None = None
    ) -> Int4Linear:
        """Build from a packed state dict (see ``lmkiln.quant.pack.load_packed``) and a layer prefix.

        ``in_features``: the real K when the packer padded it (manifest ``padded_in_features``).
        """
        try:
            qweight, sz, zeros = (tensors[f"{prefix}.{k}"] for k in ("qweight", "sz", "zeros"))
        except KeyError as e:
            raise ArtifactError(
                f"packed checkpoint has no {e.args[0]}; is {prefix!r} a quantized linear?"
            ) from None
        return cls(qweight, sz, zeros, tensors.get(f"{prefix}.bias"), in_features)

    def _apply(self, fn, recurse: bool = True):  # keep the scratch on the weights' device, sized for CUDA
        out = super()._apply(fn, recurse)
        if self.qweight.device.type == "cuda" and self.scratch.numel() != SCRATCH_TILES:
            self.scratch = torch.zeros(SCRATCH_TILES, dtype=torch.int32, device=self.qweight.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, silu=False)

    def matmul_acc(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``(y, pending)``. Where the decode GEMV (``cuda`` or ``fma``, fp16, M = 1, no bias) runs, its
        split-K programs add their partials with atomics into this layer's float32 accumulator, and ``y`` is
        that accumulator's ``[M, N]`` rows, ``pending`` True: the caller must hand ``y`` to a consumer that
        reads it and zeroes it again before this layer runs again (``kernels.fused.add_rmsnorm(...,
        consume=True)`` for o / down, ``paged_attention.paged_decode(..., consume=True)`` for the fused
        qkv). Else ``(self(x), False)``. Saves each GEMV its split-K tail (notes/engine.md, session 7)."""
        from lmkiln.kernels.dispatch import ATOMIC_MAX_M, atomic_splitk_config

        if x.device.type != "cuda" or self.bias is not None or self.packed_k != self.in_features:
            return self(x), False
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        cfg = atomic_splitk_config(m, self.out_features, self.packed_k, self.group_size, x.dtype, x.device)
        if cfg is None or x.shape[-1] != self.in_features:
            return self(x), False
        from lmkiln.kernels import w4a16

        if self.acc is None or self.acc.device != x.device:
            self.acc = torch.zeros(ATOMIC_MAX_M, self.out_features, dtype=torch.float32, device=x.device)
        y = self.acc[:m]
        w4a16.LAUNCHERS[cfg.kind](
            x2.contiguous(), self.qweight, self.sz, self.zeros, cfg, out=y, reduce="atomic"
        )
        return y.view(*x.shape[:-1], self.out_features), True

    def _matmul(self, x: torch.Tensor, silu: bool) -> torch.Tensor:
        """``x @ W + b``; ``silu``: ``W`` is an interleaved gate/up weight, the result ``silu(gate) * up``."""
        if x.shape[-1] != self.in_features:
            raise QuantConfigError(
                f"Int4Linear expects {self.in_features} input features, got tensor of shape {tuple(x.shape)}"
            )
        if self.packed_k != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.packed_k - self.in_features))
        fused = silu and self.bias is None and x.device.type == "cuda"  # the bias comes before the SiLU
        if x.device.type == "cuda":
            from lmkiln.kernels.dispatch import w4a16_mm, w4a16_silu_mm

            if self.scratch.device != x.device or self.scratch.numel() != SCRATCH_TILES:
                self.scratch = torch.zeros(SCRATCH_TILES, dtype=torch.int32, device=x.device)
            op = w4a16_silu_mm if fused else w4a16_mm
            y = op(x.contiguous(), self.qweight, self.sz, self.zeros, self.scratch)
        else:
            from lmkiln.kernels.reference import w4a16_matmul_ref

            if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise QuantConfigError(f"Int4Linear input must be a float tensor, got {x.dtype}")
            y = w4a16_matmul_ref(x, self.qweight, self.sz)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if silu and not fused:
            from lmkiln.kernels.dispatch import gate_up_silu

            y = gate_up_silu(y)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def reset_accumulators(module: nn.Module) -> int:
    """Zero every :class:`Int4Linear` accumulator under ``module`` (after a forward failed between a GEMV
    and its consumer, which would leave one dirty); returns how many it zeroed."""
    accs = [m.acc for m in module.modules() if isinstance(m, Int4Linear) and m.acc is not None]
    for acc in accs:
        acc.zero_()
    return len(accs)


class Int4GateUpSiLU(Int4Linear):
    """A fused gate/up ``Int4Linear`` whose forward returns the MLP's activation ``silu(gate) * up [..., I]``.

    Its columns are reordered by :func:`lmkiln.quant.pack.gate_up_interleave`, so the decode GEMV writes the
    activation from the tiles it computes (no SiLU·mul launch, no ``[M, 2I]`` round trip through memory).
    Built from a plain fused gate/up by :meth:`from_gate_up`; :class:`lmkiln.models.llama.MLP` checks
    ``applies_silu``."""

    applies_silu = True

    @classmethod
    def from_gate_up(cls, lin: Int4Linear) -> Int4GateUpSiLU:
        from lmkiln.quant.pack import gate_up_interleave

        mod = cls(*gate_up_interleave(lin.qweight, lin.sz, lin.zeros, lin.bias), in_features=lin.in_features)
        mod.scratch = lin.scratch  # its split-K counters (zero between launches), already on the device
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, silu=True)
