"""Triton attention over the paged KV cache: decode (split-KV, CUDA-graph capturable) and prefill / mixed.

Layouts and semantics are those of :func:`lmkiln.kernels.attention_ref.paged_attention_ref` (the oracle):
query row ``i`` of sequence ``b`` sits at position ``seq_lens[b] - q_len[b] + i`` and attends causally to
every cached token up to it (a cached prefix, then the chunk's own tokens, already written by
:func:`lmkiln.kernels.kv_cache.write_kv`). int8 / int4 K and V are dequantized in registers
(``q * scale + zero``, per token and head).

One kernel serves both paths. A program owns one sequence ``b``, one KV head and a tile of ``BLOCK_M`` rows,
where a row is a (query token, query head of the KV head's group) pair: GQA heads share every K/V load and
the tile feeds ``tl.dot`` even for one decode token (rows padded to 16). The head dim is handled as two halves
(``[0, D/2)`` and ``[D/2, D)``; for int4, the even and odd elements = the low and high nibbles of a byte), so
int4 codes never need interleaving. Keys stream in ``BLOCK_N``-token tiles, each token's physical slot looked
up in the block table; online softmax in base 2, float32 accumulators.

* decode (``max_query_len == 1``, row ``b`` of ``q`` is sequence ``b``): grid ``(B, Hk, splits)``. With
  ``splits > 1`` (flash-decoding) each program takes ``1/splits`` of its sequence's keys (the split is
  computed in-kernel from ``seq_lens``) and writes a partial ``(acc, m, l)``; the last split of a (sequence,
  KV head) to finish merges them (an atomic counter, as split-K GEMMs do).
  Grid, split count and loop bounds depend only on tensor shapes and ``seq_lens`` is read on the device, so
  a launch replays in a CUDA graph. A padded batch row (``seq_len`` 0, block table -1) writes zeros.
* decode with ``new_kv`` (an unquantized cache; the engine's batch-1 steps): the step's K and V are not
  in the cache yet; each program applies the rotary to q and the new k itself, the split holding the new
  position stores the row, and every tile uses the new row from registers (no KV-write launch). With
  ``consume``, q, k and v are a float32 split-K accumulator (the qkv GEMV's atomic output), rounded on load
  and zeroed by the last program of each (sequence, KV head).
* prefill / mixed: grid ``(B, Hk, cdiv(max_query_len, BLOCK_M // G))``, no split.

Attention sinks (quantized caches): with ``sink_idx[b] >= 0``, key position 0 of sequence ``b`` is read from
``sink[sink_idx[b]]`` (exact K and V, natural element order) instead of its dequantized row. The rows are
loaded once per program and substituted only in the key tile that starts at 0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from lmkiln.kernels import attention_cuda, pdl
from lmkiln.kernels.fused import check_rotary, cos_sin, rotate_halves
from lmkiln.kernels.kv_cache import check_cache, check_sink
from lmkiln.kernels.pdl import interpreting

from lmkiln.errors import KernelInputError

log = logging.getLogger(__name__)

Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# One key tile (64 tokens) per split at least. Batch 1, 7B shape: one program per KV head streamed a 384-token
# context alone (latency bound); one tile per program runs them side by side (notes/engine.md, session 6).
MIN_SPLIT_KEYS = 64


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters (0 = the launcher's choice). ``block_m`` rows = tokens x grouped heads."""

    block_m: int = 0
    block_n: int = 0
    num_splits: int = 0  # decode only
    num_warps: int = 0
    num_stages: int = 0


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv(cache_ptr, sz_ptr, row, valid, offs_d, DH, BITS: tl.constexpr, CT: tl.constexpr):
    """K or V of the (slot, head) rows ``row [BN]`` (int64) as two ``[BN, BLOCK_DH]`` halves in ``CT``.

    Halves: elements ``[0, DH)`` and ``[DH, 2 DH)``; int4: even and odd elements (low and high nibbles).
    Invalid tokens and padded dims read as 0."""
    m = valid[:, None] & (offs_d < DH)[None, :]
    if BITS == 4:
        b = tl.load(cache_ptr + row[:, None] * DH + offs_d[None, :], mask=m, other=0)
        lo = (b & 0xF).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
    else:
        base = cache_ptr + row[:, None] * (2 * DH) + offs_d[None, :]
        lo = tl.load(base, mask=m, other=0)
        hi = tl.load(base + DH, mask=m, other=0)
    if BITS != 0:
        s = tl.load(sz_ptr + row * 2, mask=valid, other=0.0).to(tl.float32)[:, None]
        z = tl.load(sz_ptr + row * 2 + 1, mask=valid, other=0.0).to(tl.float32)[:, None]
        lo = lo.to(tl.float32) * s + z
        hi = hi.to(tl.float32) * s + z
    return lo.to(CT), hi.to(CT)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:  # fp32 inputs (and the interpreter, whose half-precision dot is unreliable): exact fp32 products
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# An eager step's block table is as wide as its longest sequence: without ``do_not_specialize`` Triton would
# compile a variant for width 1, for multiples of 16 and for the rest, so a session's second turn (three
# blocks after a one-block first turn) paid a new compile (scripts/experiments/session_compiles.py)
@triton.jit(do_not_specialize=["stride_bt", "max_blocks"])
def _paged_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ksz_ptr,
    vsz_ptr,
    o_ptr,
    ws_ptr,
    ml_ptr,
    tables_ptr,
    qsl_ptr,
    lens_ptr,
    sink_ptr,
    sidx_ptr,
    cnt_ptr,
    kn_ptr,
    vn_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_ct,
    stride_st,
    num_slots,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    max_blocks,
    Hk,
    DH,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    PAGE: tl.constexpr,
    BITS: tl.constexpr,
    SPLITS: tl.constexpr,
    DECODE: tl.constexpr,
    CT: tl.constexpr,
    F32: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_SINK: tl.constexpr = False,
    PDL: tl.constexpr = False,
    NEW_KV: tl.constexpr = False,
    CONSUME: tl.constexpr = False,
):
    pdl.enter(PDL)
    AT: tl.constexpr = o_ptr.dtype.element_ty  # the activations' dtype (q's, unless CONSUME)
    b = tl.program_id(0)
    hk = tl.program_id(1)
    if SPLITS > 1:
        tile = tl.program_id(2) // SPLITS
        split = tl.program_id(2) % SPLITS
    else:
        tile = tl.program_id(2)
        split = 0
    QPT: tl.constexpr = BLOCK_M // G  # query tokens per tile
    seq_len = tl.minimum(tl.load(lens_ptr + b), max_blocks * PAGE)  # never past the block table
    if DECODE:
        q_start = b
        q_len = 1
    else:
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
    ctx = seq_len - q_len  # tokens cached before this step's queries

    r = tl.arange(0, BLOCK_M)
    qi = tile * QPT + r // G
    hq = hk * G + r % G
    row_ok = (r < QPT * G) & (qi < q_len)
    pos = ctx + qi  # each row's causal limit (inclusive)
    kv_end = tl.maximum(tl.minimum(seq_len, ctx + tile * QPT + QPT), 0)
    if SPLITS > 1:
        per = tl.cdiv(tl.cdiv(kv_end, SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = split * per
        kv_hi = tl.minimum(kv_lo + per, kv_end)
    else:
        kv_lo = 0
        kv_hi = kv_end
    if not DECODE:  # a tile past this sequence's queries: nothing to do
        kv_hi = tl.where(tile * QPT < q_len, kv_hi, kv_lo)

    offs_d = tl.arange(0, BLOCK_DH)
    dmask = offs_d < DH
    if BITS == 4:  # halves = even / odd elements
        e_lo = 2 * offs_d
        e_hi = 2 * offs_d + 1
    else:
        e_lo = offs_d
        e_hi = offs_d + DH
    qmask = row_ok[:, None] & dmask[None, :]
    q_rows = q_ptr + (q_start + qi).to(tl.int64)[:, None] * stride_qt + hq[:, None] * stride_qh
    # CONSUME: q, k, v are float32 split-K accumulators, rounded here as the GEMM's output would be
    q_lo = tl.load(q_rows + e_lo[None, :], mask=qmask, other=0.0).to(AT)
    q_hi = tl.load(q_rows + e_hi[None, :], mask=qmask, other=0.0).to(AT)
    if NEW_KV:  # decode, fp16/bf16/fp32 cache: this step's K/V, with q, rotated here and not yet in the cache
        p_new = seq_len - 1  # the new token's key position
        c1, c2, s1, s2 = cos_sin(cos_ptr, sin_ptr, b, stride_ct, stride_st, DH, BLOCK_DH)
        q_lo, q_hi = rotate_halves(q_lo, q_hi, c1, c2, s1, s2)
        kn = kn_ptr + b.to(tl.int64) * stride_knt + hk * stride_knh + offs_d[None, :]
        vn = vn_ptr + b.to(tl.int64) * stride_vnt + hk * stride_vnh + offs_d[None, :]
        dm = dmask[None, :]
        k1 = tl.load(kn, mask=dm, other=0.0).to(AT)
        k2 = tl.load(kn + DH, mask=dm, other=0.0).to(AT)
        kn_lo, kn_hi = rotate_halves(k1, k2, c1, c2, s1, s2)
        CD: tl.constexpr = k_ptr.dtype.element_ty  # the cache's dtype: the new row as a cache read gives it
        kn_lo, kn_hi = kn_lo.to(CD), kn_hi.to(CD)
        vn_lo = tl.load(vn, mask=dm, other=0.0).to(AT).to(CD)
        vn_hi = tl.load(vn + DH, mask=dm, other=0.0).to(AT).to(CD)
    q_lo = q_lo.to(CT)
    q_hi = q_hi.to(CT)

    if HAS_SINK:  # this sequence's sink rows (K: row 2e, V: 2e + 1); without one, zeros at key -1 (none)
        sink_key = tl.where(tl.load(sidx_ptr + b) >= 0, 0, -1)  # the key position the sink replaces
        sid = tl.load(sidx_ptr + b + 0 * offs_d)  # as a vector: the interpreter mis-types scalar & tensor
        srow = (2 * tl.maximum(sid, 0).to(tl.int64) * Hk + hk) * (2 * DH)
        smask = dmask & (sid >= 0)
        sk_lo = tl.load(sink_ptr + srow + e_lo, mask=smask, other=0.0).to(CT)
        sk_hi = tl.load(sink_ptr + srow + e_hi, mask=smask, other=0.0).to(CT)
        sv_row = sink_ptr + srow + Hk * 2 * DH
        sv_lo = tl.load(sv_row + e_lo, mask=smask, other=0.0).to(CT)
        sv_hi = tl.load(sv_row + e_hi, mask=smask, other=0.0).to(CT)

    if NEW_KV:  # the split holding the new position stores the new row in the cache (as write_kv does)
        slot = tl.load(slot_ptr + b + 0 * offs_d).to(tl.int64)[None, :]  # vectors: the interpreter mis-types
        pv = (p_new + 0 * offs_d)[None, :]  # (scalar bool & bool tensor)
        wm = dm & (slot >= 0) & (slot < num_slots) & (pv >= kv_lo) & (pv < kv_hi)
        crow = (slot * Hk + hk) * (2 * DH) + offs_d[None, :]
        tl.store(k_ptr + crow, kn_lo, mask=wm)
        tl.store(k_ptr + crow + DH, kn_hi, mask=wm)
        tl.store(v_ptr + crow, vn_lo, mask=wm)
        tl.store(v_ptr + crow + DH, vn_hi, mask=wm)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_DH), tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_DH), tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_bt
    # fp16/bf16 decode: V's loads in flight with K's (small tiles; the NEW_KV row replaces V's too). Not
    # for quantized caches: two dequantized tiles at once spilled 560 bytes (int8, 2 warps) and made the
    # batch-256 decode kernel 34 % slower than V loaded after the softmax (notes/engine.md, session 9)
    EARLY_V: tl.constexpr = DECODE and BITS == 0
    for start in tl.range(kv_lo, kv_hi, BLOCK_N, num_stages=NUM_STAGES):
        t = start + tl.arange(0, BLOCK_N)
        tv = t < kv_hi
        blk = tl.load(table + t // PAGE, mask=tv, other=-1)
        tv = tv & (blk >= 0)
        row = (blk.to(tl.int64) * PAGE + t % PAGE) * Hk + hk
        k_lo, k_hi = _load_kv(k_ptr, ksz_ptr, row, tv, offs_d, DH, BITS, CT)
        if EARLY_V:
            v_lo, v_hi = _load_kv(v_ptr, vsz_ptr, row, tv, offs_d, DH, BITS, CT)
        if NEW_KV:  # the new key is not read back from the cache (no ordering with the store above needed)
            new = (t == p_new)[:, None]
            k_lo = tl.where(new, kn_lo.to(CT), k_lo)
            k_hi = tl.where(new, kn_hi.to(CT), k_hi)
            v_lo = tl.where(new, vn_lo.to(CT), v_lo)
            v_hi = tl.where(new, vn_hi.to(CT), v_hi)
        if HAS_SINK:  # noqa: SIM102 (a constexpr test, then a runtime one: Triton cannot fuse them)
            if start == 0:  # only the first tile holds key 0
                use = (t == sink_key)[:, None]
                k_lo = tl.where(use, sk_lo[None, :], k_lo)
                k_hi = tl.where(use, sk_hi[None, :], k_hi)
        s = _dot(q_lo, tl.trans(k_lo), F32) + _dot(q_hi, tl.trans(k_hi), F32)
        s = tl.where(tv[None, :] & (t[None, :] <= pos[:, None]), s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not EARLY_V:
            v_lo, v_hi = _load_kv(v_ptr, vsz_ptr, row, tv, offs_d, DH, BITS, CT)
        if HAS_SINK:  # noqa: SIM102
            if start == 0:
                use = (t == sink_key)[:, None]
                v_lo = tl.where(use, sv_lo[None, :], v_lo)
                v_hi = tl.where(use, sv_hi[None, :], v_hi)
        pc = p.to(CT)
        acc_lo = acc_lo * alpha[:, None] + _dot(pc, v_lo, F32)
        acc_hi = acc_hi * alpha[:, None] + _dot(pc, v_hi, F32)
        m_i = m_new

    t_row = (q_start + qi).to(tl.int64)
    if SPLITS > 1:  # partial results
        n_hq = Hk * G
        part = (t_row * n_hq + hq) * SPLITS + split
        ws = ws_ptr + part[:, None] * (2 * DH)
        tl.store(ws + e_lo[None, :], acc_lo, mask=qmask)
        tl.store(ws + e_hi[None, :], acc_hi, mask=qmask)
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        # the last split of (sequence b, KV head hk) to finish merges all of them
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + b * Hk + hk, 1, sem="acq_rel", scope="gpu")
        if count == SPLITS - 1:
            first = part - split
            m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            for sp in tl.static_range(SPLITS):
                mp = ml_ptr + (first + sp) * 2
                m_s = tl.load(mp, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                m_max = tl.maximum(m_max, m_s)
            m_use = tl.where(m_max == float("-inf"), 0.0, m_max)  # splits without keys weigh 0
            total = tl.zeros((BLOCK_M,), tl.float32)
            acc_lo = tl.zeros((BLOCK_M, BLOCK_DH), tl.float32)
            acc_hi = tl.zeros((BLOCK_M, BLOCK_DH), tl.float32)
            for sp in tl.static_range(SPLITS):
                mp = ml_ptr + (first + sp) * 2
                m_s = tl.load(mp, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(mp + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
                w = tl.exp2(m_s - m_use)
                total += w * l_s
                ws_s = ws_ptr + (first + sp)[:, None] * (2 * DH)
                lo = tl.load(ws_s + e_lo[None, :], mask=qmask, other=0.0, cache_modifier=".cg")
                hi = tl.load(ws_s + e_hi[None, :], mask=qmask, other=0.0, cache_modifier=".cg")
                acc_lo += w[:, None] * lo
                acc_hi += w[:, None] * hi
            den = tl.where(total > 0.0, total, 1.0)[:, None]  # no key at all: 0
            o_rows = o_ptr + t_row[:, None] * stride_ot + hq[:, None] * stride_oh
            tl.store(o_rows + e_lo[None, :], (acc_lo / den).to(o_ptr.dtype.element_ty), mask=qmask)
            tl.store(o_rows + e_hi[None, :], (acc_hi / den).to(o_ptr.dtype.element_ty), mask=qmask)
            if CONSUME:  # every split has read q, k and v (the counter): zero them for the GEMM
                _zero_qkv(q_rows, e_lo, e_hi, qmask, kn, vn, dm, DH)
            tl.atomic_xchg(cnt_ptr + b * Hk + hk, 0)
    else:
        inv = (1.0 / tl.where(l_i > 0.0, l_i, 1.0))[:, None]  # no key (padded row): acc is 0, out 0
        o_rows = o_ptr + t_row[:, None] * stride_ot + hq[:, None] * stride_oh
        tl.store(o_rows + e_lo[None, :], (acc_lo * inv).to(o_ptr.dtype.element_ty), mask=qmask)
        tl.store(o_rows + e_hi[None, :], (acc_hi * inv).to(o_ptr.dtype.element_ty), mask=qmask)
        if CONSUME:  # the one program of (b, hk) has read q, k and v: zero them for the GEMM
            tl.debug_barrier()
            _zero_qkv(q_rows, e_lo, e_hi, qmask, kn, vn, dm, DH)


@triton.jit
def _zero_qkv(q_rows, e_lo, e_hi, qmask, kn, vn, dm, DH):
    """Zero a consumed split-K accumulator's q rows, new k and new v of one (sequence, KV head)."""
    zq = tl.zeros(qmask.shape, tl.float32)
    tl.store(q_rows + e_lo[None, :], zq, mask=qmask)
    tl.store(q_rows + e_hi[None, :], zq, mask=qmask)
    zk = tl.zeros(dm.shape, tl.float32)
    tl.store(kn, zk, mask=dm)
    tl.store(kn + DH, zk, mask=dm)
    tl.store(vn, zk, mask=dm)
    tl.store(vn + DH, zk, mask=dm)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Split-KV factor from shapes only (stable under CUDA-graph replay): the largest power of two that keeps
    the programs within two per SM (the fp16 decode kernel's occupancy: ~235 registers x 4 warps), each
    split keeping at least :data:`MIN_SPLIT_KEYS` of the longest possible context's keys. The kernel divides
    the actual context, so a short one leaves the last splits empty. H100, 7B int4, batch 1 (32 KV heads,
    ~160 cached tokens): 4 splits 2.159 ms a step, 8 2.173, 16 (512 programs, two rounds) 2.299
    (scripts/experiments/decode_ablation.py, session 7); this rule picked 16 by rounding up before."""
    progs = batch * num_kv_heads
    sms = _num_sms(device)
    if progs >= sms or device.type != "cuda":
        return 1
    want = 1 << ((2 * sms // progs).bit_length() - 1)  # largest power of 2 <= 2 * sms / progs
    cap = 1 << (max(1, max_tokens // MIN_SPLIT_KEYS).bit_length() - 1)  # largest power of 2 <= that many
    return min(want, cap, MAX_SPLITS)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    k_sz: torch.Tensor | None,
    v_sz: torch.Tensor | None,
    bits: int,
) -> tuple[int, int, int, int]:
    """Validate the common inputs; returns (num_q_heads, num_kv_heads, head_dim, group)."""
    if q.dim() != 3 or q.stride(2) != 1:
        raise KernelInputError(
            f"q must be [tokens, num_q_heads, head_dim] with a contiguous last dim, got shape "
            f"{list(q.shape)} strides {q.stride()}"
        )
    if q.dtype not in Q_DTYPES:
        raise KernelInputError(f"q must be fp16, bf16 or fp32, got {q.dtype}")
    _, hq, d = q.shape
    if k_cache.dim() != 4:
        raise KernelInputError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, W], got {list(k_cache.shape)}"
        )
    hk = k_cache.shape[2]
    if hq % hk:
        raise KernelInputError(f"num_q_heads {hq} must be a multiple of num_kv_heads {hk} (GQA)")
    if d % 2:
        raise KernelInputError(f"head_dim must be even, got {d}")
    check_cache(k_cache, k_sz, bits, hk, d, "k")
    check_cache(v_cache, v_sz, bits, hk, d, "v")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise KernelInputError("k_cache and v_cache must have the same shape and dtype")
    page = k_cache.shape[1]
    if page & (page - 1):
        raise KernelInputError(f"block_size must be a power of two, got {page}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise KernelInputError(
            f"block_tables must be int32 [num_seqs, max_blocks] with contiguous rows, got "
            f"{block_tables.dtype} {list(block_tables.shape)}"
        )
    nseq = block_tables.shape[0]
    if seq_lens.shape != (nseq,) or seq_lens.dtype != torch.int32:
        raise KernelInputError(
            f"seq_lens must be int32 [{nseq}], got {seq_lens.dtype} {list(seq_lens.shape)}"
        )
    devices = {x.device for x in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise KernelInputError(f"attention tensors must share one device, got {sorted(map(str, devices))}")
    return hq, hk, d, hq // hk


def _check_sink(
    sink: torch.Tensor | None,
    sink_idx: torch.Tensor | None,
    bits: int,
    hk: int,
    d: int,
    q: torch.Tensor,
    nseq: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate the sinks (both or neither are used): ``sink [E, 2, Hk, D]``, ``sink_idx`` int32 ``[B]``."""
    if sink is None or sink_idx is None:
        return None, None
    check_sink(sink, bits, hk, d, q.device)
    if sink_idx.shape != (nseq,) or sink_idx.dtype != torch.int32 or sink_idx.device != q.device:
        raise KernelInputError(
            f"sink_idx must be int32 [{nseq}] on {q.device} (one sink entry per sequence, -1 for none), got "
            f"{sink_idx.dtype} {list(sink_idx.shape)} on {sink_idx.device}"
        )
    return sink, sink_idx


def _out(q: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or q.dtype
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.shape != q.shape or out.dtype != dtype or out.stride(2) != 1 or out.device != q.device:
        raise KernelInputError(
            f"out must be {dtype} {list(q.shape)} on {q.device} with a contiguous last dim, got "
            f"{out.dtype} {list(out.shape)} on {out.device}"
        )
    return out


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_sz: torch.Tensor | None,
    v_sz: torch.Tensor | None,
    bits: int,
    out: torch.Tensor,
    g: int,
    n_tiles: int,
    splits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    decode: bool,
    sink: torch.Tensor | None = None,
    sink_idx: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, ...] | None = None,
    consume: bool = False,
) -> None:
    t, hq, d = q.shape
    hk = k_cache.shape[2]
    nseq = block_tables.shape[0]
    dh = d // 2
    if splits > 1 and counters is None:
        raise KernelInputError("a split launch needs the split counters (make_counters)")
    if splits > 1:
        ws = torch.empty((t, hq, splits, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((t, hq, splits, 2), dtype=torch.float32, device=q.device)
    else:
        ws = ml = out
    f32 = out.dtype == torch.float32 or interpreting()  # out: the activations' dtype (q's unless consume)
    on = pdl.enabled(q.device)
    kn, vn, slots, cos, sin = new_kv if new_kv is not None else (q, q, seq_lens, q, q)  # else never read
    _paged_attn_kernel[(nseq, hk, n_tiles * splits)](
        q,
        k_cache,
        v_cache,
        k_sz if bits else k_cache,
        v_sz if bits else v_cache,
        out,
        ws,
        ml,
        block_tables,
        query_start_loc,
        seq_lens,
        sink if sink is not None else k_cache,
        sink_idx if sink_idx is not None else seq_lens,
        counters if splits > 1 else seq_lens,
        kn,
        vn,
        cos,
        sin,
        slots,
        kn.stride(0),
        kn.stride(1),
        vn.stride(0),
        vn.stride(1),
        cos.stride(0),
        sin.stride(0),
        k_cache.shape[0] * k_cache.shape[1],
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        block_tables.shape[1],
        hk,
        dh,
        G=g,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DH=max(16, triton.next_power_of_2(dh)),
        PAGE=k_cache.shape[1],
        BITS=bits,
        SPLITS=splits,
        DECODE=decode,
        CT=tl.float32 if f32 else (tl.float16 if out.dtype == torch.float16 else tl.bfloat16),
        F32=f32,
        NUM_STAGES=num_stages,
        HAS_SINK=sink is not None and sink_idx is not None,
        PDL=on,
        NEW_KV=new_kv is not None,
        CONSUME=consume,
        num_warps=num_warps,
        # no FMA contraction where the kernel rotates the new K: rounded as write_kv's rotary (bit-identical)
        **({"enable_fp_fusion": False} if new_kv is not None and not interpreting() else {}),
        **pdl.launch_opts(on),
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    bits: int = 0,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    sink_idx: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    consume: bool = False,
) -> torch.Tensor:
    """One query token per sequence: ``q [B, Hq, D]`` (row ``b`` is sequence ``b``) over ``seq_lens[b]``
    cached tokens -> ``[B, Hq, D]`` in ``q.dtype`` (with ``consume``, in ``cos``'s).

    No host synchronisation and a grid that depends only on shapes: capturable in a CUDA graph. Rows with
    ``seq_lens`` 0 give zeros. ``sink``/``sink_idx``: see ``paged_attention_ref`` (quantized caches).
    The keys may be split over several programs (``config.num_splits``, else :func:`decode_splits`); the last
    split of each (sequence, KV head) to finish merges the partials (split counters: ``counters`` from
    :func:`make_counters`, at least ``B * Hk``, which every launch leaves zeroed; without them a zeroed set
    is made for this call).

    ``new_kv = (k, v, slot_mapping, cos, sin)`` (an unquantized cache): this step's keys and values ``[B, Hk,
    D]`` are not in the cache yet, and q and k have no rotary yet. The kernel applies the rotary to q and k
    (as ``fused.rotary_``), stores k and v in ``slot_mapping``'s slots (as ``kv_cache.write_kv``; slots < 0
    skipped) and attends with them at position ``seq_lens[b] - 1``: the same results as ``write_kv(...,
    rope=(q, cos, sin))`` then this kernel, in one launch instead of two. q, k and v are not modified. Where
    :func:`attention_cuda.usable` holds (Hopper, NVRTC, fp16, head dim 64 / 128), the CUDA kernel of the same
    contract runs instead (at most 8 splits; the counters are then unused).

    ``consume`` (with ``new_kv``): q, k and v are views of a float32 split-K accumulator
    (``Int4Linear.matmul_acc`` of the fused qkv projection): they are rounded to ``cos``'s dtype first, as
    the GEMM's own output would be, and zeroed for the GEMM's next launch by the last program of each
    (sequence, KV head) to read them."""
    cfg = config or AttentionConfig()
    _, hk, d, g = _check(q, k_cache, v_cache, block_tables, seq_lens, k_sz, v_sz, bits)
    if q.shape[0] != block_tables.shape[0]:
        raise KernelInputError(
            f"decode takes one query per sequence: q has {q.shape[0]} rows for {block_tables.shape[0]} "
            "sequences"
        )
    sink, sink_idx = _check_sink(sink, sink_idx, bits, hk, d, q, block_tables.shape[0])
    if consume and new_kv is None:
        raise KernelInputError("consume=True reads this step's q, k and v from an accumulator: pass new_kv")
    out = _out(q, out, new_kv[3].dtype if consume and new_kv is not None else None)
    if q.shape[0] == 0:
        return out
    block_m = cfg.block_m or max(16, triton.next_power_of_2(g))
    if block_m < g or block_m & (block_m - 1) or block_m < 16:
        raise KernelInputError(f"decode block_m must be a power of two >= max(16, group {g}), got {block_m}")
    block_n = cfg.block_n or (32 if d > 128 else 64)
    page = k_cache.shape[1]
    splits = cfg.num_splits or decode_splits(q.shape[0], hk, block_tables.shape[1] * page, q.device)
    splits = max(1, min(splits, MAX_SPLITS))
    if counters is not None:
        _check_counters(counters, q.shape[0] * hk, q.device)
    if new_kv is not None:
        _check_new_kv(new_kv, q, k_cache, bits, sink, consume)
        if attention_cuda.usable(q, k_cache, v_cache, new_kv, consume):  # merges its splits without counters
            splits = min(splits, attention_cuda.MAX_SPLITS)
            return attention_cuda.decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out, new_kv,
                                         consume, splits)
    if counters is None and splits > 1:
        counters = make_counters(q.device, q.shape[0] * hk)
    _launch(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,  # unused with DECODE
        seq_lens,
        scale,
        k_sz,
        v_sz,
        bits,
        out,
        g,
        1,
        splits,
        block_m,
        block_n,
        # quantized caches: 2 warps (H100, 7B shape, batch 64: int8 1.61 vs 1.11 TB/s with 4 warps, int4 0.97
        # vs 0.81; `python -m lmkiln.bench.attention --sweep`)
        cfg.num_warps or (2 if bits else 4),
        cfg.num_stages or 2,
        True,
        sink,
        sink_idx,
        counters,
        new_kv,
        consume,
    )
    return out


def _check_new_kv(
    new_kv: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    bits: int,
    sink: torch.Tensor | None,
    consume: bool,
) -> None:
    if len(new_kv) != 5:
        raise KernelInputError("new_kv must be (k, v, slot_mapping, cos, sin)")
    if bits or sink is not None:
        raise KernelInputError(
            "new_kv writes the new rows itself, unquantized: it needs a float cache (bits=0) and no sinks; "
            "call kv_cache.write_kv first for quantized caches"
        )
    k, v, slots, cos, sin = new_kv
    if consume:  # float32 accumulator views; cos / sin in the activations' dtype
        if q.dtype != torch.float32 or cos.dtype not in (torch.float16, torch.bfloat16):
            raise KernelInputError(
                f"consume=True takes float32 q, k, v (a split-K accumulator) and fp16/bf16 cos/sin, got q "
                f"{q.dtype}, cos {cos.dtype}"
            )
        t, d = q.shape[0], q.shape[2]
        for name, x in (("cos", cos), ("sin", sin)):
            if tuple(x.shape) != (t, d) or x.dtype != cos.dtype or x.stride(1) != 1 or x.device != q.device:
                raise KernelInputError(
                    f"{name} must be {cos.dtype} [tokens, head_dim] = [{t}, {d}] on {q.device} with a "
                    f"contiguous last dim, got {x.dtype} {list(x.shape)} on {x.device}"
                )
    else:
        check_rotary(q, k, cos, sin)
    want = (q.shape[0], k_cache.shape[2], q.shape[2])
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != want or x.dtype != q.dtype or x.stride(2) != 1:
            raise KernelInputError(
                f"new_kv's {name} must be {q.dtype} {list(want)} with a contiguous last dim, got {x.dtype} "
                f"{list(x.shape)} strides {x.stride()}"
            )
    ok = slots.dtype in (torch.int32, torch.int64) and slots.device == q.device
    if slots.shape != (q.shape[0],) or not ok:
        raise KernelInputError(
            f"new_kv's slot_mapping must be int32/int64 [{q.shape[0]}] on {q.device}, got {slots.dtype} "
            f"{list(slots.shape)} on {slots.device}"
        )


def make_counters(device: torch.device | str, n: int = 1 << 15) -> torch.Tensor:
    """Zeroed int32 split counters for :func:`paged_decode` (every launch leaves them zeroed); one per
    stream, enough for ``n`` (sequence, KV head) pairs."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def _check_counters(counters: torch.Tensor, need: int, device: torch.device) -> None:
    if counters.dtype != torch.int32 or counters.device != device or counters.numel() < need:
        raise KernelInputError(
            f"decode split counters must be a zeroed int32 tensor with at least batch x KV heads = {need} "
            f"elements on {device}, got {counters.dtype} [{counters.numel()}] on {counters.device}; make one "
            "with make_counters()"
        )


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    bits: int = 0,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    sink_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention of ``q [T, Hq, D]`` over the paged cache (``paged_attention_ref``'s contract):
    queries of sequence ``b`` are rows ``query_start_loc[b]:query_start_loc[b + 1]``, the last of its
    ``seq_lens[b]`` cached tokens (a cached prefix, then the chunk). ``max_query_len`` sizes the grid."""
    cfg = config or AttentionConfig()
    _, hk, d, g = _check(q, k_cache, v_cache, block_tables, seq_lens, k_sz, v_sz, bits)
    nseq = block_tables.shape[0]
    sink, sink_idx = _check_sink(sink, sink_idx, bits, hk, d, q, nseq)
    if query_start_loc.shape != (nseq + 1,) or query_start_loc.dtype != torch.int32:
        raise KernelInputError(
            f"query_start_loc must be int32 [{nseq + 1}], got {query_start_loc.dtype} "
            f"{list(query_start_loc.shape)}"
        )
    if query_start_loc.device != q.device:
        raise KernelInputError(f"query_start_loc is on {query_start_loc.device}, q on {q.device}")
    out = _out(q, out)
    if q.shape[0] == 0 or max_query_len <= 0:
        return out
    block_m = cfg.block_m or max(64, triton.next_power_of_2(g))
    if block_m < g or block_m & (block_m - 1) or block_m < 16:
        raise KernelInputError(f"prefill block_m must be a power of two >= max(16, group {g}), got {block_m}")
    block_n = cfg.block_n or (32 if d > 128 else 64)
    n_tiles = triton.cdiv(max_query_len, block_m // g)
    _launch(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        k_sz,
        v_sz,
        bits,
        out,
        g,
        n_tiles,
        1,
        block_m,
        block_n,
        cfg.num_warps or 4,
        cfg.num_stages or 2,
        False,
        sink,
        sink_idx,
    )
    return out
