"""Triton KV-cache write: new ``k, v [T, Hk, D]`` into their slots, optionally quantized to int8 / int4.

The cache layouts and the quantization math are those of :mod:`lmkiln.kernels.attention_ref`
(``write_kv_ref`` is the oracle): asymmetric per token and per head, ``x ≈ q * scale + zero``, ``(scale,
zero)`` rounded to fp16 first and the codes computed with the rounded values (IEEE division, round half to
even), so the kernel's codes are bit-identical to the reference's. int4 codes pack two per byte, element
``2i`` in the low nibble. Slots < 0 (padding rows of a CUDA-graph batch) and slots past the cache are
skipped. One program writes K and V of ``BLOCK_H`` heads of one token. Quantized caches may also keep
attention sinks: a token with ``sink_slot >= 0`` stores its exact K (offset subtracted) and V in that entry of
``sink [E, 2, Hk, D]`` too (natural element order, the sink's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmkiln.kernels import pdl
from lmkiln.kernels.attention_ref import INT4_CLIP_STEP, INT4_CLIP_STEPS
from lmkiln.kernels.fused import check_rotary, cos_sin, rotate_heads
from lmkiln.kernels.pdl import interpreting
from triton.language.extra import libdevice

from lmkiln.errors import KernelInputError

SZ_DTYPE = torch.float16
# the int4 range search (see attention_ref), as constexprs: a jit function may read no other globals
_CLIP_STEPS = tl.constexpr(INT4_CLIP_STEPS)
_CLIP_STEP = tl.constexpr(INT4_CLIP_STEP)
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rint(x, INTERP: tl.constexpr):
    """Round half to even (``torch.round``). The interpreter has no libdevice: there, the fp32 magic-number
    trick, exact for ``|x| < 2**22`` (codes are in ``[0, 255]``)."""
    if INTERP:
        return (x + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(x)


@triton.jit
def _codes(x, lo, hi, QMAX: tl.constexpr, INTERP: tl.constexpr):
    """Codes of ``x [BH, BD]`` for the row ranges ``[lo, hi]``: float32 codes, fp16-rounded scale, zero."""
    scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), 1e-8)
    scale = scale.to(tl.float16).to(tl.float32)
    zero = lo.to(tl.float16).to(tl.float32)
    safe = tl.where(scale > 0.0, scale, 1.0)
    q = _rint(tl.math.div_rn(x - zero[:, None], safe[:, None]), INTERP)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    q = tl.where(scale[:, None] > 0.0, q, 0.0)
    return q, scale, zero


@triton.jit
def _sq_err(x, valid, q, scale, zero):
    """Per-row float64 sum of squared dequantization errors (exact products: codes x fp16 values)."""
    d = (q.to(tl.float64) * scale[:, None].to(tl.float64) + zero[:, None].to(tl.float64)) - x.to(tl.float64)
    return tl.sum(tl.where(valid, d * d, 0.0), axis=1)


@triton.jit
def _quantize(
    x,
    valid,
    QMAX: tl.constexpr,
    INTERP: tl.constexpr,
    CLIP_STEPS: tl.constexpr = 1,
    CLIP_STEP: tl.constexpr = 0.0,
):
    """``x [BH, BD]`` float32 (invalid entries ignored) -> float32 codes, fp16-rounded scale, zero ``[BH]``.

    Matches ``quantize_kv_ref``: the range is divided by ``QMAX`` and clamped at 1e-8 in float32, scale and
    zero are rounded through fp16, codes are ``rint((x - zero) / scale)`` clamped to ``[0, QMAX]``. A scale
    that rounds to 0 in fp16 (a range below ~4e-6) gives code 0 (the reference divides by 0 there; either way
    the value dequantizes to ``zero``). ``CLIP_STEPS > 1``: the reference's int4 range search."""
    lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    empty = hi < lo  # a row with no valid entry (a padded head, never stored): keep its arithmetic finite
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    q, scale, zero = _codes(x, lo, hi, QMAX, INTERP)
    if CLIP_STEPS > 1:
        mid = (hi + lo) * 0.5
        half = (hi - lo) * 0.5
        best = _sq_err(x, valid, q, scale, zero)
        for i in tl.static_range(1, CLIP_STEPS):
            qc, sc, zc = _codes(
                x, mid - half * (1.0 - CLIP_STEP * i), mid + half * (1.0 - CLIP_STEP * i), QMAX, INTERP
            )
            err = _sq_err(x, valid, qc, sc, zc)
            better = err < best
            q = tl.where(better[:, None], qc, q)
            scale = tl.where(better, sc, scale)
            zero = tl.where(better, zc, zero)
            best = tl.minimum(err, best)
    return q, scale, zero


