"""W4A16 Triton kernels over the ``lmkiln-w4-tiled`` layout (see ``lmkiln/quant/pack.py`` and docs/layout.md).

Five kernels, each with a launcher that validates its inputs (the pure-torch references live in
``reference.py``):

* :func:`fma` -- small-M decode (1..8 rows per program) on the CUDA cores: each word is dequantized once with
  packed fp16x2 bit tricks (inline PTX: ``lop3`` + one packed ``sub``/``fma`` + ``mul`` per nibble pair) and
  reused by every row through ``fma.rn.f16x2``; fp16 partial sums flushed to float32. bf16 and the Triton
  interpreter run the same loop in float32. The dispatcher's choice for M <= 8 (fp16).
* :func:`gemv` -- ``M == 1`` decode on the CUDA cores in float32 (the bf16 choice). Each program streams a
  ``[16, BLOCK_N]`` word tile per 128-row chunk (16-byte loads), converts nibbles with the fp16 magic trick
  (two bit operations give two ``1024 + q`` halves), accumulates ``x * (1024 + q)`` in fp32 and applies the
  group's ``(s, m)`` once per group: ``sum x*w = s * sum x*(1024+q) + (m - 1024 s) * sum x``.
* :func:`mma` -- tensor-core tiles ``[BLOCK_M, BLOCK_N]`` for any M, dequantizing each nibble slice in
  registers (``w = q*s + m``, one FMA) and feeding ``tl.dot`` either slice by slice (K=16 dots) or after
  joining the 8 slices into one ``[128, BLOCK_N]`` tile.
* :func:`mma_t` -- the same with swapped operands, ``y^T = W^T x^T``: the dequantized weights are the
  dot's first operand, which Hopper's ``wgmma`` takes from registers (no shared-memory round trip for the
  weights), and the tokens are the MMA's N dimension (16..256 rows per tile).
* :func:`dequant` -- writes ``W [K, N]`` in the activation dtype, for the "dequantize + cuBLAS" path that
  wins only for very large M.

The batch-1 fp16 GEMV the dispatcher prefers where NVRTC loads is not one of these: kind ``"cuda"``, CUDA
C++ with its dot products on the tensor cores (``kernels/w4a16_cuda.py``, ``LAUNCHERS["cuda"]``).

``fma``, ``gemv`` and ``mma`` split K over ``SPLIT_K`` programs per output tile. Partials go to an fp32
workspace; the last program to finish a tile (an acq_rel atomic counter) sums the partials in a fixed order,
writes the output and resets its counter, so results are deterministic and one launch suffices. The counters
live in a caller-owned ``scratch`` int32 tensor that must start zeroed (every launch leaves it zeroed again).
``fma(..., silu=True)`` over a gate/up weight interleaved by ``lmkiln.quant.pack.gate_up_interleave`` writes
``silu(gate) * up`` from the tile it sums (the engine's decode MLP: no separate SiLU·mul launch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lmkiln.kernels import pdl, w4a16_cuda
from lmkiln.kernels.dispatch import KERNEL_KINDS
from lmkiln.kernels.reference import check_scratch, check_w4a16_inputs
from triton.language.extra import libdevice

from lmkiln.errors import QuantConfigError
from lmkiln.quant.pack import GATE_UP_BLOCK, PACK_K, PACK_N

log = logging.getLogger(__name__)

ACT_DTYPES = (torch.float16, torch.bfloat16)  # also in reference.py
REDUCE_MODES = {"ordered": 0, "atomic": 1, "none": 2}  # fma's split-K reductions, see _finish_tile


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration (what ``kernels/tuned/*.json`` stores per shape and M range)."""

    kind: str = "mma"
    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    zfold: bool = True
    join: bool = False
    # kind "fma" only: word-rows per sub-tile (0 = 128 * num_warps / block_n), chunks per loop iteration,
    # words accumulated in half2 before the float32 flush (kind "cuda": chunks an iteration, word-rows per
    # flush; its block_n is 32 * num_warps, num_stages 2 issues the next iteration's loads first, zfold puts
    # the dot products on the tensor cores, see kernels/w4a16_cuda.py)
    sub: int = 0
    chunks: int = 1
    flush: int = 2
    # launched with PDL: MiB of its weights the launch prefetches into L2 before its wait (-1: the default,
    # ``kernels.pdl.DEFAULT_PREFETCH_MB``; the H100 table keeps it: 8 MiB for o, which follows attention, was
    # slower, scripts/experiments/o_prefetch.py)
    prefetch_mb: float = -1.0
    # kind "cuda" only: warps splitting the K range of each column block inside a CTA
    ksplit: int = 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def cuda_gemv(cls, warps: int, ksplit: int, split_k: int) -> KernelConfig:
        """Kind ``"cuda"`` as the heuristic and the tuner offer it: ``warps`` 32-column blocks a CTA,
        ``ksplit`` warps over each block's K range, one chunk an iteration, the dot products on the tensor
        cores."""
        return cls(
            kind="cuda",
            block_n=32 * warps,
            split_k=split_k,
            num_warps=warps,
            ksplit=ksplit,
            num_stages=1,
            chunks=1,
            flush=1,
            zfold=True,
        )

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise QuantConfigError(f"unknown kernel config keys {sorted(unknown)} in a tuned table")
        cfg = cls(**d)
        if cfg.kind not in KERNEL_KINDS:
            raise QuantConfigError(f"kernel kind {cfg.kind!r} is not one of {KERNEL_KINDS}")
        return cfg


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _halves(w, TP: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Slice ``TP`` of every word: rows (2r, 2r+1) as two ``DT`` tensors holding ``OFFSET + q`` (exact).

    ``MAGIC`` is 0x64006400 (fp16, OFFSET 1024) or 0x43004300 (bf16, OFFSET 128); with ``MAGIC == 0`` the
    halves are fp16 subnormals ``q * 2**-24``. Two bit operations per word, no integer->float conversion.
    """
    if TP == 0:  # noqa: SIM108 (a static, constexpr branch)
        mw = w & 0x000F000F
    else:
        mw = (w >> (4 * TP)) & 0x000F000F
    if MAGIC != 0:
        mw = mw | MAGIC
    lo = mw.to(tl.int16).to(DT, bitcast=True)
    hi = (mw >> 16).to(tl.int16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _pair_bits(v16, DT: tl.constexpr):
    """``[BN]`` fp16 values -> ``[BN]`` int32 holding the value twice as a packed ``DT`` pair."""
    h = v16.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _bcast_pair(v16, DT: tl.constexpr):
    """``[BN]`` fp16 values -> ``[1, BN]`` packed ``DT`` pairs (a row broadcast over the tile)."""
    return _pair_bits(v16, DT)[None, :]


@triton.jit
def _b_pair(
    w,
    TP: tl.constexpr,
    MAGIC: tl.constexpr,
    DT: tl.constexpr,
    CT: tl.constexpr,
    ZFOLD: tl.constexpr,
    p1,
    p2,
    v1,
    v2,
    OFFSET: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Slice ``TP`` of the words ``w`` as two halves holding rows 2r and 2r+1 of the slice (``w`` is
    ``[16, BN]``, or ``[BN, 16]`` for the transposed tile of :func:`_slice_t`; p1/p2, v1/v2 broadcast over
    it).

    ZFOLD: ``q - z`` (p1 = packed OFFSET + z; v1 = OFFSET + z). Otherwise ``q * s + m`` (p1/p2 = packed s/m;
    v1/v2 = s/m). With USE_ASM the arithmetic is one packed ``sub``/``fma`` on the magic word itself, which
    keeps each (k, k+1) pair in the register an MMA fragment wants.
    """
    if TP == 0:  # noqa: SIM108 (a static, constexpr branch)
        mw = w & 0x000F000F
    else:
        mw = (w >> (4 * TP)) & 0x000F000F
    if MAGIC != 0:
        mw = mw | MAGIC
    if USE_ASM:
        mw = tl.broadcast_to(mw, w.shape)
        p1 = tl.broadcast_to(p1, w.shape)
        if ZFOLD:
            if tl.bfloat16 == DT:
                d = tl.inline_asm_elementwise(
                    "sub.rn.bf16x2 $0, $1, $2;", "=r,r,r", [mw, p1], dtype=tl.int32, is_pure=True, pack=1
                )
            else:
                d = tl.inline_asm_elementwise(
                    "sub.f16x2 $0, $1, $2;", "=r,r,r", [mw, p1], dtype=tl.int32, is_pure=True, pack=1
                )
        else:
            p2 = tl.broadcast_to(p2, w.shape)
            off = tl.full(w.shape, MAGIC, tl.int32)
            if tl.bfloat16 == DT:
                d = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; sub.rn.bf16x2 t, $1, $4; fma.rn.bf16x2 $0, t, $2, $3; }",
                    "=r,r,r,r,r",
                    [mw, p1, p2, off],
                    dtype=tl.int32,
                    is_pure=True,
                    pack=1,
                )
            else:
                d = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; sub.f16x2 t, $1, $4; fma.rn.f16x2 $0, t, $2, $3; }",
                    "=r,r,r,r,r",
                    [mw, p1, p2, off],
                    dtype=tl.int32,
                    is_pure=True,
                    pack=1,
                )
        lo = d.to(tl.int16).to(DT, bitcast=True)
        hi = (d >> 16).to(tl.int16).to(DT, bitcast=True)
    else:
        lo = mw.to(tl.int16).to(DT, bitcast=True).to(CT)
        hi = (mw >> 16).to(tl.int16).to(DT, bitcast=True).to(CT)
        if ZFOLD:
            lo = lo - v1
            hi = hi - v1
        else:
            lo = (lo - OFFSET) * v1 + v2
            hi = (hi - OFFSET) * v1 + v2
    return lo, hi


