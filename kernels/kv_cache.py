"""Triton KV-cache write: new ``k, v [T, Hk, D]`` into their slots, optionally quantized to int8 / int4.

The cache layouts and the quantization math are those of :mod:`lmkiln.kernels.attention_ref`
(``write_kv_ref`` is the oracle): asymmetric per token and per head, ``x ≈ q * scale + zero``, ``(scale,
zero)`` rounded to fp16 first and the codes computed with the rounded values (IEEE division, round half to
even), so the kernel's codes are bit-identical to the reference's. int4 codes pack two per byte, element
``2i`` in the low nibble. Slots < 0 (padding rows of a CUDA-graph batch) and slots past the cache are
skipped. One program writes K and V of ``BLOCK_H`` heads of one token.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lmkiln.errors import KernelInputError

SZ_DTYPE = torch.float16
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rint(x, INTERP: tl.constexpr):
    """Round half to even (``torch.round``). The interpreter has no libdevice: there, the fp32 magic-number
    trick, exact for ``|x| < 2**22`` (codes are in ``[0, 255]``)."""
    if INTERP:
        return (x + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(x)


@triton.jit
def _quantize(x, valid, QMAX: tl.constexpr, INTERP: tl.constexpr):
    """``x [BH, BD]`` float32 (invalid entries ignored) -> float32 codes, fp16-rounded scale, zero ``[BH]``.

    Matches ``quantize_kv_ref``: the range is divided by ``QMAX`` and clamped at 1e-8 in float32, scale and
    zero are rounded through fp16, codes are ``rint((x - zero) / scale)`` clamped to ``[0, QMAX]``. A scale
    that rounds to 0 in fp16 (a range below ~4e-6) gives code 0 (the reference divides by 0 there; either way
    the value dequantizes to ``zero``)."""
    lo = tl.min(tl.where(valid, x, float("inf")), axis=1)
    hi = tl.max(tl.where(valid, x, float("-inf")), axis=1)
    scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), 1e-8)
    scale = scale.to(tl.float16).to(tl.float32)
    zero = lo.to(tl.float16).to(tl.float32)
    safe = tl.where(scale > 0.0, scale, 1.0)
    q = _rint(tl.math.div_rn(x - zero[:, None], safe[:, None]), INTERP)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    q = tl.where(scale[:, None] > 0.0, q, 0.0)
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
    BITS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Write the heads ``offs_h`` of token ``tok`` of ``x`` into cache row ``slot`` (masked by ``ok``)."""
    hmask = (offs_h < Hk) & ok
    row = slot * Hk + offs_h  # int64 (slot, head) row index; slot and ok are [BLOCK_H] vectors
    src = x_ptr + tok * stride_t + offs_h[:, None] * stride_h
    if BITS == 4:
        DH = D // 2
        dmask = offs_d < DH
        m = hmask[:, None] & dmask[None, :]
        xe = tl.load(src + 2 * offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        xo = tl.load(src + 2 * offs_d[None, :] + 1, mask=m, other=0.0).to(tl.float32)
        BH: tl.constexpr = offs_h.shape[0]
        BD: tl.constexpr = offs_d.shape[0]
        x = tl.reshape(tl.join(xe, xo), (BH, 2 * BD))  # both halves share the head's range
        valid = tl.reshape(tl.join(m, m), (BH, 2 * BD))
        q, scale, zero = _quantize(x, valid, 15, INTERP)
        qe, qo = tl.split(tl.reshape(q.to(tl.uint8), (BH, BD, 2)))
        tl.store(cache_ptr + row[:, None] * DH + offs_d[None, :], qe | (qo << 4), mask=m)
    else:
        dmask = offs_d < D
        m = hmask[:, None] & dmask[None, :]
        x = tl.load(src + offs_d[None, :], mask=m, other=0.0)
        if BITS == 8:
            q, scale, zero = _quantize(x.to(tl.float32), m, 255, INTERP)
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
    kc_ptr,
    vc_ptr,
    ksz_ptr,
    vsz_ptr,
    slot_ptr,
    num_slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    Hk,
    D,
    BITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr,
):
    tok = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # the slot as a [BLOCK_H] vector: the interpreter mis-types (scalar bool & bool tensor)
    slot = tl.load(slot_ptr + tok + 0 * offs_h).to(tl.int64)
    ok = (slot >= 0) & (slot < num_slots)
    _write_one(
        k_ptr, kc_ptr, ksz_ptr, tok, stride_kt, stride_kh, slot, ok, offs_h, offs_d, Hk, D, BITS, INTERP
    )
    _write_one(
        v_ptr, vc_ptr, vsz_ptr, tok, stride_vt, stride_vh, slot, ok, offs_h, offs_d, Hk, D, BITS, INTERP
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
) -> None:
    """Store ``k, v [T, Hk, D]`` in the slots ``slot_mapping [T]`` (quantized when ``bits`` is 4 or 8).

    Same contract as ``write_kv_ref``, plus: slots < 0 are skipped. No host synchronisation (CUDA-graph
    capturable)."""
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
    if t == 0:
        return
    block_d = triton.next_power_of_2(d // 2 if bits == 4 else d)
    block_h = min(triton.next_power_of_2(hk), max(1, 2048 // block_d))
    dummy = k_cache  # never dereferenced when bits == 0
    _write_kv_kernel[(t, triton.cdiv(hk, block_h))](
        k,
        v,
        k_cache,
        v_cache,
        k_sz if bits else dummy,
        v_sz if bits else dummy,
        slot_mapping,
        k_cache.shape[0] * k_cache.shape[1],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        hk,
        d,
        BITS=bits,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        INTERP=interpreting(),
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
