"""Batch-1 W4A16 GEMV whose weights stream into shared memory before its PDL wait (Gluon, Hopper).

The decode step's GEMVs are dependent kernels: each may only read its activation after the previous kernel
has finished (``griddepcontrol.wait``, :mod:`lmkiln.kernels.pdl`). The weights, scales and zero points never
change, so nothing stops a program from fetching them before that wait. The Triton ``fma`` kernel can only
prefetch them into L2 there (its loads land in registers, and a register preload halved its occupancy,
notes/engine.md, session 8). Here every program copies its whole weight slice (``MAXC`` 128-row chunks of
``BLOCK_N`` columns), with its scales and zero points, into shared memory with ``cp.async`` first, then
waits, then reads the activation and computes from shared memory, chunk by chunk as the copies land.

``pipe=True`` (session 13): chunk j is computed as soon as its copy group has landed, the later ones still
in flight, and the activation pairs are read once with plain loads into shared memory after the wait. Both
forms lose to the Triton ``fma`` kernel (scripts/experiments/gemv_ablation.py).

Same math as ``w4a16._fma_kernel`` at ``BLOCK_M = 1`` with ``F16ASM`` and group size 128: every word becomes
four half2 ``(q - z) * s`` and meets its activation pairs in ``fma.rn.f16x2``; half2 partials go to a float32
accumulator per word-row; the split-K partials are added with ``red.global.add.f32`` into a zeroed float32
output (``reduce="atomic"``).
"""

from __future__ import annotations

import torch
import triton
from lmkiln.kernels import pdl
from lmkiln.kernels.w4a16 import PACK_K, PACK_N, check_inputs
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

from lmkiln.errors import QuantConfigError


@gluon.jit
def _griddep(OP: gl.constexpr, PDL: gl.constexpr):
    if PDL:
        gl.inline_asm_elementwise(
            OP + "; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1
        )


@gluon.jit
def _deq4(w, zs, zf, s):
    """One word -> four packed half2 ``(q - z) * s`` (``w4a16._deq4_f16x2`` with one group per word)."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u, a, b, c, d, k;
        mov.b32 k, 0x2C002C00;
        lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 b, $4, 0x00F000F0, 0x64006400, 0xEA;
        shr.u32 u, $4, 8;
        lop3.b32 c, u, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 d, u, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 a, a, $5;
        fma.rn.f16x2 b, b, k, $6;
        sub.f16x2 c, c, $5;
        fma.rn.f16x2 d, d, k, $6;
        mul.rn.f16x2 $0, a, $7;
        mul.rn.f16x2 $1, b, $7;
        mul.rn.f16x2 $2, c, $7;
        mul.rn.f16x2 $3, d, $7;
        }""",
        constraints="=r,=r,=r,=r,r,r,r,r",
        args=[w, zs, zf, s],
        dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _dot4_f32(x0, d0, x1, d1, x2, d2, x3, d3):
    """``x0*d0 + x1*d1 + x2*d2 + x3*d3`` on packed half2, then ``lo + hi`` in float32."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a;
        .reg .b16 l, h;
        .reg .f32 fl, fh;
        mul.rn.f16x2 a, $1, $2;
        fma.rn.f16x2 a, $3, $4, a;
        fma.rn.f16x2 a, $5, $6, a;
        fma.rn.f16x2 a, $7, $8, a;
        mov.b32 {l, h}, a;
        cvt.f32.f16 fl, l;
        cvt.f32.f16 fh, h;
        add.f32 $0, fl, fh;
        }""",
        constraints="=f,r,r,r,r,r,r,r,r",
        args=[x0, d0, x1, d1, x2, d2, x3, d3],
        dtype=gl.float32,
        is_pure=True,
        pack=1,
    )


@gluon.jit(do_not_specialize=["n_chunks", "SPLIT_K"])
def _fma_smem_kernel(
    xp_ptr,  # int32 view of the fp16 activation [1, K]: (x[k], x[k+1]) pairs
    qw_ptr,
    szp_ptr,  # int32 view of the (s, m) fp16 pairs [K/G, N]: s in the low half
    zp_ptr,  # uint8 zero points [K/G, N]
    y_ptr,  # float32 [1, N], zeroed: the programs add into it
    N,
    KW,
    n_chunks,
    SPLIT_K,
    BLOCK_N: gl.constexpr,
    MAXC: gl.constexpr,
    PACK_N_: gl.constexpr,
    NW: gl.constexpr,
    PDL: gl.constexpr,
    PRE: gl.constexpr = True,
    PIPE: gl.constexpr = False,
):
    TPN: gl.constexpr = BLOCK_N // 4  # threads along a word-row, 16 bytes (4 columns) each
    TPR: gl.constexpr = 32 // TPN
    SUB: gl.constexpr = TPR * NW  # word-rows of a sub-tile
    U: gl.constexpr = 16 // SUB  # sub-tiles of a chunk (16 word-rows = 128 K rows)
    L: gl.constexpr = gl.BlockedLayout([1, 4], [TPR, TPN], [NW, 1], [1, 0])
    LR: gl.constexpr = gl.SliceLayout(1, L)
    LC: gl.constexpr = gl.SliceLayout(0, L)
    S2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # of a [16, BN] chunk
    S1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # of a [BN] row

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    per = gl.cdiv(n_chunks, SPLIT_K)
    c_lo = pid_k * per
    c_hi = gl.minimum(c_lo + per, n_chunks)
    rows = gl.arange(0, SUB, layout=LR)
    cols = gl.arange(0, BLOCK_N, layout=LC)
    offs_n = pid_n * BLOCK_N + cols
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    col = gl.max_contiguous(gl.multiple_of(col, PACK_N_), PACK_N_)
    rows16 = gl.arange(0, 16, layout=LR)
    w_ptrs = qw_ptr + col[None, :] + (rows16 * PACK_N_)[:, None]  # [16, BN]: a chunk, U sub-tiles a thread

    w_s = gl.allocate_shared_memory(gl.int32, [MAXC, 16, BLOCK_N], S2)
    s_s = gl.allocate_shared_memory(gl.int32, [MAXC, BLOCK_N], S1)
    z_s = gl.allocate_shared_memory(gl.uint8, [MAXC, BLOCK_N], S1)
    if not PRE:  # (A/B: the copies after the wait)
        _griddep("griddepcontrol.wait", PDL)
    # Before the wait: the whole slice, one commit group per chunk. Past the end of the split, the last chunk
    # again (an L2 hit), with zero activations below.
    for j in gl.static_range(MAXC):
        c = gl.minimum(c_lo + j, c_hi - 1)
        cp.async_copy_global_to_shared(w_s.index(j), w_ptrs + c * 16 * PACK_N_)
        cp.async_copy_global_to_shared(s_s.index(j), szp_ptr + c * N + offs_n)
        cp.async_copy_global_to_shared(z_s.index(j), zp_ptr + c * N + offs_n)
        cp.commit_group()
    if PRE:
        _griddep("griddepcontrol.wait", PDL)
    if PIPE:
        # chunk j is computed as soon as its copy group has landed (the later ones still in flight); the
        # activation pairs of the slice are read once, with plain loads, into shared memory (zeros past the
        # end of the split); the first chunk's barrier publishes them
        MAXC_P2A: gl.constexpr = triton.next_power_of_2(MAXC)
        XPTA: gl.constexpr = max(1, MAXC_P2A * 64 // (32 * NW))
        LXA: gl.constexpr = gl.BlockedLayout([XPTA], [32], [NW], [0])
        xa_s = gl.allocate_shared_memory(gl.int32, [MAXC_P2A * 64], S1)
        xoa = c_lo * 64 + gl.arange(0, MAXC_P2A * 64, layout=LXA)
        xa_s.store(gl.load(xp_ptr + xoa, mask=xoa < c_hi * 64, other=0))
        acc = gl.zeros([SUB, BLOCK_N], gl.float32, layout=L)
        for j in gl.static_range(MAXC):
            cp.wait_group(MAXC - 1 - j)
            gl.thread_barrier()
            z = z_s.index(j).load(LC).to(gl.int32)
            zs = z + 0x6400  # fp16 1024 + z
            zf = z * 16 + 0xD400  # fp16 -(64 + z)
            sv = s_s.index(j).load(LC) & 0xFFFF
            zs2 = (zs | (zs << 16))[None, :] + rows[:, None] * 0
            zf2 = (zf | (zf << 16))[None, :] + rows[:, None] * 0
            s2 = (sv | (sv << 16))[None, :] + rows[:, None] * 0
            for u in gl.static_range(U):
                w = w_s.index(j).slice(u * SUB, SUB).load(L)
                d0, d1, d2, d3 = _deq4(w, zs2, zf2, s2)
                x0 = xa_s.slice(j * 64 + u * SUB, SUB).load(LR)[:, None] + cols[None, :] * 0
                x1 = xa_s.slice(j * 64 + u * SUB + 16, SUB).load(LR)[:, None] + cols[None, :] * 0
                x2 = xa_s.slice(j * 64 + u * SUB + 32, SUB).load(LR)[:, None] + cols[None, :] * 0
                x3 = xa_s.slice(j * 64 + u * SUB + 48, SUB).load(LR)[:, None] + cols[None, :] * 0
                acc += _dot4_f32(x0, d0, x1, d1, x2, d2, x3, d3)
        out = gl.sum(acc, axis=0)
        _griddep("griddepcontrol.launch_dependents", PDL)
        gl.atomic_add(y_ptr + offs_n, out, sem="relaxed", scope="gpu")
        return
    # The activation pairs of the slice, one more group (a read of x a sub-tile would be one L2 round trip
    # after each chunk's barrier); past the end of the split, zeros.
    MAXC_P2: gl.constexpr = triton.next_power_of_2(MAXC)
    XPT: gl.constexpr = max(1, MAXC_P2 * 64 // (32 * NW))
    LX: gl.constexpr = gl.BlockedLayout([XPT], [32], [NW], [0])
    x_s = gl.allocate_shared_memory(gl.int32, [MAXC_P2 * 64], S1)
    xo = c_lo * 64 + gl.arange(0, MAXC_P2 * 64, layout=LX)
    cp.async_copy_global_to_shared(x_s, xp_ptr + xo, mask=xo < c_hi * 64)
    cp.commit_group()
    cp.wait_group(0)
    gl.thread_barrier()

    acc = gl.zeros([SUB, BLOCK_N], gl.float32, layout=L)
    for j in gl.static_range(MAXC):
        z = z_s.index(j).load(LC).to(gl.int32)
        zs = z + 0x6400  # fp16 1024 + z
        zf = z * 16 + 0xD400  # fp16 -(64 + z)
        sv = s_s.index(j).load(LC) & 0xFFFF
        zs2 = (zs | (zs << 16))[None, :] + rows[:, None] * 0
        zf2 = (zf | (zf << 16))[None, :] + rows[:, None] * 0
        s2 = (sv | (sv << 16))[None, :] + rows[:, None] * 0
        for u in gl.static_range(U):
            w = w_s.index(j).slice(u * SUB, SUB).load(L)
            d0, d1, d2, d3 = _deq4(w, zs2, zf2, s2)
            x0 = x_s.slice(j * 64 + u * SUB, SUB).load(LR)[:, None] + cols[None, :] * 0
            x1 = x_s.slice(j * 64 + u * SUB + 16, SUB).load(LR)[:, None] + cols[None, :] * 0
            x2 = x_s.slice(j * 64 + u * SUB + 32, SUB).load(LR)[:, None] + cols[None, :] * 0
            x3 = x_s.slice(j * 64 + u * SUB + 48, SUB).load(LR)[:, None] + cols[None, :] * 0
            acc += _dot4_f32(x0, d0, x1, d1, x2, d2, x3, d3)
    out = gl.sum(acc, axis=0)
    _griddep("griddepcontrol.launch_dependents", PDL)
    gl.atomic_add(y_ptr + offs_n, out, sem="relaxed", scope="gpu")


def max_chunks(k: int, split_k: int) -> int:
    """Chunks (128 rows) a program of a ``split_k`` launch holds in shared memory."""
    n_chunks = k // PACK_K
    return triton.cdiv(n_chunks, max(1, min(split_k, n_chunks)))


def fma_smem(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
    block_n: int = 64,
    num_warps: int = 2,
    split_k: int = 8,
    pre: bool = True,
    pipe: bool = False,
) -> torch.Tensor:
    """``out += x @ W`` for one fp16 row ``x [1, K]``, group size 128, ``out`` a zeroed float32 ``[1, N]``
    (the split-K programs add into it, as ``w4a16.fma(..., reduce="atomic")``). CUDA, sm_90+."""
    m, n, k, g = check_inputs(x, qweight, sz, zeros)
    if m != 1 or x.dtype != torch.float16 or g != 128 or x.device.type != "cuda":
        raise QuantConfigError(
            f"fma_smem: one fp16 row on CUDA with group size 128, got M={m}, {x.dtype}, G={g} on {x.device}"
        )
    if out.dtype != torch.float32 or tuple(out.shape) != (1, n) or not out.is_contiguous():
        raise QuantConfigError(f"fma_smem adds into `out`: a zeroed float32 [1, {n}], got {out.dtype} "
                               f"{list(out.shape)}")
    if block_n not in (64, 128) or n % block_n or 32 % (block_n // 4) or num_warps not in (1, 2, 4):
        raise QuantConfigError(
            f"fma_smem: block_n {block_n} (64 or 128, dividing N={n}), num_warps {num_warps} (1, 2 or 4)"
        )
    if (16 // ((32 // (block_n // 4)) * num_warps)) < 1:
        raise QuantConfigError(f"fma_smem: block_n {block_n} x {num_warps} warps covers more than a chunk")
    n_chunks = k // PACK_K
    split = max(1, min(split_k, n_chunks))
    if x.data_ptr() % 4:
        x = x.clone()
    on = pdl.enabled(x.device)
    _fma_smem_kernel[(n // block_n, split)](
        x.view(torch.int32),
        qweight,
        sz.view(torch.int32),
        zeros,
        out,
        n,
        k // 8,
        n_chunks,
        split,
        BLOCK_N=block_n,
        MAXC=triton.cdiv(n_chunks, split),
        PACK_N_=PACK_N,
        NW=num_warps,
        PDL=on,
        PRE=pre,
        PIPE=pipe,
        num_warps=num_warps,
        **pdl.launch_opts(on),
    )
    return out
