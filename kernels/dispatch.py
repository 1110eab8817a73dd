"""Shape-based kernel choice, per-GPU tuned tables and the ``lmkiln::w4a16_mm`` custom op.

Serving never autotunes: :func:`choose_config` reads ``kernels/tuned/<gpu>.json`` (written by
``lmkiln bench kernels --tune``) once per device name and falls back to a heuristic for shapes or GPUs that
have no entry. The op is registered with ``torch.library.custom_op`` (+ a fake implementation), so CUDA
graphs and ``torch.compile`` capture it; on the CPU it runs the pure-torch reference.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from lmkiln.kernels.reference import check_w4a16_inputs, gate_up_silu_ref, w4a16_matmul_ref

from lmkiln.errors import QuantConfigError
from lmkiln.quant.pack import GATE_UP_BLOCK, PACK_K, PACK_N, check_gate_up_width

log = logging.getLogger(__name__)

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
# the heuristic's first M for the swapped-operand tensor-core tiles: on the H100 they beat ``fma`` from M=2 on
# at every 7B shape (`lmkiln bench kernels --tune --kinds mma_t`, notes/kernels.md, sessions 10-11; at M=2 the
# 7B linears 3.81 -> 3.01 ms, a batch-2 decode step 3.557 -> 2.900 ms)
MMA_T_MIN_M = 2
ATOMIC_ENV = "LMKILN_ATOMIC_SPLITK"
# H100, 7B shape (notes/engine.md, session 7): atomic o / down GEMVs took the batch-1 decode step from 2.31 to
# 2.25 ms (and the qkv one from 2.23 to 2.16), but batch 4 from 3.51 to 3.66 ms (4 rows: 4x the atomics on
# the same addresses)
ATOMIC_MAX_M = 1
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
# the W4A16 kernel kinds (``w4a16.KernelConfig.kind``); here, not in the Triton module, so that CLIs can offer
# them as choices without importing Triton
KERNEL_KINDS = ("gemv", "fma", "mma", "mma_t", "dequant_mm", "cuda")


def _triton_mod():
    from lmkiln.kernels import w4a16

    return w4a16


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"`` (the tuned table's file stem)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class TunedEntry:
    n: int
    k: int
    group_size: int
    dtype: str
    m_max: int
    config: dict
    # where ``config`` is a kind that may be unavailable at run time ("cuda": no NVRTC, LMKILN_CUDA_GEMV=0),
    # the best other config the tuner measured
    fallback: dict | None = None


@functools.cache
def load_tuned(device_name: str) -> tuple[TunedEntry, ...]:
    """Entries of ``kernels/tuned/<slug>.json`` for this GPU (empty when there is no file)."""
    path = TUNED_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        log.info("no tuned kernel table for %r (%s): using heuristic configs", device_name, path.name)
        return ()
    try:
        data = json.loads(path.read_text())
        entries = tuple(
            TunedEntry(
                int(e["n"]),
                int(e["k"]),
                int(e["group_size"]),
                str(e["dtype"]),
                int(e["m_max"]),
                dict(e["config"]),
                dict(e["fallback"]) if e.get("fallback") else None,
            )
            for e in data["entries"]
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantConfigError(
            f"tuned kernel table {path} is unreadable ({e}); delete it or re-run "
            "`lmkiln bench kernels --tune`"
        ) from e
    return tuple(sorted(entries, key=lambda e: (e.n, e.k, e.group_size, e.dtype, e.m_max)))


def _divisor_block(n: int, prefs: tuple[int, ...]) -> int:
    for b in prefs:
        if n % b == 0:
            return b
    return PACK_N


def heuristic_config(
    m: int, n: int, k: int, group_size: int, sm_count: int = 132, fma: bool = True, cuda: bool = False
):
    """A config without a tuned table, shaped like what won on the H100/H200 (see notes/kernels.md):
    M == 1 with ``cuda`` (fp16, NVRTC available) the CUDA C++ GEMV on the tensor cores, a 32-column block
    and 8 warps over its K range a CTA, about 3 CTAs an SM; M == 1 otherwise (and M == 2 where N is not a
    multiple of 64) the CUDA-core ``fma`` kernel (every dequantized weight reused across the rows;
    ``fma=False``, used for bf16 whose fma path has no packed-fp16 arithmetic: the M == 1 GEMV), M <= 256
    the swapped-operand tensor-core tiles (``mma_t``: 16-64 tokens a tile, split-K to fill the GPU; ``mma``
    where N is not a multiple of 64), larger M dequantize + cuBLAS."""
    w4a16 = _triton_mod()
    n_chunks = k // PACK_K

    def split_for(tiles: int, ctas_per_sm: int = 2, most: int = 16) -> int:
        return max(1, min(n_chunks, most, round(ctas_per_sm * sm_count / tiles)))

    if m == 1 and fma and cuda:
        # one 32-column block a CTA, its K range split over 8 warps (partials meet in shared memory), about
        # 3 such CTAs an SM (H100, the 7B linears, notes/kernels.md, session 14: qkv 1, o 3, down 3 splits)
        return w4a16.KernelConfig.cuda_gemv(1, 8, split_for(-(-n // 32), 3, n_chunks))
    if m == 1 and not fma:
        bn = _divisor_block(n, (256, 128, 64, 32))
        return w4a16.KernelConfig(
            kind="gemv", block_n=bn, split_k=split_for(n // bn), num_warps=8 if bn == 256 else 4, num_stages=3
        )
    if fma and (m < MMA_T_MIN_M or (m == MMA_T_MIN_M and n % 64)):  # mma_t needs N % 64 == 0
        bm = 1 << (m - 1).bit_length()
        bn = 128 if n % 128 == 0 else PACK_N
        warps = 4 if bn == 128 else 1
        return w4a16.KernelConfig(
            kind="fma",
            block_m=bm,
            block_n=bn,
            split_k=split_for(n // bn, 6),
            num_warps=warps,
            num_stages=1,
            flush=2 if bm <= 2 else 4,
        )
    if m <= 256 and n % 64 == 0:
        bm = min(64, max(16, 1 << (m - 1).bit_length()))
        bn = _divisor_block(n, (128, 64))
        return w4a16.KernelConfig(
            kind="mma_t",
            block_m=bm,
            block_n=bn,
            split_k=split_for((n // bn) * -(-m // bm)),
            num_warps=4,
            num_stages=3,
            zfold=False,
            join=bm <= 32,
        )
    if m <= 64:
        bn = _divisor_block(n, (128, 64, 32))
        tiles = (n // bn) * -(-m // 16)
        return w4a16.KernelConfig(
            kind="mma",
            block_m=16,
            block_n=bn,
            split_k=split_for(tiles),
            num_warps=4,
            num_stages=1,
            zfold=True,
            join=True,
        )
    return w4a16.KernelConfig(kind="dequant_mm", block_n=_divisor_block(n, (64, 32)), num_warps=4)


def choose_config(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device):
    """The launch configuration for one GEMM (tuned table entry, else heuristic)."""
    w4a16 = _triton_mod()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    entries = load_tuned(name)
    dname = DTYPE_NAMES.get(dtype, "float16")
    cuda = m == 1 and dtype == torch.float16 and w4a16.w4a16_cuda.enabled(device)
    for want_dtype in (dname, "float16"):
        cands = [e for e in entries if (e.n, e.k, e.group_size, e.dtype) == (n, k, group_size, want_dtype)]
        if cands:
            pick = next((e for e in cands if e.m_max >= m), cands[-1])
            cfg = w4a16.KernelConfig.from_dict(pick.config)
            if cfg.kind == "cuda" and not cuda and pick.fallback:
                cfg = w4a16.KernelConfig.from_dict(pick.fallback)
            if (
                (cfg.kind == "gemv" and m != 1)
                or (cfg.kind == "fma" and dtype == torch.bfloat16)
                or (cfg.kind == "cuda" and not cuda)
            ):
                continue
            return cfg
    sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return heuristic_config(m, n, k, group_size, sm, fma=dtype != torch.bfloat16, cuda=cuda)


def atomic_splitk_config(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, device: torch.device):
    """The ``fma`` or ``cuda`` config of a GEMM whose split-K partials may be added with atomics into a
    float32 output (``w4a16.LAUNCHERS[kind](..., reduce="atomic")``), or None: not on CUDA, not fp16,
    M > ``ATOMIC_MAX_M``, the dispatcher picks another kernel for this M, or ``LMKILN_ATOMIC_SPLITK=0``.
    Read at every call (an A/B switch, as ``LMKILN_PDL``)."""
    choice = os.environ.get(ATOMIC_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise QuantConfigError(f"{ATOMIC_ENV}={choice!r}: use 0 (off), 1 (on) or leave it unset")
    if choice == "0" or device.type != "cuda" or dtype != torch.float16 or not 0 < m <= ATOMIC_MAX_M:
        return None
    cfg = choose_config(m, n, k, group_size, dtype, device)
    return cfg if cfg.kind in ("fma", "cuda") else None


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    config=None,
    silu: bool = False,
) -> torch.Tensor:
    """``x @ W`` for activations ``[..., K]`` (fp16/bf16, contiguous) and a packed weight -> ``[..., N]``.

    CUDA tensors run the Triton kernels (chosen by :func:`choose_config` unless ``config`` is given);
    CPU tensors run the reference (or the Triton interpreter when ``TRITON_INTERPRET=1`` and a config is
    given). ``zeros``: the packed uint8 zero points (enables the zero-folding small-M mode). ``scratch``:
    zeroed int32 split-K counters (see ``make_scratch``); allocated per call if None. ``silu``: ``W`` is a
    gate/up weight reordered by ``lmkiln.quant.pack.gate_up_interleave`` and the result is
    ``silu(gate) * up [..., N / 2]``, applied by the ``fma`` and ``cuda`` kernels as they write their tiles
    (other kernels: one SiLU·mul launch after the GEMM).
    """
    if x.dtype not in DTYPE_NAMES:
        raise QuantConfigError(f"W4A16 activations must be float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise QuantConfigError(
            f"W4A16 activations must be contiguous (shape {tuple(x.shape)}, strides {x.stride()}); "
            "call .contiguous() first"
        )
    k = qweight.shape[1] * 8 if qweight.dim() == 3 else -1
    if x.shape[-1] != k:
        raise QuantConfigError(f"activation has {x.shape[-1]} features but the packed weight expects K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.device.type != "cuda" and config is None:
        check_w4a16_inputs(x2, qweight, sz, zeros)
        y = w4a16_matmul_ref(x, qweight, sz)
        return gate_up_silu_ref(y) if silu else y
    w4a16 = _triton_mod()
    m, n, _, g = w4a16.check_inputs(x2, qweight, sz, zeros)
    if silu:
        check_gate_up_width(n)
    if m == 0:
        return x.new_empty((*lead, n // 2 if silu else n))
    cfg = config or choose_config(m, n, k, g, x.dtype, x.device)
    if cfg.kind == "gemv" and m != 1:
        cfg = heuristic_config(m, n, k, g)
    if cfg.kind == "cuda" and (m != 1 or x.dtype != torch.float16):  # an explicit config it cannot run
        cfg = heuristic_config(m, n, k, g, fma=x.dtype != torch.bfloat16)
    if cfg.kind in ("fma", "cuda") and zeros is None:  # fma and cuda read the integer zero points
        cfg = heuristic_config(max(m, 16), n, k, g)
    if cfg.zfold and cfg.kind == "mma" and zeros is None:
        cfg = dataclasses.replace(cfg, zfold=False)
    if silu and cfg.kind == "cuda":
        if cfg.num_warps % 2:  # a CTA must hold a gate block and its up block: twice the columns, same warps
            cfg = dataclasses.replace(
                cfg, num_warps=2 * cfg.num_warps, block_n=64 * cfg.num_warps, ksplit=max(1, cfg.ksplit // 2)
            )
        y = w4a16.LAUNCHERS["cuda"](x2, qweight, sz, zeros, cfg, scratch, silu=True)
        return y.reshape(*lead, n // 2)
    if silu and cfg.kind == "fma":
        if cfg.block_n % (2 * GATE_UP_BLOCK):  # a tile must hold a gate block and its up block
            cfg = dataclasses.replace(cfg, block_n=2 * GATE_UP_BLOCK, sub=0)
        return w4a16.fma(x2, qweight, sz, zeros, cfg, scratch, silu=True).reshape(*lead, n // 2)
    y = w4a16.LAUNCHERS[cfg.kind](x2, qweight, sz, zeros, cfg, scratch)
    return (gate_up_silu(y) if silu else y).reshape(*lead, n // 2 if silu else n)


def gate_up_silu(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up [..., I]`` of an interleaved gate/up output ``y [..., 2I]`` (one
    ``kernels.fused.silu_mul`` launch on CUDA, the torch reference on the CPU)."""
    if y.device.type != "cuda":
        return gate_up_silu_ref(y)
    from lmkiln.kernels.fused import silu_mul

    check_gate_up_width(y.shape[-1])
    # one program per row block, reading the interleaved columns in place (sessions 5-8 viewed each 64-column
    # gate/up pair as a row, a program for 32 outputs: 16x slower at batch 256, notes/engine.md session 9)
    return silu_mul(y.contiguous(), interleave=GATE_UP_BLOCK)


