"""Launcher of the CUDA C++ batch-1 GEMV (``kernels/cuda/w4a16_gemv.cu``; built by :mod:`cuda_jit`), the
dispatcher's kernel kind ``"cuda"`` (``KernelConfig``: ``split_k``, ``num_warps`` = 32-column blocks a CTA,
``ksplit`` = warps over each block's K range, ``chunks`` = chunks an iteration, ``num_stages`` 2 = the next
iteration's loads issued first, ``zfold`` = tensor cores, ``flush``).

``gemv(x, qweight, sz, zeros, split_k, ...)`` computes ``y [1, N] = x [1, K] @ W`` for fp16 ``x`` over the
packed layout (docs/layout.md). Split-K partials meet as the Triton ``fma`` kernel's do (``w4a16.fma``):
``reduce="atomic"`` adds them into a zeroed float32 ``out`` the caller owns and must zero again;
``"ordered"`` sums them in split order through a float32 workspace (deterministic) and writes fp16, or with
``silu=True`` ``silu(gate) * up`` of an interleaved gate/up weight (``lmkiln.quant.pack.gate_up_interleave``).
The pure-torch reference is ``reference.w4a16_matmul_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lmkiln.kernels import cuda_jit, pdl
from lmkiln.kernels.reference import check_scratch, check_w4a16_inputs

from lmkiln.errors import QuantConfigError
from lmkiln.quant.pack import GATE_UP_BLOCK, PACK_K

SOURCE = "w4a16_gemv.cu"
ENABLE_ENV = "LMKILN_CUDA_GEMV"
REDUCE = {"atomic": 0, "ordered": 1, "silu": 2}
# no FMA contraction: the SiLU epilogue rounds as kernels/fused.py's silu_mul (Triton, fp fusion off) does
OPTIONS = ("--fmad=false",)


@dataclass(frozen=True)
class CudaGemvOptions:
    """Template choices of the kernel: ``unroll`` chunks an iteration, ``flush`` word-rows per half2 partial,
    ``preload`` the first iteration's weights loaded before the PDL wait, ``pipe`` the next iteration's loads
    issued before this one's math (double-buffered registers), ``warps`` column blocks of 32 a CTA, each
    with ``ksplit`` warps splitting the K range (their partials meet in shared memory), ``tc`` the dot
    products on the tensor cores (``mma.m16n8k16``, float32 sums; ``flush`` unused)."""

    unroll: int = 2
    flush: int = 1
    preload: bool = True
    pipe: bool = True
    warps: int = 2
    tc: bool = False
    ksplit: int = 1
    defines: tuple[str, ...] = ()  # experiments only: -D macros of the source (LMKILN_CHAINS, LMKILN_NOMATH)

    def __post_init__(self) -> None:
        if (
            self.unroll not in (1, 2, 4)
            or self.flush not in (1, 2, 4)
            or self.warps not in (1, 2, 4, 8)
            or self.ksplit not in (1, 2, 4, 8)
            or self.warps * self.ksplit > 32
        ):
            raise QuantConfigError(
                "cuda gemv: unroll and flush must be 1, 2 or 4, warps and ksplit 1, 2, 4 or 8 with "
                f"warps x ksplit <= 32, got {self}"
            )


def plan(n_chunks: int, split_k: int) -> tuple[int, int]:
    """``(splits, chunks per split)`` for ``split_k`` requested: no split left empty."""
    per = -(-n_chunks // max(1, min(split_k, n_chunks)))
    return -(-n_chunks // per), per


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    split_k: int,
    out: torch.Tensor | None = None,
    reduce: str = "atomic",
    silu: bool = False,
    scratch: torch.Tensor | None = None,
    options: CudaGemvOptions | None = None,
) -> torch.Tensor:
    opts = options or CudaGemvOptions()
    if x.device.type != "cuda" or x.dtype != torch.float16:
        raise QuantConfigError(
            f"cuda gemv takes fp16 activations on a CUDA device, got {x.dtype} on {x.device}"
        )
    if x.dim() != 2 or x.shape[0] != 1:
        raise QuantConfigError(f"cuda gemv takes exactly one row [1, K], got {tuple(x.shape)}")
    if zeros is None:
        raise QuantConfigError("the cuda gemv needs the packed `zeros` tensor (uint8 [K/G, N])")
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous().clone()  # the kernel reads activations 16 bytes at a time
    _, n, k, group = check_w4a16_inputs(x, qweight, sz, zeros)
    for name, t in (("qweight", qweight), ("sz", sz), ("zeros", zeros)):
        if t.device != x.device:
            raise QuantConfigError(f"{name} is on {t.device}, the activations on {x.device}")
    mode = "silu" if silu else reduce
    if mode not in REDUCE or (silu and reduce != "ordered"):
        raise QuantConfigError(
            f"cuda gemv: reduce={reduce!r} silu={silu}; use 'atomic', or 'ordered' (+ silu)"
        )
    if silu and (n % (2 * GATE_UP_BLOCK) or opts.warps % 2):
        raise QuantConfigError(
            f"the SiLU epilogue needs N a multiple of {2 * GATE_UP_BLOCK} (got {n}) and an even number of "
            f"warps (got {opts.warps})"
        )
    n_chunks = k // PACK_K
    splits, per = plan(n_chunks, split_k)
    tile_n = 32 * opts.warps
    tiles = -(-n // tile_n)
    dev = x.device
    if mode == "atomic":
        if out is None or out.dtype != torch.float32 or tuple(out.shape) != (1, n) or not out.is_contiguous():
            got = "None" if out is None else f"{out.dtype} {tuple(out.shape)}"
            raise QuantConfigError(
                f"reduce='atomic' adds into `out`: pass a zeroed float32 [1, {n}], got {got}"
            )
        y = out
        # float32 out; fp16 y, workspace and counters unused
        buffers = [out, torch.empty(0, dtype=torch.float16, device=dev), out, out.view(torch.int32)]
    else:
        width = n // 2 if silu else n
        y = out if out is not None else torch.empty((1, width), dtype=torch.float16, device=dev)
        if y.dtype != torch.float16 or tuple(y.shape) != (1, width) or not y.is_contiguous():
            raise QuantConfigError(
                f"out must be a contiguous float16 [1, {width}], got {y.dtype} {tuple(y.shape)}"
            )
        scratch = check_scratch(scratch, tiles, dev)
        # the split-K workspace (one split: none, partials meet in shared memory)
        ws = torch.empty(tiles * splits * tile_n if splits > 1 else 1, dtype=torch.float32, device=dev)
        buffers = [ws, y, ws, scratch]  # float32 out unused
    name = (
        f"w4a16_gemv<{group}, {opts.unroll}, {opts.flush}, {REDUCE[mode]}, "
        f"{str(opts.preload).lower()}, {str(opts.pipe).lower()}, {opts.warps}, {str(opts.tc).lower()}, "
        f"{opts.ksplit}>"
    )
    kern = cuda_jit.kernel(SOURCE, name, dev, OPTIONS + tuple(f"-D{d}" for d in opts.defines))
    kern(
        (tiles, splits),
        (tile_n * opts.ksplit,),
        [x, qweight, sz, zeros, *buffers, n, k // 8, n_chunks, per],
        pdl=pdl.enabled(dev),
    )
    return y


def enabled(device: torch.device) -> bool:
    """Whether the dispatcher may pick this kernel on ``device``: CUDA, compute capability >= 9
    (``red.global.add.v4.f32``, ``griddepcontrol``), NVRTC loadable, and ``LMKILN_CUDA_GEMV`` not 0 (an A/B
    switch, read at every call)."""
    return cuda_jit.enabled(device, ENABLE_ENV, QuantConfigError)


def options_of(cfg) -> CudaGemvOptions:
    """The kernel's template choices from a ``w4a16.KernelConfig`` of kind ``"cuda"``."""
    return CudaGemvOptions(
        unroll=cfg.chunks,
        flush=cfg.flush,
        pipe=cfg.num_stages > 1,
        warps=cfg.num_warps,
        tc=cfg.zfold,
        ksplit=cfg.ksplit,
    )


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    silu: bool = False,
    reduce: str = "ordered",
) -> torch.Tensor:
    """``w4a16.LAUNCHERS["cuda"]``: :func:`gemv` with a ``KernelConfig`` (the ``fma`` launcher's
    signature)."""
    return gemv(x, qweight, sz, zeros, cfg.split_k, out, reduce, silu, scratch, options_of(cfg))