@triton.jit
def _write_one(
    x_ptr,
    cache_ptr,
    sz_ptr,
    tok,
    stride_t,
    stride_h,
    slot,
    ok,
    offs_h,
    offs_d,
    Hk,
    D,
    off_ptr,
    sink_ptr,
    srow,
    sok,
    BITS: tl.constexpr,
    HAS_OFF: tl.constexpr,
    HAS_SINK: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Write the heads ``offs_h`` of token ``tok`` of ``x`` into cache row ``slot`` (masked by ``ok``); with
    ``HAS_OFF``, ``x - offset[head]`` (``offset [Hk, D]`` float32). With ``HAS_SINK``, the same (unquantized)
    values also go to the sink rows ``srow [BLOCK_H]`` (``D`` elements each) where ``sok``."""
    hmask = (offs_h < Hk) & ok
    row = slot * Hk + offs_h  # int64 (slot, head) row index; slot and ok are [BLOCK_H] vectors
    src = x_ptr + tok * stride_t + offs_h[:, None] * stride_h
    if BITS == 4:
        DH = D // 2
        dmask = offs_d < DH
        m = hmask[:, None] & dmask[None, :]
        xe = tl.load(src + 2 * offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        xo = tl.load(src + 2 * offs_d[None, :] + 1, mask=m, other=0.0).to(tl.float32)
        if HAS_OFF:
            off = off_ptr + offs_h[:, None] * D + 2 * offs_d[None, :]
            xe -= tl.load(off, mask=m, other=0.0)
            xo -= tl.load(off + 1, mask=m, other=0.0)
        if HAS_SINK:
            sm = m & sok[:, None]
            dst = sink_ptr + srow[:, None] * D + 2 * offs_d[None, :]
            tl.store(dst, xe.to(sink_ptr.dtype.element_ty), mask=sm)
            tl.store(dst + 1, xo.to(sink_ptr.dtype.element_ty), mask=sm)
        BH: tl.constexpr = offs_h.shape[0]
        BD: tl.constexpr = offs_d.shape[0]
        x = tl.reshape(tl.join(xe, xo), (BH, 2 * BD))  # both halves share the head's range
        valid = tl.reshape(tl.join(m, m), (BH, 2 * BD))
        q, scale, zero = _quantize(x, valid, 15, INTERP, _CLIP_STEPS, _CLIP_STEP)
        qe, qo = tl.split(tl.reshape(q.to(tl.uint8), (BH, BD, 2)))
        tl.store(cache_ptr + row[:, None] * DH + offs_d[None, :], qe | (qo << 4), mask=m)
    else:
        dmask = offs_d < D
        m = hmask[:, None] & dmask[None, :]
        x = tl.load(src + offs_d[None, :], mask=m, other=0.0)
        if BITS == 8:
            x = x.to(tl.float32)
            if HAS_OFF:
                x -= tl.load(off_ptr + offs_h[:, None] * D + offs_d[None, :], mask=m, other=0.0)
            if HAS_SINK:
                dst = sink_ptr + srow[:, None] * D + offs_d[None, :]
                tl.store(dst, x.to(sink_ptr.dtype.element_ty), mask=m & sok[:, None])
            q, scale, zero = _quantize(x, m, 255, INTERP)
            tl.store(cache_ptr + row[:, None] * D + offs_d[None, :], q.to(tl.uint8), mask=m)
        else:
            tl.store(cache_ptr + row[:, None] * D + offs_d[None, :], x.to(cache_ptr.dtype.element_ty), mask=m)
    if BITS != 0:
        tl.store(sz_ptr + row * 2, scale.to(tl.float16), mask=hmask)
        tl.store(sz_ptr + row * 2 + 1, zero.to(tl.float16), mask=hmask)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    q_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    ksz_ptr,
    vsz_ptr,
    slot_ptr,
    koff_ptr,
    sink_ptr,
    sslot_ptr,
    num_slots,
    num_sinks,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qt,
    stride_qh,
    stride_ct,
    stride_st,
    Hq,
    Hk,
    D,
    BITS: tl.constexpr,
    HAS_OFF: tl.constexpr,
    HAS_SINK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr,
    PDL: tl.constexpr,
    ROTARY: tl.constexpr = False,
    BLOCK_HQ: tl.constexpr = 1,
    HALF: tl.constexpr = 1,
):
    pdl.enter(PDL)
    tok = tl.program_id(0)
    if ROTARY:  # rotate this token's K heads of the program, and their group's Q heads, in place first
        c1, c2, s1, s2 = cos_sin(cos_ptr, sin_ptr, tok, stride_ct, stride_st, D // 2, HALF)
        head0 = tl.program_id(1) * BLOCK_H
        rotate_heads(k_ptr, tok, stride_kt, stride_kh, Hk, head0, c1, c2, s1, s2, D // 2, BLOCK_H, HALF)
        q0 = head0 * (Hq // Hk)
        q_end = tl.minimum(Hq, q0 + BLOCK_H * (Hq // Hk))
        rotate_heads(q_ptr, tok, stride_qt, stride_qh, q_end, q0, c1, c2, s1, s2, D // 2, BLOCK_HQ, HALF)
        tl.debug_barrier()  # the rotated K, stored by other threads of the program, is read back below
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # the slot as a [BLOCK_H] vector: the interpreter mis-types (scalar bool & bool tensor)
    slot = tl.load(slot_ptr + tok + 0 * offs_h).to(tl.int64)
    ok = (slot >= 0) & (slot < num_slots)
    if HAS_SINK:  # sink entry e: K rows (2e) * Hk + h, V rows (2e + 1) * Hk + h
        ss = tl.load(sslot_ptr + tok + 0 * offs_h).to(tl.int64)
        sok = (ss >= 0) & (ss < num_sinks)
        ks_row = 2 * ss * Hk + offs_h
    else:
        sok = ok
        ks_row = slot
    _write_one(
        k_ptr, kc_ptr, ksz_ptr, tok, stride_kt, stride_kh, slot, ok, offs_h, offs_d, Hk, D, koff_ptr,
        sink_ptr, ks_row, sok, BITS, HAS_OFF, HAS_SINK, INTERP,
    )
    _write_one(
        v_ptr, vc_ptr, vsz_ptr, tok, stride_vt, stride_vh, slot, ok, offs_h, offs_d, Hk, D, koff_ptr,
        sink_ptr, ks_row + Hk, sok, BITS, False, HAS_SINK, INTERP,
    )


def check_cache(
    cache: torch.Tensor, sz: torch.Tensor | None, bits: int, num_kv_heads: int, head_dim: int, name: str
) -> None:
    """Validate one layer's ``[num_blocks, block_size, Hk, W]`` cache (and its ``sz``) for ``bits``."""
    if bits not in (0, 4, 8):
        raise KernelInputError(f"KV cache bits must be 0, 4 or 8, got {bits}")
    width = head_dim // 2 if bits == 4 else head_dim
    if cache.dim() != 4 or cache.shape[2:] != (num_kv_heads, width):
        raise KernelInputError(
            f"{name} cache must be [num_blocks, block_size, {num_kv_heads}, {width}] for {num_kv_heads} KV "
            f"heads of dim {head_dim} at {bits} bits, got {list(cache.shape)}"
        )
    if not cache.is_contiguous():
        raise KernelInputError(
            f"{name} cache must be contiguous (one layer of KVCache), got strides {cache.stride()}"
        )
    if bits:
        if cache.dtype != torch.uint8:
            raise KernelInputError(f"a {bits}-bit {name} cache holds uint8 codes, got {cache.dtype}")
        if sz is None:
            raise KernelInputError(f"a {bits}-bit {name} cache needs its (scale, zero) tensor {name}_sz")
        if sz.shape != (*cache.shape[:3], 2) or sz.dtype != SZ_DTYPE or not sz.is_contiguous():
            raise KernelInputError(
                f"{name}_sz must be a contiguous fp16 [{', '.join(map(str, cache.shape[:3]))}, 2] tensor, "
                f"got "
                f"{sz.dtype} {list(sz.shape)}"
            )
        if sz.device != cache.device:
            raise KernelInputError(f"{name}_sz is on {sz.device} but the {name} cache on {cache.device}")
    elif cache.dtype not in KV_DTYPES:
        raise KernelInputError(f"an unquantized {name} cache must be fp16, bf16 or fp32, got {cache.dtype}")


def check_offset(
    offset: torch.Tensor | None, bits: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> None:
    """Validate a K offset (see :func:`lmkiln.kernels.attention_ref.write_kv_ref`)."""
    if offset is None:
        return
    if not bits:
        raise KernelInputError("a K offset only applies to a quantized (int8 / int4) cache; pass None")
    shape_ok = offset.shape == (num_kv_heads, head_dim)
    if not shape_ok or offset.dtype != torch.float32 or not offset.is_contiguous():
        raise KernelInputError(
            f"k_offset must be a contiguous float32 [{num_kv_heads}, {head_dim}] tensor, got {offset.dtype} "
            f"{list(offset.shape)}"
        )
    if offset.device != device:
        raise KernelInputError(f"k_offset is on {offset.device} but k on {device}")


def check_sink(
    sink: torch.Tensor | None, bits: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> None:
    """Validate a layer's attention sinks ``[entries, 2, num_kv_heads, head_dim]`` (quantized caches only)."""
    if sink is None:
        return
    if not bits:
        raise KernelInputError("attention sinks only apply to a quantized (int8 / int4) cache; pass None")
    if sink.dim() != 4 or sink.shape[1:] != (2, num_kv_heads, head_dim) or not sink.is_contiguous():
        raise KernelInputError(
            f"sink must be a contiguous [entries, 2, {num_kv_heads}, {head_dim}] tensor (K then V), got "
            f"shape {list(sink.shape)} strides {sink.stride()}"
        )
    if sink.dtype not in KV_DTYPES:
        raise KernelInputError(f"sink must be fp16, bf16 or fp32, got {sink.dtype}")
    if sink.device != device:
        raise KernelInputError(f"sink is on {sink.device} but k on {device}")


def _check_tokens(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise KernelInputError(
            f"{name} must be [tokens, heads, head_dim] with a contiguous last dim, got shape {list(x.shape)} "
            f"strides {x.stride()}"
        )
    if x.dtype not in KV_DTYPES:
        raise KernelInputError(f"{name} must be fp16, bf16 or fp32, got {x.dtype}")


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    bits: int = 0,
    k_offset: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    sink_slot: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Store ``k, v [T, Hk, D]`` in the slots ``slot_mapping [T]`` (quantized when ``bits`` is 4 or 8).

    Same contract as ``write_kv_ref`` (``k_offset``: a float32 ``[Hk, D]`` subtracted from K before it is
    quantized; ``sink [E, 2, Hk, D]`` with ``sink_slot [T]``: exact copies of the tokens whose sink slot is
    >= 0), plus: slots < 0 are skipped, and so are sink slots < 0 or >= E. No host synchronisation (CUDA-graph
    capturable). ``rope = (q, cos, sin)``: first rotate ``q [T, Hq, D]`` and ``k`` in place, exactly as
    ``fused.rotary_(q, k, cos, sin)`` does (one launch instead of two; Hq a multiple of Hk)."""
    _check_tokens(k, "k")
    _check_tokens(v, "v")
    if k.shape != v.shape:
        raise KernelInputError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    t, hk, d = k.shape
    if bits == 4 and d % 2:
        raise KernelInputError(f"int4 KV packs two values per byte; head_dim {d} is odd")
    check_cache(k_cache, k_sz, bits, hk, d, "k")
    check_cache(v_cache, v_sz, bits, hk, d, "v")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise KernelInputError("k_cache and v_cache must have the same shape and dtype")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(
            f"slot_mapping must be int32/int64 [{t}] (one slot per token), got {slot_mapping.dtype} "
            f"{list(slot_mapping.shape)}"
        )
    devices = {x.device for x in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise KernelInputError(f"write_kv tensors must share one device, got {sorted(map(str, devices))}")
    check_offset(k_offset, bits, hk, d, k.device)
    if sink is not None and sink_slot is not None:
        check_sink(sink, bits, hk, d, k.device)
        if sink_slot.shape != (t,) or sink_slot.dtype not in (torch.int32, torch.int64):
            raise KernelInputError(
                f"sink_slot must be int32/int64 [{t}] (one entry per token, -1 for none), got "
                f"{sink_slot.dtype} {list(sink_slot.shape)}"
            )
        if sink_slot.device != k.device:
            raise KernelInputError(f"sink_slot is on {sink_slot.device} but k on {k.device}")
    else:
        sink = sink_slot = None
    if rope is not None:
        check_rotary(rope[0], k, rope[1], rope[2])
        if hk == 0 or rope[0].shape[1] % hk:
            raise KernelInputError(
                f"rope's q has {rope[0].shape[1]} heads: the fused rotary needs a multiple of k's {hk} heads"
            )
    if t == 0:
        return
    block_d = triton.next_power_of_2(d // 2 if bits == 4 else d)
    block_h = min(triton.next_power_of_2(hk), max(1, 2048 // block_d))
    q, cos, sin = rope if rope is not None else (k, k, k)  # never dereferenced without rope
    dummy = k_cache  # never dereferenced when bits == 0
    on = pdl.enabled(k.device)
    _write_kv_kernel[(t, triton.cdiv(hk, block_h))](
        k,
        v,
        q,
        cos,
        sin,
        k_cache,
        v_cache,
        k_sz if bits else dummy,
        v_sz if bits else dummy,
        slot_mapping,
        k_offset if k_offset is not None else dummy,
        sink if sink is not None else dummy,
        sink_slot if sink_slot is not None else slot_mapping,
        k_cache.shape[0] * k_cache.shape[1],
        sink.shape[0] if sink is not None else 0,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q.stride(0),
        q.stride(1),
        cos.stride(0),
        sin.stride(0),
        q.shape[1],
        hk,
        d,
        BITS=bits,
        HAS_OFF=k_offset is not None,
        HAS_SINK=sink is not None,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        INTERP=interpreting(),
        PDL=on,
        ROTARY=rope is not None,
        BLOCK_HQ=triton.next_power_of_2(block_h * (q.shape[1] // hk)),
        HALF=triton.next_power_of_2(d // 2),
        num_warps=4 if block_h * block_d >= 1024 else 1,
        enable_fp_fusion=False,  # no FMA contraction: the int4 range search must round as the reference does
        **pdl.launch_opts(on),
    )