@torch.library.custom_op("lmkiln::w4a16_mm", mutates_args=())
def w4a16_mm(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """Registered op: ``x [..., K] @ W -> [..., N]``. ``scratch`` holds split-K counters that every launch
    leaves zeroed again, so the op has no visible side effect."""
    return w4a16_matmul(x, qweight, sz, zeros, scratch if scratch.numel() else None)


@torch.library.custom_op("lmkiln::w4a16_silu_mm", mutates_args=())
def w4a16_silu_mm(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """Registered op: ``silu(gate) * up [..., N / 2]`` of ``x @ W`` for a ``gate_up_interleave``-d ``W``."""
    return w4a16_matmul(x, qweight, sz, zeros, scratch if scratch.numel() else None, silu=True)


@w4a16_silu_mm.register_fake
def _w4a16_silu_mm_fake(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    y = _w4a16_mm_fake(x, qweight, sz, zeros, scratch)
    return y.new_empty((*y.shape[:-1], y.shape[-1] // 2))


@w4a16_mm.register_fake
def _w4a16_mm_fake(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    if qweight.dim() != 3 or x.shape[-1] != qweight.shape[1] * 8:
        raise QuantConfigError(
            f"activation {tuple(x.shape)} does not match packed weight {tuple(qweight.shape)}"
        )
    return x.new_empty((*x.shape[:-1], qweight.shape[0] * PACK_N))
