"""A persistent batch-1 decode kernel: one launch runs a layer's ``o -> gate/up -> down`` and the next layer's
``qkv`` GEMVs (W4A16, packed ``lmkiln-w4-tiled`` weights) with grid barriers in between.

Why: at batch 1 a decode step is ~230 dependent kernels, and each boundary costs a few microseconds in which
the weight stream stops (notes/engine.md, sessions 6-10). Here the ``P`` programs of one launch (all resident
at once) walk a static list of work items per phase, and each program pulls the weights of its *next* item
into L2 (``prefetch.global.L2``) before it computes the current one, also across a barrier. So the HBM
stream runs on while programs wait for the other programs' results.

Phases of one launch (``FIRST``..3):

0. ``o``: ``o_acc += attn @ W_o`` (split-K partials added with float32 atomics).
1. ``gate/up``: every program computes ``h_mid = fp16(fp16(o_acc) + res)`` over the whole row for the RMSNorm
   (programs store slices of ``h_mid``), then ``act = silu(gate) * up`` of ``rmsnorm(h_mid) @ W_gu``
   (interleaved gate/up columns, ``lmkiln.quant.pack.gate_up_interleave``; ordered split-K: the last program
   of a tile sums its partials and writes the activation).
2. ``down``: ``dn_acc += act @ W_down`` (atomics).
3. ``qkv``: ``h = fp16(fp16(dn_acc) + h_mid)`` (stored as the next residual), ``qkv_acc += rmsnorm(h) @
   W_qkv`` of the next layer (atomics; the decode attention kernel consumes and zeroes it), or with ``FINAL``
   the model's last norm ``out = rmsnorm(h)``. A launch with ``FIRST = 3`` and no accumulator (``HEAD``) is
   the first layer's norm + qkv on the embedding.

Every rounding is that of the unfused decode path (``kernels.fused.add_rmsnorm(consume=True)``, the ``fma``
GEMV with atomic split-K, its SiLU epilogue), so both give the same tokens up to the order of the float32
atomic sums. The activations are rounded to fp16 where they are read ("on the fly"), so no phase needs an
extra barrier for a normalized copy.

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
def _rstd(
    acc_ptr, base_ptr, out_ptr, H, inv_h, eps, ACC_IN: tl.constexpr, STORE: tl.constexpr, INTERP: tl.constexpr
):
    """``rsqrt(mean(h^2) + eps)`` of the residual row ``h`` (every program reads all of it). ``STORE``: the
    programs also write ``h`` (fp16) to ``out_ptr``, block ``b`` by program ``b % P``."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ss = tl.zeros((_RB,), tl.float32)
    for b0 in range(0, H, _RB):
        k = b0 + tl.arange(0, _RB)
        m = k < H
        h = _hval(acc_ptr, base_ptr, k, m, ACC_IN)
        ss += h * h
        if STORE:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if (b0 // _RB) % nprog == pid:
                tl.store(out_ptr + k, h.to(tl.float16), mask=m)
    ms = tl.sum(ss, axis=0) * inv_h
    return tl.math.rsqrt(ms + eps) if INTERP else libdevice.rsqrt(ms + eps)


@triton.jit
def _xval(x_ptr, acc_ptr, w_ptr, inv, k, KX, ok, XMODE: tl.constexpr, ACC_IN: tl.constexpr):
    """The GEMV input at ``k`` as float32 (an fp16 value): 0, the fp16 vector ``x``; 1, the RMSNorm of the
    residual, ``fp16(w * fp16(h * inv))`` as ``kernels.fused`` rounds it. Zero for ``k >= KX`` (padded K) and
    where ``ok`` is false."""
    m = (k < KX) & ok
    if XMODE == 0:
        return tl.load(x_ptr + k, mask=m, other=0.0).to(tl.float32)
    else:
        h = _hval(acc_ptr, x_ptr, k, m, ACC_IN)
        xn = (h * inv).to(tl.float16).to(tl.float32)
        w = tl.load(w_ptr + k, mask=m, other=0.0).to(tl.float32)
        return (w * xn).to(tl.float16).to(tl.float32)


@triton.jit
def _xpair(x_ptr, xp_ptr, acc_ptr, w_ptr, inv, i, KX, ok, XMODE: tl.constexpr, ACC_IN: tl.constexpr):
    """``(x[2i], x[2i+1])`` as one packed half2 (int32), the ``fma`` kernel's activation operand."""
    if XMODE == 0:
        return tl.load(xp_ptr + i, mask=(2 * i < KX) & ok, other=0)
    else:
        k2 = (2 * i)[:, :, None] + tl.arange(0, 2)[None, None, :]  # the pair as one vector load per operand
        x2 = _xval(x_ptr, acc_ptr, w_ptr, inv, k2, KX, ok[:, :, None], XMODE, ACC_IN)
        lo, hi = tl.split(x2.to(tl.float16))
        lo16 = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(tl.int16, bitcast=True).to(tl.int32)
        return lo16 | (hi16 << 16)


@triton.jit
def _prefetch_item(
    qw_ptr,
    szp_ptr,
    zp_ptr,
    N,
    KW,
    NCH,
    NT,
    per,
    item,
    GROUP: tl.constexpr,
    ROWS_P2: tl.constexpr,
    PF: tl.constexpr,
):
    """Pull work item ``item``'s weight rows, scales and zero points into L2 (no value, nothing waits)."""
    if PF:
        pid_n = item % NT
        pid_k = item // NT
        c_lo = pid_k * per
        c_hi = tl.minimum(c_lo + per, NCH)
        NP: tl.constexpr = _BN // _PN
        li = tl.arange(0, NP * ROWS_P2)
        r = tl.minimum(c_lo * 16 + li % ROWS_P2, c_hi * 16 - 1)
        pdl.prefetch_l2(qw_ptr + (pid_n * NP + li // ROWS_P2) * (KW * _PN) + r * _PN)
        NGC: tl.constexpr = 128 // GROUP
        GP2: tl.constexpr = ROWS_P2 // 16 * NGC
        gi = tl.arange(0, GP2)
        g = tl.minimum(c_lo * NGC + gi, c_hi * NGC - 1)
        pdl.prefetch_l2(szp_ptr + g * N + pid_n * _BN)
        pdl.prefetch_l2(szp_ptr + g * N + pid_n * _BN + 32)
        pdl.prefetch_l2(zp_ptr + g * N + pid_n * _BN)


@triton.jit
def _gemv_item(
    x_ptr,
    xp_ptr,
    acc_ptr,
    w_ptr,
    inv,
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
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    XMODE: tl.constexpr,
    ACC_IN: tl.constexpr,
    F16ASM: tl.constexpr,
    CPI: tl.constexpr,
):
    """``x[k-range] @ W[k-range, n-tile]`` of one work item (``item = pid_k * NT + pid_n``): float32 ``[BN]``.

    The loop of ``w4a16._fma_kernel`` at one activation row: fp16 (F16ASM) dequantizes each word to four half2
    ``(q - z) * s`` and does packed ``fma.rn.f16x2`` with the ``(x[k], x[k+1])`` pairs; otherwise float32."""
    pid_n = item % NT
    pid_k = item // NT
    c_lo = pid_k * per
    c_hi = tl.minimum(c_lo + per, NCH)
    U: tl.constexpr = 16 // SUB
    SPG: tl.constexpr = GROUP // 32
    NGC: tl.constexpr = 4 // SPG
    offs_n = pid_n * _BN + tl.arange(0, _BN)
    col = (offs_n // _PN) * (KW * _PN) + offs_n % _PN
    col = tl.max_contiguous(tl.multiple_of(col, _PN), _PN)
    rows = tl.arange(0, SUB)
    w_ptrs = qw_ptr + col[None, :] + (rows * _PN)[:, None]  # [SUB, BN]
    acc = tl.zeros((SUB, _BN), dtype=tl.float32)
    if F16ASM:
        z_cols = offs_n[None, :] + 0 * rows[:, None]
        zero = tl.zeros((SUB, _BN), dtype=tl.int32)
    for c0 in range(c_lo, c_hi, CPI):
        for j in tl.static_range(CPI):
            # past the end of the item: re-read its last chunk with zero activations (as w4a16._fma_kernel)
            c = tl.minimum(c0 + j, c_hi - 1)
            ok = (rows[:, None] * 0 + (c0 + j)) < c_hi  # [SUB, 1]
            if F16ASM:
                g0 = c * NGC
                zs0, zf1, ss0 = _zpairs(zp_ptr, szp_ptr, g0, N, z_cols)
                zs2, zf3, ss1, ss2, ss3 = zs0, zf1, ss0, ss0, ss0
                if NGC == 2:
                    zs2, zf3, ss2 = _zpairs(zp_ptr, szp_ptr, g0 + 1, N, z_cols)
                    ss3 = ss2
                for u in tl.static_range(U):
                    w = tl.load(w_ptrs + (c * 16 + u * SUB) * _PN)
                    d0, d1, d2, d3 = _deq4_f16x2(w, zs0, zf1, zs2, zf3, ss0, ss1, ss2, ss3)
                    i0 = (c * 64 + u * SUB + rows)[:, None]
                    x0 = _xpair(x_ptr, xp_ptr, acc_ptr, w_ptr, inv, i0, KX, ok, XMODE, ACC_IN)
                    x1 = _xpair(x_ptr, xp_ptr, acc_ptr, w_ptr, inv, i0 + 16, KX, ok, XMODE, ACC_IN)
                    x2 = _xpair(x_ptr, xp_ptr, acc_ptr, w_ptr, inv, i0 + 32, KX, ok, XMODE, ACC_IN)
                    x3 = _xpair(x_ptr, xp_ptr, acc_ptr, w_ptr, inv, i0 + 48, KX, ok, XMODE, ACC_IN)
                    acc += _h2_sum_f32(_hfma2_4(zero, x0, d0, x1, d1, x2, d2, x3, d3))
            else:
                for gi in tl.static_range(NGC):
                    z, s = _zscale(sz_ptr, zp_ptr, c * NGC + gi, N, offs_n)
                    z = tl.reshape(z, (1, _BN))
                    s = tl.reshape(s, (1, _BN))
                    for u in tl.static_range(U):
                        w = tl.load(w_ptrs + (c * 16 + u * SUB) * _PN)
                        part = tl.zeros((SUB, _BN), dtype=tl.float32)
                        for tt in tl.static_range(SPG):
                            t = gi * SPG + tt
                            lo, hi = _q_minus_z(w, t, z)
                            k = (c * 128 + 32 * t + 2 * (SUB * u + rows))[:, None]
                            xlo = _xval(x_ptr, acc_ptr, w_ptr, inv, k, KX, ok, XMODE, ACC_IN)
                            xhi = _xval(x_ptr, acc_ptr, w_ptr, inv, k + 1, KX, ok, XMODE, ACC_IN)
                            part += xlo * lo + xhi * hi
                        acc += part * s
    return tl.sum(acc, axis=0)


@triton.jit
def _phase(
    x_ptr,
    xp_ptr,
    acc_ptr,
    w_ptr,
    inv,
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
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    XMODE: tl.constexpr,
    ACC_IN: tl.constexpr,
    ROWS_P2: tl.constexpr,
    REDUCE: tl.constexpr,
    F16ASM: tl.constexpr,
    PF: tl.constexpr,
    ACT: tl.constexpr,
    CPI: tl.constexpr,
):
    """This program's work items ``pid, pid + P, ...`` of one GEMV phase. ``REDUCE`` 1: add each partial into
    the zeroed float32 ``y`` (atomics); 0: ordered split-K into ``ws`` / ``cnt`` and the SiLU epilogue into
    the fp16 ``y`` (``[N / 2]``)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for item in range(pid, n_items, nprog):
        nxt = item + nprog
        if nxt < n_items:
            _prefetch_item(qw_ptr, szp_ptr, zp_ptr, N, KW, NCH, NT, per, nxt, GROUP, ROWS_P2, PF)
        out = _gemv_item(
            x_ptr,
            xp_ptr,
            acc_ptr,
            w_ptr,
            inv,
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
            GROUP,
            SUB,
            XMODE,
            ACC_IN,
            F16ASM,
            CPI,
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
def _first_items(
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
):
    """Prefetch this program's first item of a phase (before a barrier or the PDL wait)."""
    pid = tl.program_id(0)
    if pid < n_items:
        _prefetch_item(qw_ptr, szp_ptr, zp_ptr, N, KW, NCH, NT, per, pid, GROUP, ROWS_P2, PF)


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
    SUB: tl.constexpr,
    R_O: tl.constexpr,
    R_GU: tl.constexpr,
    R_DN: tl.constexpr,
    R_Q: tl.constexpr,
    F16ASM: tl.constexpr,
    PF: tl.constexpr,
    PDL: tl.constexpr,
    INTERP: tl.constexpr,
    ACT: tl.constexpr,
    CPI: tl.constexpr,
):
    """Phases ``FIRST..LAST`` of one layer (see the module docstring); a barrier between two phases."""
    KW_H = H // 8
    KW_I = I // 8
    NCH_H = H // 128
    NCH_I = I // 128
    # before the wait, only weights are read: pull the first phase's first items into L2
    if FIRST == 0:
        _first_items(o_qw, o_szp, o_zp, H, KW_H, NCH_H, nt_o, per_o, ni_o, GROUP, R_O, PF)
    if FIRST == 3 and not FINAL:
        _first_items(q_qw, q_szp, q_zp, N_Q, KW_H, NCH_H, nt_q, per_q, ni_q, GROUP, R_Q, PF)
    pdl.wait(PDL)
    if FIRST <= 0:
        _phase(
            attn_ptr,
            attnp_ptr,
            o_acc,
            o_acc,
            1.0,
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
            GROUP,
            SUB,
            0,
            False,
            R_O,
            1,
            F16ASM,
            PF,
            ACT,
            CPI,
        )
        if LAST >= 1:
            _first_items(gu_qw, gu_szp, gu_zp, 2 * I, KW_H, NCH_H, nt_gu, per_gu, ni_gu, GROUP, R_GU, PF)
            _grid_sync(bar_ptr)
    if FIRST <= 1 and LAST >= 1:
        inv = _rstd(o_acc, res_ptr, hmid_ptr, H, inv_h, eps, True, True, INTERP)
        _phase(
            res_ptr,
            res_ptr,
            o_acc,
            post_w,
            inv,
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
            GROUP,
            SUB,
            1,
            True,
            R_GU,
            0,
            F16ASM,
            PF,
            ACT,
            CPI,
        )
        if LAST >= 2:
            _first_items(dn_qw, dn_szp, dn_zp, H, KW_I, NCH_I, nt_dn, per_dn, ni_dn, GROUP, R_DN, PF)
            _grid_sync(bar_ptr + 1)
    if FIRST <= 2 and LAST >= 2:
        _phase(
            act_ptr,
            actp_ptr,
            dn_acc,
            dn_acc,
            1.0,
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
            GROUP,
            SUB,
            0,
            False,
            R_DN,
            1,
            F16ASM,
            PF,
            ACT,
            CPI,
        )
        if LAST >= 3:
            if not FINAL:
                _first_items(q_qw, q_szp, q_zp, N_Q, KW_H, NCH_H, nt_q, per_q, ni_q, GROUP, R_Q, PF)
            _grid_sync(bar_ptr + 2)
    if LAST >= 3:
        pdl.trigger(PDL)  # every program is resident by now: the next kernel may take what is left of the SMs
        if FINAL:
            # the model's last RMSNorm: block b of the output by program b % P
            inv = _rstd(dn_acc, hin_ptr, res_out, H, inv_h, eps, True, False, INTERP)
            pid = tl.program_id(0)
            nprog = tl.num_programs(0)
            for b0 in range(pid * _RB, H, nprog * _RB):
                k = b0 + tl.arange(0, _RB)
                y = _xval(hin_ptr, dn_acc, in_w, inv, k, H, k < H, 1, True)
                tl.store(out_ptr + k, y.to(tl.float16), mask=k < H)
        else:
            inv = _rstd(dn_acc, hin_ptr, res_out, H, inv_h, eps, not HEAD, not HEAD, INTERP)
            _phase(
                hin_ptr,
                hin_ptr,
                dn_acc,
                in_w,
                inv,
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
                GROUP,
                SUB,
                1,
                not HEAD,
                R_Q,
                1,
                F16ASM,
                PF,
                ACT,
                CPI,
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
        cpi: int = 2,
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
        self.shape, self.device, self.num_warps, self.cpi = shape, device, num_warps, cpi
        self.interp = pdl.interpreting()
        self.f16asm = not self.interp
        self.prefetch = prefetch and not self.interp
        sms = 4 if self.interp else torch.cuda.get_device_properties(device).multi_processor_count
        self.programs = sms * ctas_per_sm
        self.sub = (128 * num_warps) // BLOCK_N
        p = self.programs
        self.o, self.gu = plan_split(h, h, p), plan_split(2 * i, h, p)
        self.dn, self.q = plan_split(h, i, p), plan_split(q, h, p)
        self.ws = torch.empty(self.gu.items * BLOCK_N, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(self.gu.n_tiles, dtype=torch.int32, device=device)
        self._checked: set[tuple] = set()

    def describe(self) -> dict:
        return {
            "programs": self.programs,
            "num_warps": self.num_warps,
            "chunks_per_iteration": self.cpi,
            **{
                f"{n}_split": s.split for n, s in zip(PHASES, (self.o, self.gu, self.dn, self.q), strict=True)
            },
            **{
                f"{n}_items": s.items for n, s in zip(PHASES, (self.o, self.gu, self.dn, self.q), strict=True)
            },
        }

    def launch(
        self,
        *,
        first: int,
        last: int,
        final: bool,
        head: bool,
        attn,
        o,
        res,
        gu,
        post_w,
        act,
        hmid,
        dn,
        hin,
        qkv,
        in_w,
        q_acc,
        res_out,
        out,
        o_acc,
        dn_acc,
        bars,
        eps: float,
    ) -> None:
        """One launch (``first``..``last`` phases; the interpreter gets one launch per phase). Weights are
        ``(qweight, sz, zeros)`` triples (None where a phase does not run); ``bars``: 3 zeroed int32."""
        if self.interp and first != last:
            for ph in range(first, last + 1):
                self.launch(
                    first=ph,
                    last=ph,
                    final=final,
                    head=head,
                    attn=attn,
                    o=o,
                    res=res,
                    gu=gu,
                    post_w=post_w,
                    act=act,
                    hmid=hmid,
                    dn=dn,
                    hin=hin,
                    qkv=qkv,
                    in_w=in_w,
                    q_acc=q_acc,
                    res_out=res_out,
                    out=out,
                    o_acc=o_acc,
                    dn_acc=dn_acc,
                    bars=bars,
                    eps=eps,
                )
            return
        sh = self.shape
        dummy = o_acc
        w_o = o or (dummy, dummy, dummy)
        w_gu = gu or (dummy, dummy, dummy)
        w_dn = dn or (dummy, dummy, dummy)
        w_q = qkv or (dummy, dummy, dummy)
        i32 = [
            t.view(torch.int32) if t is not None and t.dtype == torch.float16 else dummy for t in (attn, act)
        ]
        sz32 = [
            w[1].view(torch.int32) if w[1].dtype == torch.float16 else dummy for w in (w_o, w_gu, w_dn, w_q)
        ]
        on = pdl.enabled(self.device)
        args = (
            attn if attn is not None else dummy,
            i32[0],
            w_o[0],
            w_o[1],
            sz32[0],
            w_o[2],
            o_acc,
            self.o.n_tiles,
            self.o.per,
            self.o.items,
            res if res is not None else dummy,
            w_gu[0],
            w_gu[1],
            sz32[1],
            w_gu[2],
            post_w,
            act,
            i32[1],
            hmid,
            self.ws,
            self.cnt,
            self.gu.n_tiles,
            self.gu.per,
            self.gu.items,
            self.gu.split,
            w_dn[0],
            w_dn[1],
            sz32[2],
            w_dn[2],
            dn_acc,
            self.dn.n_tiles,
            self.dn.per,
            self.dn.items,
            hin,
            w_q[0],
            w_q[1],
            sz32[3],
            w_q[2],
            in_w,
            q_acc if q_acc is not None else dummy,
            res_out if res_out is not None else dummy,
            out if out is not None else dummy,
            self.q.n_tiles,
            self.q.per,
            self.q.items,
            bars,
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
            SUB=self.sub,
            R_O=self.o.rows_p2,
            R_GU=self.gu.rows_p2,
            R_DN=self.dn.rows_p2,
            R_Q=self.q.rows_p2,
            F16ASM=self.f16asm,
            PF=self.prefetch,
            PDL=on,
            INTERP=self.interp,
            ACT=2 if self.interp else 1,
            CPI=self.cpi,
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
