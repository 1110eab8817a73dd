"""Programmatic dependent launch (PDL) for the decode step's kernels (Hopper and later).

A decode step is ~300 short kernels in one CUDA graph. Without PDL each one starts only after the previous one
has fully finished and its launch has gone through, so every boundary leaves the GPU idle for a few
microseconds, and every GEMV starts its weight stream from nothing. With PDL (``launch_pdl=True``) a kernel's
programs may be resident while the previous kernel is still running:

* every kernel launched this way calls :func:`wait` (``griddepcontrol.wait``) before it reads or writes
  anything another kernel touches; what comes before the wait may only read the weights, which no kernel
  writes (the ``fma`` GEMV prefetches the start of its weight slice into L2 there), and data that kernels
  finished before the previous one wrote, where the previous kernel triggers only after its own wait (then
  every kernel before it has finished): the CUDA batch-1 decode attention (``cuda/decode_attention.cu``)
  reads the block table, older keys and values and cos / sin there, after the qkv GEMV;
* :func:`trigger` (``griddepcontrol.launch_dependents``) lets the next kernel launch. Short kernels
  (norm, rotary, KV write, attention) trigger at their start; the GEMVs after their main loop, so the next
  GEMV's prefetch overlaps only this one's split-K tail and the short kernels between them.

The next kernel's wait returns only when this kernel has finished and its writes are visible, so the order of
results is that of a plain stream; only the prologues overlap. A kernel launched without PDL waits for the
previous one as usual, and a ``griddepcontrol`` instruction in a kernel launched without PDL does nothing.

``LMKILN_PDL=0`` turns it off (A/B); it is on where the device supports it (CUDA, compute capability >= 9,
not the interpreter), except for the tensor-core ``mma_t`` GEMM (:func:`mma_t_enabled`;
``LMKILN_PDL_MMA_T=1`` turns it on there). A GEMV prefetches up to its tuned ``KernelConfig.prefetch_mb``
(else :data:`DEFAULT_PREFETCH_MB`) before its wait; ``LMKILN_PDL_PREFETCH_MB`` overrides that for all (0 =
off).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from lmkiln.errors import KernelInputError

PDL_ENV = "LMKILN_PDL"
PREFETCH_ENV = "LMKILN_PDL_PREFETCH_MB"
MMA_T_ENV = "LMKILN_PDL_MMA_T"
# H100, 7B shape, batch 1 (notes/engine.md, session 6): the 128 linears as one graph took 1.885 ms without
# PDL, 1.795 with PDL and no prefetch, 1.754 / 1.764 / 1.811 / 1.858 with 2 / 4 / 8 / 32 MiB; a decode step
# 2.416 ms with 8 MiB, 2.317 with 2.
DEFAULT_PREFETCH_MB = 2.0


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (read at every launch, so a benchmark can A/B it)."""
    choice = os.environ.get(PDL_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise KernelInputError(f"{PDL_ENV}={choice!r}: use 0 (off), 1 (on where supported) or leave it unset")
    if choice == "0" or device.type != "cuda" or interpreting():
        return False
    return _supports_pdl(device)


def mma_t_enabled(device: torch.device) -> bool:
    """Whether the swapped-operand tensor-core GEMM (``w4a16.mma_t``) launches with PDL: only with
    ``LMKILN_PDL_MMA_T=1`` (and PDL on). Its programs hold ~155 registers and 30-40 KiB of shared memory
    each; launched early they sat resident through the previous kernel. H100, 7B int4 decode steps
    (notes/engine.md, session 10), ms, with / without: batch 4 3.40 / 3.00, 16 4.08 / 3.46, 64 6.27 / 6.08,
    256 16.76 / 16.93."""
    choice = os.environ.get(MMA_T_ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise KernelInputError(f"{MMA_T_ENV}={choice!r}: use 1 (on), 0 (off, the default) or leave it unset")
    return choice == "1" and enabled(device)


@functools.lru_cache(maxsize=8)
def _supports_pdl(device: torch.device) -> bool:
    """Compute capability >= 9 (asked once per device: :func:`enabled` runs at every launch)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_opts(on: bool) -> dict[str, bool]:
    """The launch keyword for a kernel whose ``PDL`` constexpr is ``on``."""
    return {"launch_pdl": True} if on else {}


def prefetch_bytes(tuned_mb: float = -1.0) -> int:
    """The L2 prefetch budget of one GEMV launched with PDL: ``LMKILN_PDL_PREFETCH_MB`` where set (an A/B
    override for every GEMV), else the shape's tuned ``tuned_mb`` (``KernelConfig.prefetch_mb``) where >= 0,
    else :data:`DEFAULT_PREFETCH_MB`."""
    raw = os.environ.get(PREFETCH_ENV, "").strip()
    try:
        mb = float(raw) if raw else tuned_mb if tuned_mb >= 0 else DEFAULT_PREFETCH_MB
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise KernelInputError(f"{PREFETCH_ENV}={raw!r}: give the prefetch budget in MiB, a number >= 0")
    return int(mb * (1 << 20))


@contextlib.contextmanager
def setting(variant: str) -> Iterator[None]:
    """For A/B benchmarks: within the block, ``"off"`` turns PDL off and a number turns it on with that
    prefetch budget in MiB (the environment is restored afterwards). Launches read it, graphs keep it."""
    if variant == "off":
        values = {PDL_ENV: "0"}
    else:
        try:
            mb = float(variant)
        except ValueError:
            mb = -1.0
        if not mb >= 0:
            raise KernelInputError(f"PDL variant {variant!r}: use 'off' or a prefetch budget in MiB (>= 0)")
        values = {PDL_ENV: "1", PREFETCH_ENV: variant}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished and its writes are visible."""
    if PDL:
        tl.inline_asm_elementwise(
            "griddepcontrol.wait; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def trigger(PDL: tl.constexpr):
    """Let the next kernel launch (once every program of this one has triggered or exited)."""
    if PDL:
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
            pack=1,
        )


@triton.jit
def enter(PDL: tl.constexpr):
    """The start of a short kernel: let the next kernel launch, then wait for the previous one."""
    trigger(PDL)
    wait(PDL)


@triton.jit
def prefetch_l2(ptrs):
    """``prefetch.global.L2`` of the 128-byte line at each pointer (no value, nothing waits on it)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )
