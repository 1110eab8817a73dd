"""A persistent batch-1 decode kernel: one launch runs a layer's ``o -> gate/up -> down`` and the next layer's
``qkv`` GEMVs (W4A16, packed ``lmkiln-w4-tiled`` weights) with grid barriers in between.

Why: at batch 1 a decode step is ~230 dependent kernels, and each boundary costs a few microseconds in which
the weight stream stops (notes/engine.md, sessions 6-10). Here the ``P`` programs of one launch (all resident
at once) walk a static list of work items per phase, and each program pulls the weights of its *next* item
into L2 (``prefetch.global.L2``) before it computes the current one, also across a barrier. So the HBM
stream runs on while programs wait for the other programs' results.

Phases of one launch (``FIRST``..``LAST``, a grid barrier between two):

0. ``o``: ``o_acc += attn @ W_o`` (split-K partials added with float32 atomics).
1. norm: ``h_mid = fp16(fp16(o_acc) + res)`` and ``xn = rmsnorm(h_mid)``, 64-element blocks by the first
   programs (each reads the whole row for the mean of squares).
2. ``gate/up``: ``act = silu(gate) * up`` of ``xn @ W_gu`` (interleaved gate/up columns,
   ``lmkiln.quant.pack.gate_up_interleave``; ordered split-K: the last program of a tile sums its partials and
   writes the activation).
3. ``down``: ``dn_acc += act @ W_down`` (atomics).
4. norm: ``h = fp16(fp16(dn_acc) + h_mid)`` (the next residual, ``res_out``) and ``xn = rmsnorm(h)`` with the
   next layer's weight, or with ``FINAL`` the model's last norm into ``out``; with ``HEAD`` (first layer)
   ``h`` is the embedding.
5. ``qkv``: ``qkv_acc += xn @ W_qkv`` of the next layer (atomics; the decode attention kernel consumes and
   zeroes it).

Before each barrier a program loads the weight tiles of the first two chunks of its first item of the next
GEMV phase into registers (``PRE``), so the weight stream runs on while the programs wait for each other.

Every rounding is that of the unfused decode path (``kernels.fused.add_rmsnorm(consume=True)``, the ``fma``
GEMV with atomic split-K, its SiLU epilogue), so both give the same tokens up to the order of the float32
atomic sums.

Under ``TRITON_INTERPRET=1`` the programs run one after another, so a barrier would never return: the
launcher runs one launch per phase there (same code, ``FIRST == LAST``, no barriers) and the tests check the
math that way. fp16 only (the F16ASM dequantization of ``w4a16._fma_kernel``); group sizes 64 and 128.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lmkiln.kernels import pdl
from lmkiln.kernels.w4a16 import (
    _deq4_f16x2,
    _finish_tile,
    _h2_sum_f32,
    _hfma2_4,
    _q_minus_z,
    _zpairs,
    _zscale,
)
from triton.language.extra import libdevice

from lmkiln.errors import KernelInputError
from lmkiln.quant.pack import PACK_N

log = logging.getLogger(__name__)

BLOCK_N = 64  # columns per work item (two 32-word panels; gate/up: one gate block and its up block)
ROW_BLOCK = 1024  # elements per step of the RMSNorm prologue
PHASES = ("o", "gate_up", "down", "qkv")
_BN = tl.constexpr(BLOCK_N)  # the same as constexprs for the jit functions
_RB = tl.constexpr(ROW_BLOCK)
_PN = tl.constexpr(PACK_N)


# ------------------------------------------------------------------------------------------------- device


@triton.jit
def _grid_sync(bar_ptr):
    """All programs of the launch meet here (they are all resident: the launcher sizes the grid for that).
    The CTA's writes and atomics are ordered before one release-add per program; one acquire poll loop per
    program, then the CTA goes on."""
    tl.debug_barrier()
    n = tl.num_programs(0)
    cur = tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu") + 1
    while cur < n:
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _hval(acc_ptr, base_ptr, k, mask, ACC_IN: tl.constexpr):
    """The residual at ``k`` as float32: ``fp16(fp16(acc) + base)`` (``ACC_IN``) or ``base``."""
    b = tl.load(base_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if ACC_IN:
        a = tl.load(acc_ptr + k, mask=mask, other=0.0).to(tl.float16).to(tl.float32)
        b = (a + b).to(tl.float16).to(tl.float32)
    return b


@triton.jit
def _norm_phase(
    acc_ptr,
    base_ptr,
    w_ptr,
    xn_ptr,
    h_out_ptr,
    H,
    inv_h,
    eps,
    ACC_IN: tl.constexpr,
    STORE_H: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``h = fp16(fp16(acc) + base)`` (or ``base``) and ``xn = fp16(w * fp16(h * rsqrt(mean(h^2) + eps)))``
    as ``kernels.fused`` rounds them; program ``p`` writes blocks ``p, p + P, ...`` of 64 elements (``h`` too
    where ``STORE_H``), after reading the whole row for the mean."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if pid * 64 < H:
        ss = tl.zeros((_RB,), tl.float32)
        for b0 in range(0, H, _RB):
            k = b0 + tl.arange(0, _RB)
            h = _hval(acc_ptr, base_ptr, k, k < H, ACC_IN)
            ss += h * h
        ms = tl.sum(ss, axis=0) * inv_h
        inv = tl.math.rsqrt(ms + eps) if INTERP else libdevice.rsqrt(ms + eps)
        for b0 in range(pid * 64, H, nprog * 64):
            k = b0 + tl.arange(0, 64)
            m = k < H
            h = _hval(acc_ptr, base_ptr, k, m, ACC_IN)
            if STORE_H:
                tl.store(h_out_ptr + k, h.to(tl.float16), mask=m)
            xn = (h * inv).to(tl.float16).to(tl.float32)
            w = tl.load(w_ptr + k, mask=m, other=0.0).to(tl.float32)
            tl.store(xn_ptr + k, (w * xn).to(tl.float16), mask=m)


@triton.jit
def _prefetch_sz(
    szp_ptr, zp_ptr, N, NCH, NT, per, item, GROUP: tl.constexpr, ROWS_P2: tl.constexpr, PF: tl.constexpr
):
    """Pull the scales and zero points of work item ``item`` into L2 (no value, nothing waits on it)."""
    if PF:
        pid_n = item % NT
        c_lo = (item // NT) * per
        c_hi = tl.minimum(c_lo + per, NCH)
        NGC: tl.constexpr = 128 // GROUP
        GP2: tl.constexpr = ROWS_P2 // 16 * NGC
        g = tl.minimum(c_lo * NGC + tl.arange(0, GP2), c_hi * NGC - 1)
        pdl.prefetch_l2(szp_ptr + g * N + pid_n * _BN)
        pdl.prefetch_l2(szp_ptr + g * N + pid_n * _BN + 32)
        pdl.prefetch_l2(zp_ptr + g * N + pid_n * _BN)


@triton.jit
def _tile_ptrs(qw_ptr, KW, pid_n):
    """``[16, BN]`` word pointers of chunk 0 of column tile ``pid_n`` (chunk c: add ``c * 16 * PACK_N``)."""
    offs_n = pid_n * _BN + tl.arange(0, _BN)
    col = (offs_n // _PN) * (KW * _PN) + offs_n % _PN
    col = tl.max_contiguous(tl.multiple_of(col, _PN), _PN)
    return qw_ptr + col[None, :] + (tl.arange(0, 16) * _PN)[:, None]


@triton.jit
def _preload(qw_ptr, KW, NCH, NT, per, n_items):
    """The weight tiles of the first two chunks of this program's first item (what :func:`_gemv_item` would
    load first), into registers: a ``[16, BN]`` int32 tile each (clamped, zeros where there is no item)."""
    pid = tl.program_id(0)
    item = tl.minimum(pid, n_items - 1)
    pid_n = item % NT
    c_lo = (item // NT) * per
    c_hi = tl.minimum(c_lo + per, NCH)
    w_ptrs = _tile_ptrs(qw_ptr, KW, pid_n)
    w0 = tl.load(w_ptrs + c_lo * 16 * _PN)
    w1 = tl.load(w_ptrs + tl.minimum(c_lo + 1, c_hi - 1) * 16 * _PN)
    return w0, w1


@triton.jit
def _chunk(
    acc,
    w,
    c,
    ok,
    xp_ptr,
    x_ptr,
    sz_ptr,
    szp_ptr,
    zp_ptr,
    N,
    KX,
    offs_n,
    GROUP: tl.constexpr,
    F16ASM: tl.constexpr,
):
    """``acc [16, BN] += x[chunk c] * W[chunk c]`` for the chunk's loaded word tile ``w`` (``ok``: the chunk
    belongs to the item; else its activations count as zero). The ``fma`` kernel's math at one row."""
    rows = tl.arange(0, 16)[:, None]
    SPG: tl.constexpr = GROUP // 32
    NGC: tl.constexpr = 4 // SPG
    if F16ASM:
        z_cols = offs_n[None, :] + 0 * rows
        g0 = c * NGC
        zs0, zf1, ss0 = _zpairs(zp_ptr, szp_ptr, g0, N, z_cols)
        zs2, zf3, ss1, ss2, ss3 = zs0, zf1, ss0, ss0, ss0
        if NGC == 2:
            zs2, zf3, ss2 = _zpairs(zp_ptr, szp_ptr, g0 + 1, N, z_cols)
            ss3 = ss2
        d0, d1, d2, d3 = _deq4_f16x2(w, zs0, zf1, zs2, zf3, ss0, ss1, ss2, ss3)
        i0 = c * 64 + rows
        m = (rows * 0 + ok) != 0
        x0 = tl.load(xp_ptr + i0, mask=m & (2 * i0 < KX), other=0)
        x1 = tl.load(xp_ptr + i0 + 16, mask=m & (2 * i0 + 32 < KX), other=0)
        x2 = tl.load(xp_ptr + i0 + 32, mask=m & (2 * i0 + 64 < KX), other=0)
        x3 = tl.load(xp_ptr + i0 + 48, mask=m & (2 * i0 + 96 < KX), other=0)
        zero = tl.zeros(w.shape, dtype=tl.int32)
        acc += _h2_sum_f32(_hfma2_4(zero, x0, d0, x1, d1, x2, d2, x3, d3))
    else:
        for gi in tl.static_range(NGC):
            z, s = _zscale(sz_ptr, zp_ptr, c * NGC + gi, N, offs_n)
            z = tl.reshape(z, (1, _BN))
            s = tl.reshape(s, (1, _BN))
            part = tl.zeros(w.shape, dtype=tl.float32)
            for tt in tl.static_range(SPG):
                t = gi * SPG + tt
                lo, hi = _q_minus_z(w, t, z)
                k = c * 128 + 32 * t + 2 * rows
                m = ((rows * 0 + ok) != 0) & (k < KX)
                xlo = tl.load(x_ptr + k, mask=m, other=0.0).to(tl.float32)
                xhi = tl.load(x_ptr + k + 1, mask=m, other=0.0).to(tl.float32)
                part += xlo * lo + xhi * hi
            acc += part * s
    return acc


@triton.jit
def _gemv_item(
    x_ptr,
    xp_ptr,
    KX,
    qw_ptr,
    sz_ptr,
    szp_ptr,
    zp_ptr,
    N,
    KW,
    NCH,
    NT,
    per,
    item,
    w0,
    w1,
    GROUP: tl.constexpr,
    F16ASM: tl.constexpr,
    HAS_PRE: tl.constexpr,
):
    """``x[k-range] @ W[k-range, n-tile]`` of one work item (``item = pid_k * NT + pid_n``): float32 ``[BN]``,
    two chunks an iteration; with ``HAS_PRE`` the first two chunks' tiles are ``w0``, ``w1`` (preloaded)."""
    pid_n = item % NT
    c_lo = (item // NT) * per
    c_hi = tl.minimum(c_lo + per, NCH)
    offs_n = pid_n * _BN + tl.arange(0, _BN)
    w_ptrs = _tile_ptrs(qw_ptr, KW, pid_n)
    acc = tl.zeros((16, _BN), dtype=tl.float32)
    start = c_lo
    if HAS_PRE:
        acc = _chunk(acc, w0, c_lo, 1, xp_ptr, x_ptr, sz_ptr, szp_ptr, zp_ptr, N, KX, offs_n, GROUP, F16ASM)
        c1 = tl.minimum(c_lo + 1, c_hi - 1)
        ok1 = (c_lo + 1 < c_hi).to(tl.int32)
        acc = _chunk(acc, w1, c1, ok1, xp_ptr, x_ptr, sz_ptr, szp_ptr, zp_ptr, N, KX, offs_n, GROUP, F16ASM)
        start = c_lo + 2
    for c0 in range(start, c_hi, 2):
        c1 = tl.minimum(c0 + 1, c_hi - 1)
        wa = tl.load(w_ptrs + c0 * 16 * _PN)
        wb = tl.load(w_ptrs + c1 * 16 * _PN)
        acc = _chunk(acc, wa, c0, 1, xp_ptr, x_ptr, sz_ptr, szp_ptr, zp_ptr, N, KX, offs_n, GROUP, F16ASM)
        ok1 = (c0 + 1 < c_hi).to(tl.int32)
        acc = _chunk(acc, wb, c1, ok1, xp_ptr, x_ptr, sz_ptr, szp_ptr, zp_ptr, N, KX, offs_n, GROUP, F16ASM)
    return tl.sum(acc, axis=0)


@triton.jit
def _phase(
    x_ptr,
    xp_ptr,
    KX,
    qw_ptr,
    sz_ptr,
    szp_ptr,
    zp_ptr,
    N,
    KW,
    NCH,
    NT,
    per,
    n_items,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    SPLIT,
    w0,
    w1,
    GROUP: tl.constexpr,
    ROWS_P2: tl.constexpr,
    REDUCE: tl.constexpr,
    F16ASM: tl.constexpr,
    PF: tl.constexpr,
    ACT: tl.constexpr,
    HAS_PRE: tl.constexpr,
):
    """This program's work items ``pid, pid + P, ...`` of one GEMV phase (the first one from the preloaded
    tiles where ``HAS_PRE``). ``REDUCE`` 1: add each partial into the zeroed float32 ``y`` (atomics); 0:
    ordered split-K into ``ws`` / ``cnt`` and the SiLU epilogue into the fp16 ``y`` (``[N / 2]``)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for item in range(pid, n_items, nprog):
        nxt = item + nprog
        if nxt < n_items:
            _prefetch_sz(szp_ptr, zp_ptr, N, NCH, NT, per, nxt, GROUP, ROWS_P2, PF)
        if HAS_PRE and item == pid:
            out = _gemv_item(
                x_ptr,
                xp_ptr,
                KX,
                qw_ptr,
                sz_ptr,
                szp_ptr,
                zp_ptr,
                N,
                KW,
                NCH,
                NT,
                per,
                item,
                w0,
                w1,
                GROUP,
                F16ASM,
                True,
            )
        else:
            out = _gemv_item(
                x_ptr,
                xp_ptr,
                KX,
                qw_ptr,
                sz_ptr,
                szp_ptr,
                zp_ptr,
                N,
                KW,
                NCH,
                NT,
                per,
                item,
                w0,
                w1,
                GROUP,
                F16ASM,
                False,
            )
        pid_n = item % NT
        if REDUCE == 1:
            offs = pid_n * _BN + tl.arange(0, _BN)
            tl.atomic_add(y_ptr + offs, out, sem="relaxed", scope="gpu")
        else:
            HALF: tl.constexpr = _BN // 2
            offs_o = pid_n * HALF + tl.arange(0, HALF)
            _finish_tile(
                tl.reshape(out, (1, _BN)),
                y_ptr + offs_o[None, :],
                offs_o[None, :] >= 0,
                tl.arange(0, _BN)[None, :],
                ws_ptr,
                cnt_ptr,
                pid_n,
                item // NT,
                SPLIT,
                _BN,
                ACT,
                0,
                0,
            )


@triton.jit
def _next(
    qw_ptr,
    szp_ptr,
    zp_ptr,
    N,
    KW,
    NCH,
    NT,
    per,
    n_items,
    GROUP: tl.constexpr,
    ROWS_P2: tl.constexpr,
    PF: tl.constexpr,
    PRE: tl.constexpr,
):
    """Before a barrier: the next GEMV phase's first item, its tiles into registers (``PRE``) and its scales
    into L2 (``PF``)."""
    pid = tl.program_id(0)
    if pid < n_items:
        _prefetch_sz(szp_ptr, zp_ptr, N, NCH, NT, per, pid, GROUP, ROWS_P2, PF)
    if PRE:
        w0, w1 = _preload(qw_ptr, KW, NCH, NT, per, n_items)
    else:
        w0 = tl.zeros((16, _BN), dtype=tl.int32)
        w1 = w0
    return w0, w1


@triton.jit(do_not_specialize=["per_o", "per_gu", "per_dn", "per_q", "s_gu"])
def _layer_kernel(
    attn_ptr,
    attnp_ptr,
    o_qw,
    o_sz,
    o_szp,
    o_zp,
    o_acc,
    nt_o,
    per_o,
    ni_o,
    res_ptr,
    gu_qw,
    gu_sz,
    gu_szp,
    gu_zp,
    post_w,
    act_ptr,
    actp_ptr,
    hmid_ptr,
    ws_ptr,
    cnt_ptr,
    nt_gu,
    per_gu,
    ni_gu,
    s_gu,
    dn_qw,
    dn_sz,
    dn_szp,
    dn_zp,
    dn_acc,
    nt_dn,
    per_dn,
    ni_dn,
    hin_ptr,
    q_qw,
    q_sz,
    q_szp,
    q_zp,
    in_w,
    q_acc,
    res_out,
    out_ptr,
    xn_ptr,
    xnp_ptr,
    nt_q,
    per_q,
    ni_q,
    bar_ptr,
    H,
    I,
    N_Q,
    inv_h,
    eps,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    HEAD: tl.constexpr,
    FINAL: tl.constexpr,
    GROUP: tl.constexpr,
    R_O: tl.constexpr,
    R_GU: tl.constexpr,
    R_DN: tl.constexpr,
    R_Q: tl.constexpr,
    F16ASM: tl.constexpr,
    PF: tl.constexpr,
    PRE: tl.constexpr,
    PDL: tl.constexpr,
    INTERP: tl.constexpr,
    ACT: tl.constexpr,
):
    """Phases ``FIRST..LAST`` of one layer (see the module docstring); a grid barrier between two phases."""
    KW_H = H // 8
    KW_I = I // 8
    NCH_H = H // 128
    NCH_I = I // 128
    # before the wait only weights are read
    if FIRST == 0:
        w0, w1 = _next(o_qw, o_szp, o_zp, H, KW_H, NCH_H, nt_o, per_o, ni_o, GROUP, R_O, PF, PRE)
    pdl.wait(PDL)
    if FIRST <= 0:
        _phase(
            attn_ptr,
            attnp_ptr,
            H,
            o_qw,
            o_sz,
            o_szp,
            o_zp,
            H,
            KW_H,
            NCH_H,
            nt_o,
            per_o,
            ni_o,
            o_acc,
            ws_ptr,
            cnt_ptr,
            1,
            w0,
            w1,
            GROUP,
            R_O,
            1,
            F16ASM,
            PF,
            ACT,
            PRE,
        )
        if LAST >= 1:
            w0, w1 = _next(
                gu_qw, gu_szp, gu_zp, 2 * I, KW_H, NCH_H, nt_gu, per_gu, ni_gu, GROUP, R_GU, PF, PRE
            )
            _grid_sync(bar_ptr)
    if FIRST <= 1 and LAST >= 1:
        _norm_phase(o_acc, res_ptr, post_w, xn_ptr, hmid_ptr, H, inv_h, eps, True, True, INTERP)
        if LAST >= 2:
            if FIRST == 1:
                w0, w1 = _next(
                    gu_qw, gu_szp, gu_zp, 2 * I, KW_H, NCH_H, nt_gu, per_gu, ni_gu, GROUP, R_GU, PF, PRE
                )
            _grid_sync(bar_ptr + 1)
    if FIRST <= 2 and LAST >= 2:
        if FIRST == 2:
            w0, w1 = _next(
                gu_qw, gu_szp, gu_zp, 2 * I, KW_H, NCH_H, nt_gu, per_gu, ni_gu, GROUP, R_GU, PF, PRE
            )
        _phase(
            xn_ptr,
            xnp_ptr,
            H,
            gu_qw,
            gu_sz,
            gu_szp,
            gu_zp,
            2 * I,
            KW_H,
            NCH_H,
            nt_gu,
            per_gu,
            ni_gu,
            act_ptr,
            ws_ptr,
            cnt_ptr,
            s_gu,
            w0,
            w1,
            GROUP,
            R_GU,
            0,
            F16ASM,
            PF,
            ACT,
            PRE,
        )
        if LAST >= 3:
            w0, w1 = _next(dn_qw, dn_szp, dn_zp, H, KW_I, NCH_I, nt_dn, per_dn, ni_dn, GROUP, R_DN, PF, PRE)
            _grid_sync(bar_ptr + 2)
    if FIRST <= 3 and LAST >= 3:
        if FIRST == 3:
            w0, w1 = _next(dn_qw, dn_szp, dn_zp, H, KW_I, NCH_I, nt_dn, per_dn, ni_dn, GROUP, R_DN, PF, PRE)
        _phase(
            act_ptr,
            actp_ptr,
            I,
            dn_qw,
            dn_sz,
            dn_szp,
            dn_zp,
            H,
            KW_I,
            NCH_I,
            nt_dn,
            per_dn,
            ni_dn,
            dn_acc,
            ws_ptr,
            cnt_ptr,
            1,
            w0,
            w1,
            GROUP,
            R_DN,
            1,
            F16ASM,
            PF,
            ACT,
            PRE,
        )
        if LAST >= 4:
            if not FINAL:
                w0, w1 = _next(q_qw, q_szp, q_zp, N_Q, KW_H, NCH_H, nt_q, per_q, ni_q, GROUP, R_Q, PF, PRE)
            _grid_sync(bar_ptr + 3)
    if FIRST <= 4 and LAST >= 4:
        if FIRST == 4 and not FINAL:
            w0, w1 = _next(q_qw, q_szp, q_zp, N_Q, KW_H, NCH_H, nt_q, per_q, ni_q, GROUP, R_Q, PF, PRE)
        if LAST == 4:
            pdl.trigger(PDL)
        if FINAL:
            _norm_phase(dn_acc, hin_ptr, in_w, out_ptr, res_out, H, inv_h, eps, True, False, INTERP)
        else:
            _norm_phase(dn_acc, hin_ptr, in_w, xn_ptr, res_out, H, inv_h, eps, not HEAD, not HEAD, INTERP)
            if LAST >= 5:
                _grid_sync(bar_ptr + 4)
    if FIRST <= 5 and LAST >= 5:
        pdl.trigger(PDL)  # every program is resident by now: the next kernel may take what is left of the SMs
        if FIRST == 5:
            w0, w1 = _next(q_qw, q_szp, q_zp, N_Q, KW_H, NCH_H, nt_q, per_q, ni_q, GROUP, R_Q, PF, PRE)
        _phase(
            xn_ptr,
            xnp_ptr,
            H,
            q_qw,
            q_sz,
            q_szp,
            q_zp,
            N_Q,
            KW_H,
            NCH_H,
            nt_q,
            per_q,
            ni_q,
            q_acc,
            ws_ptr,
            cnt_ptr,
            1,
            w0,
            w1,
            GROUP,
            R_Q,
            1,
            F16ASM,
            PF,
            ACT,
            PRE,
        )


# --------------------------------------------------------------------------------------------------- host


@dataclass(frozen=True)
class Split:
    """Work items of one GEMV phase: ``n_tiles`` column tiles x ``split`` K ranges of ``per`` chunks."""

    n_tiles: int
    split: int
    per: int

    @property
    def items(self) -> int:
        return self.n_tiles * self.split

    @property
    def rows_p2(self) -> int:
        return triton.next_power_of_2(self.per * 16)


def plan_split(n: int, k: int, programs: int, overhead: float = 1.0, max_split: int = 64) -> Split:
    """The split of an ``[k, n]`` GEMV over ``programs`` that minimises the busiest program's work: rounds of
    items x (chunks per item + ``overhead``), fewer items on ties."""
    n_tiles, n_chunks = n // BLOCK_N, k // 128
    best: tuple[float, int] | None = None
    for s in range(1, min(n_chunks, max_split) + 1):
        per = -(-n_chunks // s)
        s_eff = -(-n_chunks // per)  # splits that actually get chunks
        if s_eff != s:
            continue
        cost = -(-(n_tiles * s) // programs) * (per + overhead)
        if best is None or cost < best[0]:
            best = (cost, s)
    s = best[1] if best else 1
    return Split(n_tiles, s, -(-n_chunks // s))


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    qkv: int
    group: int


@functools.lru_cache(maxsize=16)
def _occupancy(device_index: int, n_regs: int, shared: int, num_warps: int) -> int:
    """CTAs of a kernel that fit one SM at once (registers, shared memory, threads, the 32-block limit)."""
    props = torch.cuda.get_device_properties(device_index)
    threads = 32 * num_warps
    regs_per_cta = -(-max(n_regs, 1) * threads // 256) * 256  # registers are allocated per warp in 256s
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_cta
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem // shared if shared else 32
    return max(0, min(by_regs, by_threads, by_smem, 32))


class LayerKernel:
    """Launch plan of :func:`_layer_kernel` for one model shape on one device: the grid ``P`` (``ctas_per_sm``
    x SMs, never more than fit at once), each phase's split, the ordered-reduction buffers of gate/up."""

    def __init__(
        self,
        shape: LayerShape,
        device: torch.device,
        ctas_per_sm: int = 4,
        num_warps: int = 2,
        prefetch: bool = True,
        preload: bool = True,
    ) -> None:
        h, i, q, g = shape.hidden, shape.intermediate, shape.qkv, shape.group
        for name, v in (("hidden", h), ("intermediate", i)):
            if v % 128:
                raise KernelInputError(f"persistent decode: {name} size {v} must be a multiple of 128")
        for name, v in (("qkv", q), ("2 x intermediate", 2 * i), ("hidden", h)):
            if v % BLOCK_N:
                raise KernelInputError(f"persistent decode: {name} width {v} must be a multiple of {BLOCK_N}")
        if g not in (64, 128):
            raise KernelInputError(f"persistent decode: group size {g} must be 64 or 128")
        self.shape, self.device, self.num_warps, self.preload = shape, device, num_warps, preload
        self.interp = pdl.interpreting()
        self.f16asm = not self.interp
        self.prefetch = prefetch and not self.interp
        sms = 4 if self.interp else torch.cuda.get_device_properties(device).multi_processor_count
        self.programs = sms * ctas_per_sm
        p = self.programs
        self.o, self.gu = plan_split(h, h, p), plan_split(2 * i, h, p)
        self.dn, self.q = plan_split(h, i, p), plan_split(q, h, p)
        self.ws = torch.empty(self.gu.items * BLOCK_N, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(self.gu.n_tiles, dtype=torch.int32, device=device)
        self.xn = torch.empty(h, dtype=torch.float16, device=device)  # a norm phase's output
        self._checked: set[tuple] = set()

    def describe(self) -> dict:
        return {
            "programs": self.programs,
            "num_warps": self.num_warps,
            "preload": self.preload,
            "prefetch": self.prefetch,
            **{
                f"{n}_split": s.split for n, s in zip(PHASES, (self.o, self.gu, self.dn, self.q), strict=True)
            },
            **{
                f"{n}_items": s.items for n, s in zip(PHASES, (self.o, self.gu, self.dn, self.q), strict=True)
            },
        }

    def launch(self, *, first: int, last: int, final: bool, head: bool, eps: float, **kw) -> None:
        """One launch of phases ``first``..``last`` (0..5, see the module docstring; the interpreter gets one
        launch per phase). ``kw``: the tensors (``attn``, ``res``, ``post_w``, ``act``, ``hmid``, ``hin``,
        ``in_w``, ``q_acc``, ``res_out``, ``out``, ``o_acc``, ``dn_acc``, ``bars`` (5 zeroed int32)) and the
        ``(qweight, sz, zeros)`` triples ``o``, ``gu``, ``dn``, ``qkv``; None where a phase does not run."""
        if self.interp and first != last:
            for ph in range(first, last + 1):
                self.launch(first=ph, last=ph, final=final, head=head, eps=eps, **kw)
            return
        sh = self.shape
        dummy = kw["o_acc"]

        def t(name: str) -> torch.Tensor:
            v = kw.get(name)
            return dummy if v is None else v

        def i32(name: str) -> torch.Tensor:
            v = kw.get(name)
            return v.view(torch.int32) if v is not None and v.dtype == torch.float16 else dummy

        def w(name: str) -> tuple[torch.Tensor, ...]:
            trip = kw.get(name) or (dummy, dummy, dummy)
            sz32 = trip[1].view(torch.int32) if trip[1].dtype == torch.float16 else dummy
            return trip[0], trip[1], sz32, trip[2]

        on = pdl.enabled(self.device)
        o, gu, dn, q = self.o, self.gu, self.dn, self.q
        args = (
            t("attn"),
            i32("attn"),
            *w("o"),
            t("o_acc"),
            o.n_tiles,
            o.per,
            o.items,
            t("res"),
            *w("gu"),
            t("post_w"),
            t("act"),
            i32("act"),
            t("hmid"),
            self.ws,
            self.cnt,
            gu.n_tiles,
            gu.per,
            gu.items,
            gu.split,
            *w("dn"),
            t("dn_acc"),
            dn.n_tiles,
            dn.per,
            dn.items,
            t("hin"),
            *w("qkv"),
            t("in_w"),
            t("q_acc"),
            t("res_out"),
            t("out"),
            self.xn,
            self.xn.view(torch.int32),
            q.n_tiles,
            q.per,
            q.items,
            t("bars"),
            sh.hidden,
            sh.intermediate,
            sh.qkv,
            1.0 / sh.hidden,
            eps,
        )
        meta = dict(
            FIRST=first,
            LAST=last,
            HEAD=head,
            FINAL=final,
            GROUP=sh.group,
            R_O=o.rows_p2,
            R_GU=gu.rows_p2,
            R_DN=dn.rows_p2,
            R_Q=q.rows_p2,
            F16ASM=self.f16asm,
            PF=self.prefetch,
            PRE=self.preload,
            PDL=on,
            INTERP=self.interp,
            ACT=2 if self.interp else 1,
            num_warps=self.num_warps,
        )
        opts = {} if self.interp else {"enable_fp_fusion": False, **pdl.launch_opts(on)}
        key = (first, last, head, final, on)
        if first != last and key not in self._checked:
            self._check_resident(args, meta, opts)
            self._checked.add(key)
        _layer_kernel[(self.programs,)](*args, **meta, **opts)

    def _check_resident(self, args: tuple, meta: dict, opts: dict) -> None:
        """A launch with barriers must have every program resident at once, or it never returns: compile it
        first and refuse a grid larger than the SMs hold."""
        compiled = _layer_kernel.warmup(*args, **meta, **opts, grid=(self.programs,))
        compiled._init_handles()  # loads the module: fills n_regs
        n_regs, shared = int(compiled.n_regs), int(compiled.metadata.shared)
        per_sm = _occupancy(self.device.index or 0, n_regs, shared, self.num_warps)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        log.info(
            "persistent decode kernel: %d registers, %d B shared, %d CTAs/SM fit, grid %d",
            n_regs,
            shared,
            per_sm,
            self.programs,
        )
        if per_sm * sms < self.programs:
            raise KernelInputError(
                f"persistent decode: a grid of {self.programs} programs needs {self.programs / sms:.0f} CTAs "
                f"per SM but only {per_sm} fit ({n_regs} registers x {32 * self.num_warps} threads, "
                f"{shared} B shared memory); lower ctas_per_sm"
            )