@triton.jit
def _rows_interleave(lo, hi):
    """``[R, BN]`` x2 -> ``[2R, BN]`` with ``out[2r] = lo[r]``, ``out[2r + 1] = hi[r]``."""
    R: tl.constexpr = lo.shape[0]
    BN: tl.constexpr = lo.shape[1]
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * R, BN))


@triton.jit
def _load_sm(sz_ptr, g, N, offs_n):
    """The fp16 pair ``(s, m)`` of group ``g`` for columns ``offs_n`` (one 4-byte load per column)."""
    pair = tl.load(sz_ptr + ((g * N + offs_n) * 2)[:, None] + tl.arange(0, 2)[None, :])
    return tl.split(pair)


@triton.jit
def _epilogue(acc, DT: tl.constexpr, ACT: tl.constexpr):
    """The output tile in ``DT``. ``ACT`` 1 (2 under the interpreter, which has no libdevice): the tile holds
    gate/up columns interleaved in 32-column blocks ``[g, u, g, u, ...]`` (``gate_up_interleave``) and
    becomes ``silu(g) * u`` ``[BM, BN / 2]``, rounded as the unfused path rounds (the GEMM output, F.silu and
    the product each to ``DT``, as ``kernels.fused.silu_mul`` does)."""
    if ACT == 0:
        return acc.to(DT)
    else:
        BM: tl.constexpr = acc.shape[0]
        BN: tl.constexpr = acc.shape[1]
        y = acc.to(DT).to(tl.float32)
        g, u = tl.split(tl.permute(tl.reshape(y, (BM, BN // 64, 2, 32)), (0, 1, 3, 2)))
        e = tl.exp(-g) if ACT == 2 else libdevice.exp(-g)
        sg = tl.math.div_rn(g, 1.0 + e).to(DT).to(tl.float32)
        return tl.reshape(sg * u, (BM, BN // 2)).to(DT)


@triton.jit
def _finish_tile(
    acc, c_ptrs, c_mask, local, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, TILE: tl.constexpr,
    ACT: tl.constexpr, SPLIT_P2: tl.constexpr, REDUCE: tl.constexpr = 0,
):
    """``REDUCE`` 0: store ``acc`` (SPLIT_K == 1) or add it to the tile's split-K partials; the last program
    writes (through :func:`_epilogue`: ``c_ptrs`` / ``c_mask`` are half a tile wide when ``ACT``). It sums
    the partials in order 0, 1, ..., SPLIT_K - 1 (deterministic). ``SPLIT_P2`` > 0 (a power of two >=
    SPLIT_K; the small tiles of gemv / fma) unrolls that loop with masked loads, so that all loads are in
    flight at once instead of one L2 round trip each; 0 keeps it rolled (mma: unrolled over a 16 x 128 tile
    it raised the kernel from 152 to 183 registers, one CTA less per SM).

    ``REDUCE`` 1 (``atomic``): ``c_ptrs`` is a zeroed float32 output and every program adds its partial
    (``red.global.add.f32``, fire and forget: no counter, no second pass; the order of the sum, so the last
    bits, vary from run to run). 2 (``none``, for measurements only): partials stored, never summed."""
    DT: tl.constexpr = c_ptrs.dtype.element_ty
    if REDUCE == 1:
        tl.atomic_add(c_ptrs, acc, mask=c_mask, sem="relaxed", scope="gpu")
    elif REDUCE == 2:
        tl.store(ws_ptr + (tile_id * SPLIT_K + pid_k) * TILE + local, acc)
    elif SPLIT_K == 1:
        tl.store(c_ptrs, _epilogue(acc, DT, ACT), mask=c_mask)
    else:
        base = ws_ptr + tile_id * SPLIT_K * TILE
        tl.store(base + pid_k * TILE + local, acc)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:
            total = tl.load(base + local, cache_modifier=".cg")
            if SPLIT_P2 == 0:  # big tiles (mma): a rolled loop keeps the registers of the whole kernel down
                for s in range(1, SPLIT_K):
                    total += tl.load(base + s * TILE + local, cache_modifier=".cg")
            else:
                for s in tl.static_range(1, SPLIT_P2):
                    in_split = (local * 0 + s) < SPLIT_K
                    total += tl.load(base + s * TILE + local, mask=in_split, other=0.0, cache_modifier=".cg")
            tl.store(c_ptrs, _epilogue(total, DT, ACT), mask=c_mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)


@triton.jit
def _k_range(pid_k, n_chunks, SPLIT_K):
    """The 128-row chunks ``[c_lo, c_hi)`` of split ``pid_k`` out of ``SPLIT_K`` (the last may be short)."""
    per = tl.cdiv(n_chunks, SPLIT_K)
    c_lo = pid_k * per
    return c_lo, tl.minimum(c_lo + per, n_chunks)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    # DOT_F32 only under TRITON_INTERPRET with bf16: the interpreter's tl.dot mishandles bf16 operands.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ----------------------------------------------------------------------------------------------------------
# GEMV (M == 1) on the CUDA cores
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_chunks", "SPLIT_K"])
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    sz_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    N,
    KW,
    n_chunks,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACK_N_: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rr = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    c_lo, c_hi = _k_range(pid_k, n_chunks, SPLIT_K)
    w_ptrs = qw_ptr + col[None, :] + ((c_lo * 16 + rr) * PACK_N_)[:, None]
    x_pair = (2 * rr)[:, None] + tl.arange(0, 2)[None, :]  # rows (2r, 2r+1) of a slice
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    SPG: tl.constexpr = GROUP // 32  # slices per group
    NGC: tl.constexpr = 4 // SPG  # groups per chunk
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        w = tl.load(w_ptrs)
        w_ptrs += 16 * PACK_N_
        for j in tl.static_range(NGC):
            p = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((16,), dtype=tl.float32)
            for u in tl.static_range(SPG):
                tp = j * SPG + u
                xlo, xhi = tl.split(tl.load(x_ptr + c * 128 + 32 * tp + x_pair).to(tl.float32))
                lo, hi = _halves(w, tp, 0, tl.float16)  # q * 2**-24, exact
                p += xlo[:, None] * lo.to(tl.float32) + xhi[:, None] * hi.to(tl.float32)
                xs += xlo + xhi
            s, m = _load_sm(sz_ptr, (c * 128 + j * 32 * SPG) // GROUP, N, offs_n)
            acc += p * (s.to(tl.float32) * 16777216.0)[None, :] + xs[:, None] * m.to(tl.float32)[None, :]
    part = tl.sum(acc, axis=0)
    pdl.trigger(PDL)
    _finish_tile(
        part,
        y_ptr + offs_n,
        offs_n < N,
        tl.arange(0, BLOCK_N),
        ws_ptr,
        cnt_ptr,
        pid_n,
        pid_k,
        SPLIT_K,
        BLOCK_N,
        0,
        SPLIT_P2,
    )


# ----------------------------------------------------------------------------------------------------------
# Small M (1..8) on the CUDA cores with packed fp16x2 arithmetic ("fma")
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _deq4_f16x2(w, zs0, zf1, zs2, zf3, ss0, ss1, ss2, ss3):
    """One word -> four packed half2 ``W = (q - z) * s`` (rows 2r, 2r+1 of slices 0..3), 13 instructions.

    Nibbles (t, t+4) land in the two mantissas with one ``lop3`` each: ``| 0x64006400`` makes the halves
    ``1024 + q`` (t = 0, 2) or, masked in place with 0x00F000F0, ``1024 + 16 q`` (t = 1, 3). One packed
    ``sub`` of ``zs = 1024 + z`` or ``fma(h, 1/16, zf = -(64 + z))`` gives ``q - z`` exactly, and one packed
    ``mul`` by the slice's scale ``ss`` rounds ``W`` to fp16 once (the value an fp16 dequantization gives), so
    the products ``x * W`` stay as small as the layer's real products (no fp16 overflow from ``x * (q - z)``).
    """
    return tl.inline_asm_elementwise(
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
        sub.f16x2 c, c, $7;
        fma.rn.f16x2 d, d, k, $8;
        mul.rn.f16x2 $0, a, $9;
        mul.rn.f16x2 $1, b, $10;
        mul.rn.f16x2 $2, c, $11;
        mul.rn.f16x2 $3, d, $12;
        }""",
        constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        args=[w, zs0, zf1, zs2, zf3, ss0, ss1, ss2, ss3],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _hfma2_4(acc, x0, d0, x1, d1, x2, d2, x3, d3):
    """``acc + x0*d0 + x1*d1 + x2*d2 + x3*d3`` on packed half2 (4 ``fma.rn.f16x2``)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a;
        fma.rn.f16x2 a, $2, $3, $1;
        fma.rn.f16x2 a, $4, $5, a;
        fma.rn.f16x2 a, $6, $7, a;
        fma.rn.f16x2 a, $8, $9, a;
        mov.b32 $0, a;
        }""",
        constraints="=r,r,r,r,r,r,r,r,r,r",
        args=[acc, x0, d0, x1, d1, x2, d2, x3, d3],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _h2_sum_f32(a):
    """Packed half2 -> float32 ``lo + hi`` (exact conversions, one fp32 add)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 l, h;
        .reg .f32 fl, fh;
        mov.b32 {l, h}, $1;
        cvt.f32.f16 fl, l;
        cvt.f32.f16 fh, h;
        add.f32 $0, fl, fh;
        }""",
        constraints="=f,r",
        args=[a],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _zpairs(zp_ptr, szp_ptr, g, N, cols):
    """Group ``g`` at ``cols`` as packed half2 (int32): ``1024 + z``, ``-(64 + z)`` and ``s``.

    ``cols`` has the weight tile's shape (broadcast over its rows), so these loads get the tile's register
    layout (no layout conversion through shared memory); ``szp_ptr`` is ``sz`` viewed as int32 pairs."""
    z = tl.load(zp_ptr + g * N + cols).to(tl.int32)
    zs = z + 0x6400  # fp16 1024 + z
    zf = z * 16 + 0xD400  # fp16 -(64 + z)
    s = tl.load(szp_ptr + g * N + cols) & 0xFFFF  # fp16 s (the pair's low half)
    return zs | (zs << 16), zf | (zf << 16), s | (s << 16)


@triton.jit
def _zscale(sz_ptr, zp_ptr, g, N, offs_n):
    """Generic path: ``z`` (float32) and ``s`` of group ``g`` as ``[1, 1, BN]``."""
    z = tl.load(zp_ptr + g * N + offs_n).to(tl.float32)
    s = tl.load(sz_ptr + (g * N + offs_n) * 2).to(tl.float32)
    return z[None, None, :], s[None, None, :]


@triton.jit
def _q_minus_z(w, T: tl.constexpr, z):
    """Generic path: slice ``T`` of every word as float32 ``(q[2r] - z, q[2r+1] - z)``."""
    lo = ((w >> (4 * T)) & 0xF).to(tl.float32) - z
    hi = ((w >> (4 * T + 16)) & 0xF).to(tl.float32) - z
    return lo, hi


@triton.jit(do_not_specialize=["M", "n_chunks", "SPLIT_K"])
def _fma_kernel(
    x_ptr,
    xp_ptr,
    qw_ptr,
    sz_ptr,
    szp_ptr,
    zp_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    KW,
    n_chunks,
    stride_xm,
    stride_ym,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
    CPI: tl.constexpr,
    FLUSH: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PACK_N_: tl.constexpr,
    F16ASM: tl.constexpr,
    ACT: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    PDL: tl.constexpr,
    PF_ROWS: tl.constexpr,
    REDUCE: tl.constexpr,
):
    """``y = x @ W`` for ``BLOCK_M`` (1..8) activation rows per program on the CUDA cores (``ACT``: the SiLU
    epilogue of an interleaved gate/up weight, see :func:`_epilogue`; ``y`` is then ``[M, N / 2]``).

    A chunk (128 rows) is read as ``16 / SUB`` sub-tiles ``[SUB word-rows, BLOCK_N]``; with the default
    ``SUB = 128 * num_warps / BLOCK_N`` every thread loads 16 bytes (4 columns) of each sub-tile, always the
    same columns. F16ASM (fp16 on the GPU): each word is dequantized once to four half2 ``(q - z) * s`` (13
    instructions per 8 weights), then every activation row does 4 ``fma.rn.f16x2`` with its
    ``(x[k], x[k+1])`` pairs (no integer->float conversion, no per-element fp32 math); half2 partial sums of
    ``FLUSH`` words (``8 * FLUSH`` products per half) are added to a float32 accumulator. Otherwise
    (interpreter, bf16) the same loop in float32 with the scale applied per group.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    U: tl.constexpr = 16 // SUB  # sub-tiles per chunk
    SPG: tl.constexpr = GROUP // 32  # slices per group
    NGC: tl.constexpr = 4 // SPG  # groups per chunk
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    col = tl.max_contiguous(tl.multiple_of(col, PACK_N_), PACK_N_)  # runs of 32 words: 16-byte loads
    rows = tl.arange(0, SUB)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mrow = offs_m[:, None, None]
    m_ok = mrow < M
    w_ptrs = qw_ptr + col[None, None, :] + (rows * PACK_N_)[None, :, None]  # [1, SUB, BN]
    z_cols = offs_n[None, None, :] + 0 * rows[None, :, None]  # [1, SUB, BN]
    if F16ASM:
        x_rows = xp_ptr + mrow * (stride_xm // 2) + rows[None, :, None]  # int32 (x[k], x[k+1]) pairs
    else:
        x_rows = x_ptr + mrow * stride_xm + 2 * rows[None, :, None]
    c_lo, c_hi = _k_range(pid_k, n_chunks, SPLIT_K)
    if PF_ROWS > 0:
        # before the wait (PDL): pull the first PF_ROWS word-rows of each of the tile's panels into L2
        NP: tl.constexpr = BLOCK_N // PACK_N_
        li = tl.arange(0, PF_ROWS * NP)
        r = tl.minimum(c_lo * 16 + li % PF_ROWS, c_hi * 16 - 1)
        pdl.prefetch_l2(qw_ptr + (pid_n * NP + li // PF_ROWS) * (KW * PACK_N_) + r * PACK_N_)
    pdl.wait(PDL)
    acc = tl.zeros((BLOCK_M, SUB, BLOCK_N), dtype=tl.float32)
    zero = tl.zeros((BLOCK_M, SUB, BLOCK_N), dtype=tl.int32)
    for c0 in tl.range(c_lo, c_hi, CPI, num_stages=NUM_STAGES):
        for j in tl.static_range(CPI):
            if CPI == 1:
                c = c0
                xm = m_ok
            else:
                # past the end of this split: re-read the last chunk with zero activations
                c = tl.minimum(c0 + j, c_hi - 1)
                xm = m_ok & (mrow * 0 + (c0 + j) < c_hi)
            g0 = c * NGC
            if F16ASM:
                # zero points / scales of the chunk's groups, per slice t (group of slice t = t // SPG)
                zs0, zf1, ss0 = _zpairs(zp_ptr, szp_ptr, g0, N, z_cols)
                zs2, zf3, ss1, ss2, ss3 = zs0, zf1, ss0, ss0, ss0
                if NGC == 2:
                    zs2, zf3, ss2 = _zpairs(zp_ptr, szp_ptr, g0 + 1, N, z_cols)
                    ss3 = ss2
                if NGC == 4:
                    _, zf1, ss1 = _zpairs(zp_ptr, szp_ptr, g0 + 1, N, z_cols)
                    zs2, _, ss2 = _zpairs(zp_ptr, szp_ptr, g0 + 2, N, z_cols)
                    _, zf3, ss3 = _zpairs(zp_ptr, szp_ptr, g0 + 3, N, z_cols)
                a = zero
                for u in tl.static_range(U):
                    w = tl.load(w_ptrs + (c * 16 + u * SUB) * PACK_N_)
                    d0, d1, d2, d3 = _deq4_f16x2(w, zs0, zf1, zs2, zf3, ss0, ss1, ss2, ss3)
                    xk = x_rows + (c * 64 + u * SUB)
                    x0 = tl.load(xk, mask=xm, other=0)
                    x1 = tl.load(xk + 16, mask=xm, other=0)
                    x2 = tl.load(xk + 32, mask=xm, other=0)
                    x3 = tl.load(xk + 48, mask=xm, other=0)
                    if u % FLUSH == 0:
                        a = zero
                    a = _hfma2_4(a, x0, d0, x1, d1, x2, d2, x3, d3)
                    if u % FLUSH == FLUSH - 1:
                        acc += _h2_sum_f32(a)
            else:
                for gi in tl.static_range(NGC):
                    z, s = _zscale(sz_ptr, zp_ptr, g0 + gi, N, offs_n)
                    for u in tl.static_range(U):
                        w = tl.load(w_ptrs + (c * 16 + u * SUB) * PACK_N_)
                        part = tl.zeros((BLOCK_M, SUB, BLOCK_N), dtype=tl.float32)
                        for tt in tl.static_range(SPG):
                            t = gi * SPG + tt
                            lo, hi = _q_minus_z(w, t, z)
                            xk = x_rows + (c * 128 + 32 * t + 2 * SUB * u)
                            xlo = tl.load(xk, mask=xm, other=0.0).to(tl.float32)
                            xhi = tl.load(xk + 1, mask=xm, other=0.0).to(tl.float32)
                            part += xlo * lo + xhi * hi
                        acc += part * s
    out = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]
    pdl.trigger(PDL)
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    OUT_N: tl.constexpr = BLOCK_N // 2 if ACT else BLOCK_N
    offs_o = pid_n * OUT_N + tl.arange(0, OUT_N)
    _finish_tile(
        out,
        y_ptr + offs_m[:, None] * stride_ym + offs_o[None, :],
        offs_m[:, None] < M,
        local,
        ws_ptr,
        cnt_ptr,
        pid_m * (N // BLOCK_N) + pid_n,
        pid_k,
        SPLIT_K,
        BLOCK_M * BLOCK_N,
        ACT,
        SPLIT_P2,
        REDUCE,
    )


# ----------------------------------------------------------------------------------------------------------
# Tensor-core tiles (any M)
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M", "n_chunks", "SPLIT_K"])
def _mma_kernel(
    a_ptr,
    qw_ptr,
    sz_ptr,
    zp_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    KW,
    n_chunks,
    stride_am,
    stride_cm,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    ZFOLD: tl.constexpr,
    JOIN: tl.constexpr,
    PACK_N_: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_ASM: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    PDL: tl.constexpr,
):
    """ZFOLD: B = ``q - z`` (exact small integers; for fp16 as subnormals ``(q - z) * 2**-24`` so the
    conversion is one AND), one fp32 accumulator per group, ``acc += acc_g * s`` (the AWQ value
    ``(q - z) * s`` exactly; best for small M). Otherwise B = ``q * s + m`` rounded to the activation dtype in
    registers and one accumulator (best for large M, keeps the MMAs in flight)."""
    pdl.wait(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = N // BLOCK_N
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    DT: tl.constexpr = a_ptr.dtype.element_ty
    if tl.bfloat16 == DT:
        MAGIC: tl.constexpr = 0x43004300
        OFFSET: tl.constexpr = 128.0
        ZSCALE: tl.constexpr = 1.0
    elif ZFOLD:
        MAGIC: tl.constexpr = 0  # fp16 subnormals q * 2**-24: no magic constant, exact
        OFFSET: tl.constexpr = 0.0
        ZSCALE: tl.constexpr = 16777216.0
    else:
        MAGIC: tl.constexpr = 0x64006400
        OFFSET: tl.constexpr = 1024.0
        ZSCALE: tl.constexpr = 1.0
    if DOT_F32:
        CT: tl.constexpr = tl.float32  # interpreter only: numpy has no bf16 arithmetic
    else:
        CT: tl.constexpr = DT
    SPG: tl.constexpr = GROUP // 32  # 32-row slices per group
    NGC: tl.constexpr = 4 // SPG  # groups per 128-row chunk
    rr = tl.arange(0, 16)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    a_rows = a_ptr + offs_m[:, None] * stride_am
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    c_lo, c_hi = _k_range(pid_k, n_chunks, SPLIT_K)
    w_ptrs = qw_ptr + col[None, :] + ((c_lo * 16 + rr) * PACK_N_)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        w = tl.load(w_ptrs)
        w_ptrs += 16 * PACK_N_
        kb = c * 128
        for j in tl.static_range(NGC):
            g = (kb + j * 32 * SPG) // GROUP
            s16, m16 = _load_sm(sz_ptr, g, N, offs_n)
            if ZFOLD:
                # B = (OFFSET + q) - (OFFSET + z) = q - z, exact; the group's scale is applied to acc_g
                zi = tl.load(zp_ptr + g * N + offs_n).to(tl.int32) + (MAGIC & 0xFFFF)
                p1 = (zi | (zi << 16))[None, :]
                p2 = p1
                v1 = (zi.to(tl.int16).to(DT, bitcast=True)).to(CT)[None, :]
                v2 = v1
                accg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                v1 = s16.to(CT)[None, :]
                v2 = m16.to(CT)[None, :]
                p1 = _bcast_pair(s16, DT)
                p2 = _bcast_pair(m16, DT)
            if JOIN:
                # one dot over the whole group (K = 32 * SPG)
                lo0, hi0 = _b_pair(w, j * SPG, MAGIC, DT, CT, ZFOLD, p1, p2, v1, v2, OFFSET, USE_ASM)
                b = _rows_interleave(lo0, hi0)
                if SPG >= 2:
                    lo1, hi1 = _b_pair(w, j * SPG + 1, MAGIC, DT, CT, ZFOLD, p1, p2, v1, v2, OFFSET, USE_ASM)
                    b = tl.reshape(
                        tl.permute(tl.join(b, _rows_interleave(lo1, hi1)), (2, 0, 1)), (64, BLOCK_N)
                    )
                if SPG == 4:
                    lo2, hi2 = _b_pair(w, 2, MAGIC, DT, CT, ZFOLD, p1, p2, v1, v2, OFFSET, USE_ASM)
                    lo3, hi3 = _b_pair(w, 3, MAGIC, DT, CT, ZFOLD, p1, p2, v1, v2, OFFSET, USE_ASM)
                    b23 = tl.reshape(
                        tl.permute(
                            tl.join(_rows_interleave(lo2, hi2), _rows_interleave(lo3, hi3)), (2, 0, 1)
                        ),
                        (64, BLOCK_N),
                    )
                    b = tl.reshape(tl.permute(tl.join(b, b23), (2, 0, 1)), (128, BLOCK_N))
                a = tl.load(
                    a_rows + (kb + j * 32 * SPG) + tl.arange(0, 32 * SPG)[None, :],
                    mask=m_mask[:, None],
                    other=0.0,
                )
                if ZFOLD:
                    accg = _dot(a, b, accg, DOT_F32)
                else:
                    acc = _dot(a, b, acc, DOT_F32)
            else:
                for u in tl.static_range(SPG):
                    tp = j * SPG + u
                    lo, hi = _b_pair(w, tp, MAGIC, DT, CT, ZFOLD, p1, p2, v1, v2, OFFSET, USE_ASM)
                    b = _rows_interleave(lo, hi)
                    a = tl.load(
                        a_rows + (kb + 32 * tp) + tl.arange(0, 32)[None, :], mask=m_mask[:, None], other=0.0
                    )
                    if ZFOLD:
                        accg = _dot(a, b, accg, DOT_F32)
                    else:
                        acc = _dot(a, b, acc, DOT_F32)
            if ZFOLD:
                acc += accg * (s16.to(tl.float32) * ZSCALE)[None, :]
    pdl.trigger(PDL)
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    _finish_tile(
        acc,
        c_ptrs,
        m_mask[:, None],
        local,
        ws_ptr,
        cnt_ptr,
        pid_m * grid_n + pid_n,
        pid_k,
        SPLIT_K,
        BLOCK_M * BLOCK_N,
        0,
        SPLIT_P2,
    )


@triton.jit
def _slice_t(w, TP: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, p1, p2, v1, v2,
             OFFSET: tl.constexpr, USE_ASM: tl.constexpr):
    """Slice ``TP`` of the words ``w [BN, 16]`` as the transposed weight tile ``W^T [BN, 32]`` (``q * s + m``;
    p1/p2 the packed s/m pairs, v1/v2 the values, ``[BN, 1]``): column ``2r + h`` is half ``h`` of word
    ``r``, the ``(k, k+1)`` pair an A fragment's register holds."""
    lo, hi = _b_pair(w, TP, MAGIC, DT, CT, False, p1, p2, v1, v2, OFFSET, USE_ASM)
    return tl.reshape(tl.join(lo, hi), (w.shape[0], 32))


@triton.jit
def _cat_k(a, b):
    """``[BN, W]`` x2 -> ``[BN, 2W]``: ``b``'s columns after ``a``'s."""
    BN: tl.constexpr = a.shape[0]
    W: tl.constexpr = a.shape[1]
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BN, 2 * W))


@triton.jit(do_not_specialize=["M", "n_chunks", "SPLIT_K"])
def _mma_t_kernel(
    a_ptr,
    qw_ptr,
    sz_ptr,
    c_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    KW,
    n_chunks,
    stride_am,
    stride_cm,
    SPLIT_K,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    JOIN: tl.constexpr,
    PACK_N_: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    """Swapped operands: ``C^T [BLOCK_N, BLOCK_M] = W^T @ x^T``. The dequantized weights (``q * s + m`` in
    the activation dtype) are the dot's *first* operand, which Hopper's wgmma reads from registers: each
    slice's ``(k, k+1)`` nibble pair is already the register an A fragment holds, so the tile goes from the
    word to the tensor cores without a shared-memory round trip. The activations (``x^T``, the second
    operand) stream through shared memory. M (tokens) is the MMA's N dimension, so 16..256 rows fill it.
    JOIN: one dot per group (``K = GROUP``) instead of one per 32-row slice (fewer waits on the MMAs)."""
    pdl.wait(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m  # the row tiles of one column tile run together (its weights stay in L2)
    pid_n = pid // grid_m

    DT: tl.constexpr = a_ptr.dtype.element_ty
    if tl.bfloat16 == DT:
        MAGIC: tl.constexpr = 0x43004300
        OFFSET: tl.constexpr = 128.0
    else:
        MAGIC: tl.constexpr = 0x64006400
        OFFSET: tl.constexpr = 1024.0
    if DOT_F32:
        CT: tl.constexpr = tl.float32  # interpreter only: numpy has no bf16 arithmetic
    else:
        CT: tl.constexpr = DT
    SPG: tl.constexpr = GROUP // 32  # 32-row slices per group
    NGC: tl.constexpr = 4 // SPG  # groups per 128-row chunk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    a_cols = a_ptr + offs_m[None, :] * stride_am  # x^T: column j is activation row j
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    col = tl.max_contiguous(tl.multiple_of(col, PACK_N_), PACK_N_)
    c_lo, c_hi = _k_range(pid_k, n_chunks, SPLIT_K)
    w_ptrs = qw_ptr + col[:, None] + ((c_lo * 16 + tl.arange(0, 16)) * PACK_N_)[None, :]  # [BN, 16] words
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        w = tl.load(w_ptrs)
        w_ptrs += 16 * PACK_N_
        kb = c * 128
        for j in tl.static_range(NGC):
            s16, m16 = _load_sm(sz_ptr, (kb + j * 32 * SPG) // GROUP, N, offs_n)
            p1 = _pair_bits(s16, DT)[:, None]
            p2 = _pair_bits(m16, DT)[:, None]
            v1 = s16.to(CT)[:, None]
            v2 = m16.to(CT)[:, None]
            if JOIN:
                b = _slice_t(w, j * SPG, MAGIC, DT, CT, p1, p2, v1, v2, OFFSET, USE_ASM)
                if SPG >= 2:
                    b = _cat_k(b, _slice_t(w, j * SPG + 1, MAGIC, DT, CT, p1, p2, v1, v2, OFFSET, USE_ASM))
                if SPG == 4:
                    b23 = _cat_k(
                        _slice_t(w, j * SPG + 2, MAGIC, DT, CT, p1, p2, v1, v2, OFFSET, USE_ASM),
                        _slice_t(w, j * SPG + 3, MAGIC, DT, CT, p1, p2, v1, v2, OFFSET, USE_ASM),
                    )
                    b = _cat_k(b, b23)
                k0 = kb + j * 32 * SPG
                xt = tl.load(a_cols + (k0 + tl.arange(0, 32 * SPG))[:, None], mask=m_mask[None, :], other=0.0)
                acc = _dot(b, xt, acc, DOT_F32)
            else:
                for u in tl.static_range(SPG):
                    tp = j * SPG + u
                    b = _slice_t(w, tp, MAGIC, DT, CT, p1, p2, v1, v2, OFFSET, USE_ASM)
                    k0 = kb + 32 * tp
                    xt = tl.load(a_cols + (k0 + tl.arange(0, 32))[:, None], mask=m_mask[None, :], other=0.0)
                    acc = _dot(b, xt, acc, DOT_F32)
    pdl.trigger(PDL)
    local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
    _finish_tile(
        acc,
        c_ptrs,
        m_mask[None, :],
        local,
        ws_ptr,
        cnt_ptr,
        pid,
        pid_k,
        SPLIT_K,
        BLOCK_M * BLOCK_N,
        0,
        0,
    )


# ----------------------------------------------------------------------------------------------------------
# Dequantize to W [K, N] (for the dequantize + cuBLAS path at very large M)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(
    qw_ptr,
    sz_ptr,
    out_ptr,
    N,
    KW,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACK_N_: tl.constexpr,
):
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    rr = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col = (offs_n // PACK_N_) * (KW * PACK_N_) + offs_n % PACK_N_
    w = tl.load(qw_ptr + col[None, :] + ((c * 16 + rr) * PACK_N_)[:, None])
    for tp in tl.static_range(4):
        s, m = _load_sm(sz_ptr, (c * 128 + 32 * tp) // GROUP, N, offs_n)
        lo, hi = _halves(w, tp, 0x64006400, tl.float16)
        b = (_rows_interleave(lo, hi).to(tl.float32) - 1024.0) * s.to(tl.float32)[None, :] + m.to(tl.float32)[
            None, :
        ]
        rows = c * 128 + 32 * tp + tl.arange(0, 32)
        tl.store(out_ptr + (rows * N)[:, None] + offs_n[None, :], b.to(OUT))


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def check_inputs(
    x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor | None = None
) -> tuple[int, int, int, int]:
    """Validate a 2-D activation and packed weights for a kernel launch; return ``(M, N, K, group_size)``."""
    m, n, k, g = check_w4a16_inputs(x, qweight, sz, zeros)
    if x.device.type != "cuda" and not pdl.interpreting():
        raise QuantConfigError(
            f"Triton kernels need a CUDA device (x is on {x.device}); use lmkiln.kernels.reference on the "
            "CPU "
            "or set TRITON_INTERPRET=1 before importing lmkiln.kernels"
        )
    return m, n, k, g


def _check_tile(n: int, block_n: int, what: str) -> None:
    if block_n % PACK_N or n % block_n:
        raise QuantConfigError(
            f"{what}: N={n} is not a multiple of the tile BLOCK_N={block_n} (which must be a multiple of "
            f"{PACK_N}); pick a block_n that divides N"
        )


def _check_pow2(value: int, least: int, what: str) -> None:
    if value < least or value & (value - 1):
        raise QuantConfigError(f"{what} must be a power of two >= {least}, got {value}")


def _split_buffers(
    scratch: torch.Tensor | None, tiles: int, split: int, tile_elems: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counters, fp32 partials); typed 1-element stand-ins when ``split == 1`` (never touched)."""
    if split == 1:
        return (
            torch.empty(1, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.float32, device=device),
        )
    cnt = check_scratch(scratch, tiles, device)
    return cnt, torch.empty((tiles * split * tile_elems,), dtype=torch.float32, device=device)


def _plan_split(
    split_k: int,
    n_chunks: int,
    tiles: int,
    tile_elems: int,
    scratch: torch.Tensor | None,
    device: torch.device,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(split, counters, partials) of a tiled launch: ``split_k`` capped at the K chunks, and no split-K when
    the caller's ``scratch`` holds fewer counters than the launch has tiles."""
    split = max(1, min(split_k, n_chunks))
    if split > 1 and scratch is not None and scratch.numel() < tiles:
        log.debug("scratch holds %d tiles < %d: running without split-K", scratch.numel(), tiles)
        split = 1
    return (split, *_split_buffers(scratch, tiles, split, tile_elems, device))


def make_scratch(device: torch.device | str, tiles: int = 1 << 14) -> torch.Tensor:
    """Zeroed split-K counters; every kernel launch leaves them zeroed. One per stream."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [1, N] = x [1, K] @ W`` on the CUDA cores (split-K over ``cfg.split_k`` programs)."""
    m, n, k, g = check_inputs(x, qweight, sz)
    if m != 1:
        raise QuantConfigError(f"gemv takes exactly one row, got M={m}; use mma for M > 1")
    _check_tile(n, cfg.block_n, "gemv")
    n_chunks = k // PACK_K
    split = max(1, min(cfg.split_k, n_chunks))
    y = out if out is not None else torch.empty((1, n), dtype=x.dtype, device=x.device)
    tiles = n // cfg.block_n
    cnt, ws = _split_buffers(scratch, tiles, split, cfg.block_n, x.device)
    on = pdl.enabled(x.device)
    _gemv_kernel[(tiles, split)](
        x,
        qweight,
        sz,
        y,
        ws,
        cnt,
        n,
        k // 8,
        n_chunks,
        split,
        GROUP=g,
        BLOCK_N=cfg.block_n,
        PACK_N_=PACK_N,
        NUM_STAGES=cfg.num_stages,
        SPLIT_P2=triton.next_power_of_2(split),
        PDL=on,
        num_warps=cfg.num_warps,
        **pdl.launch_opts(on),
    )
    return y


def _prefetch_rows(on: bool, n: int, n_chunks: int, split: int, prefetch_mb: float = -1.0) -> int:
    """Word-rows (a power of two, or 0) each fma program prefetches into L2 before its PDL wait: as many as
    keep the launch's prefetch within ``pdl.prefetch_bytes(prefetch_mb)``, at most the program's share of
    K."""
    if not on:
        return 0
    rows = pdl.prefetch_bytes(prefetch_mb) // ((n // PACK_N) * split * PACK_N * 4)
    if rows < 1:
        return 0
    return min(1 << (rows.bit_length() - 1), triton.next_power_of_2(triton.cdiv(n_chunks, split) * 16))


def _fma_sub(cfg: KernelConfig) -> int:
    sub = cfg.sub or (128 * cfg.num_warps) // cfg.block_n
    if sub not in (1, 2, 4, 8, 16):
        raise QuantConfigError(
            f"fma: sub-tile rows {sub} (sub={cfg.sub}, num_warps={cfg.num_warps}, block_n={cfg.block_n}) "
            "must be 1, 2, 4, 8 or 16; set sub explicitly or pick block_n = 128 * num_warps / sub"
        )
    if (16 // sub) % cfg.flush:
        raise QuantConfigError(f"fma: flush={cfg.flush} must divide the {16 // sub} sub-tiles of a chunk")
    return sub


def fma(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    silu: bool = False,
    reduce: str = "ordered",
) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W`` on the CUDA cores, ``cfg.block_m`` (1..8) rows per program, split-K.

    Every dequantized weight is reused across the program's rows; needs the packed ``zeros``. ``silu``: ``W``
    is a gate/up weight interleaved by :func:`gate_up_interleave` and ``y [M, N / 2]`` is ``silu(gate) * up``
    (the SiLU is applied where the tile is written; ``cfg.block_n`` must be a multiple of 64).

    ``reduce``: how the split-K partials meet (:func:`_finish_tile`). ``"ordered"`` (default): in a fixed
    order, deterministic. ``"atomic"``: every program adds its partial into ``out``, a zeroed float32
    ``[M, N]`` the caller owns and must zero again before the next launch; no workspace, no counter, no second
    pass (H100, the 7B linears at M=1: 1.768 -> 1.584 ms a forward, scripts/experiments/decode_ablation.py),
    but the last bits vary from run to run. ``"none"``: partials never summed (measurements only)."""
    m, n, k, g = check_inputs(x, qweight, sz, zeros)
    mode = REDUCE_MODES.get(reduce)
    if mode is None:
        raise QuantConfigError(f"fma: reduce={reduce!r}; use one of {sorted(REDUCE_MODES)}")
    if zeros is None:
        raise QuantConfigError("the fma kernel needs the packed `zeros` tensor (uint8 [K/G, N])")
    _check_tile(n, cfg.block_n, "fma")
    if cfg.block_m not in (1, 2, 4, 8):
        raise QuantConfigError(f"fma block_m must be 1, 2, 4 or 8, got {cfg.block_m}")
    if cfg.chunks < 1 or cfg.flush < 1:
        raise QuantConfigError(f"fma: chunks and flush must be >= 1, got {cfg.chunks} and {cfg.flush}")
    if silu and cfg.block_n % (2 * GATE_UP_BLOCK):
        raise QuantConfigError(
            f"fma with the SiLU epilogue needs block_n a multiple of {2 * GATE_UP_BLOCK} (a gate block and "
            f"its up block), got {cfg.block_n}"
        )
    sub = _fma_sub(cfg)
    n_chunks = k // PACK_K
    grid_m = triton.cdiv(m, cfg.block_m)
    tiles = grid_m * (n // cfg.block_n)
    if mode == 1:
        if silu:
            raise QuantConfigError("fma: the SiLU epilogue needs the whole sum; use reduce='ordered'")
        if (
            out is None
            or out.dtype != torch.float32
            or tuple(out.shape) != (m, n)
            or out.stride(1) != 1
            or out.device != x.device
        ):
            got = "None" if out is None else f"{out.dtype} {list(out.shape)} on {out.device}"
            raise QuantConfigError(
                f"fma(reduce='atomic') adds into `out`: pass a zeroed float32 [{m}, {n}] tensor on "
                f"{x.device} with a contiguous last dim, got {got}"
            )
        y = out
        split = max(1, min(cfg.split_k, n_chunks))
        cnt, ws = _split_buffers(None, tiles, 1, 0, x.device)  # stand-ins: no counters, no workspace
    else:
        y = out if out is not None else x.new_empty((m, n // 2 if silu else n))
        tile = cfg.block_m * cfg.block_n
        split, cnt, ws = _plan_split(cfg.split_k, n_chunks, tiles, tile, scratch, y.device)
    f16asm = x.dtype == torch.float16 and not pdl.interpreting()
    if f16asm and x.data_ptr() % 4:
        x = x.clone()  # the (x[k], x[k+1]) pairs are read as int32
    on = pdl.enabled(x.device)
    _fma_kernel[(n // cfg.block_n, split, grid_m)](
        x,
        x.view(torch.int32) if f16asm else x,
        qweight,
        sz,
        sz.view(torch.int32),
        zeros,
        y,
        ws,
        cnt,
        m,
        n,
        k // 8,
        n_chunks,
        x.stride(0),
        y.stride(0),
        split,
        GROUP=g,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SUB=sub,
        CPI=cfg.chunks,
        FLUSH=cfg.flush,
        NUM_STAGES=cfg.num_stages,
        SPLIT_P2=triton.next_power_of_2(split),
        PACK_N_=PACK_N,
        F16ASM=f16asm,
        ACT=(2 if pdl.interpreting() else 1) if silu else 0,
        PDL=on,
        PF_ROWS=_prefetch_rows(on, n, n_chunks, split, cfg.prefetch_mb),
        REDUCE=mode,
        num_warps=cfg.num_warps,
        **({"enable_fp_fusion": False} if silu and not pdl.interpreting() else {}),
        **pdl.launch_opts(on),
    )
    return y


def mma(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W`` on the tensor cores, ``[block_m, block_n]`` tiles, split-K.

    ``zeros`` (uint8 ``[K/G, N]``) is needed by the zero-folding mode (``cfg.zfold``)."""
    m, n, k, g = check_inputs(x, qweight, sz, zeros if cfg.zfold else None)
    if cfg.zfold and zeros is None:
        raise QuantConfigError(
            "the zero-folding mma mode needs the packed `zeros` tensor; pass it or use zfold=False"
        )
    _check_tile(n, cfg.block_n, "mma")
    _check_pow2(cfg.block_m, 16, "mma block_m")
    n_chunks = k // PACK_K
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, cfg.block_m) * (n // cfg.block_n)
    split, cnt, ws = _plan_split(cfg.split_k, n_chunks, tiles, cfg.block_m * cfg.block_n, scratch, x.device)
    on = pdl.enabled(x.device)
    _mma_kernel[(tiles, split)](
        x,
        qweight,
        sz,
        zeros if zeros is not None else qweight,
        y,
        ws,
        cnt,
        m,
        n,
        k // 8,
        n_chunks,
        x.stride(0),
        y.stride(0),
        split,
        GROUP=g,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m,
        ZFOLD=cfg.zfold,
        JOIN=cfg.join,
        PACK_N_=PACK_N,
        NUM_STAGES=cfg.num_stages,
        SPLIT_P2=0,
        DOT_F32=pdl.interpreting() and x.dtype == torch.bfloat16,
        USE_ASM=not pdl.interpreting(),
        PDL=on,
        num_warps=cfg.num_warps,
        **pdl.launch_opts(on),
    )
    return y


def mma_t(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W`` on the tensor cores with swapped operands (``y^T = W^T x^T``): tiles of
    ``cfg.block_n`` weight columns x ``cfg.block_m`` activation rows, split-K. ``zeros`` is not read (the
    weights are dequantized to ``q * s + m``)."""
    m, n, k, g = check_inputs(x, qweight, sz)
    _check_tile(n, cfg.block_n, "mma_t")
    _check_pow2(cfg.block_n, 64, "mma_t block_n")
    _check_pow2(cfg.block_m, 16, "mma_t block_m")
    n_chunks = k // PACK_K
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, cfg.block_m) * (n // cfg.block_n)
    split, cnt, ws = _plan_split(cfg.split_k, n_chunks, tiles, cfg.block_m * cfg.block_n, scratch, x.device)
    on = pdl.mma_t_enabled(x.device)
    _mma_t_kernel[(tiles, split)](
        x,
        qweight,
        sz,
        y,
        ws,
        cnt,
        m,
        n,
        k // 8,
        n_chunks,
        x.stride(0),
        y.stride(0),
        split,
        GROUP=g,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        JOIN=cfg.join,
        PACK_N_=PACK_N,
        NUM_STAGES=cfg.num_stages,
        DOT_F32=pdl.interpreting() and x.dtype == torch.bfloat16,
        USE_ASM=not pdl.interpreting(),
        PDL=on,
        num_warps=cfg.num_warps,
        **pdl.launch_opts(on),
    )
    return y


def dequant(
    qweight: torch.Tensor,
    sz: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """``W [K, N]`` in ``dtype`` from packed tensors."""
    if dtype not in ACT_DTYPES:
        raise QuantConfigError(f"dequant dtype must be float16 or bfloat16, got {dtype}")
    x_stub = torch.empty((1, qweight.shape[1] * 8), dtype=dtype, device=qweight.device)
    _, n, k, g = check_inputs(x_stub, qweight, sz)
    _check_tile(n, block_n, "dequant")
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    _dequant_kernel[(n // block_n, k // PACK_K)](
        qweight,
        sz,
        out,
        n,
        k // 8,
        GROUP=g,
        BLOCK_N=block_n,
        PACK_N_=PACK_N,
        num_warps=num_warps,
    )
    return out


def dequant_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: KernelConfig,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize to a temporary ``W`` then ``x @ W`` through cuBLAS (large M only)."""
    check_inputs(x, qweight, sz)
    w = dequant(qweight, sz, x.dtype, block_n=cfg.block_n, num_warps=cfg.num_warps)
    if out is not None:
        return torch.matmul(x, w, out=out)
    return torch.matmul(x, w)


LAUNCHERS = {
    "gemv": gemv,
    "fma": fma,
    "mma": mma,
    "mma_t": mma_t,
    "dequant_mm": dequant_mm,
    "cuda": w4a16_cuda.launch,  # the CUDA C++ batch-1 GEMV (kernels/cuda/w4a16_gemv.cu)
}
