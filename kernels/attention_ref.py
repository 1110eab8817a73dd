"""Pure-torch references for the paged KV cache: KV write (with optional int8/int4 quantization) and
attention over the paged cache (prefill with prefix hits, decode, and any mix of them, GQA).

Cache layout (one layer)::

    k_cache, v_cache   [num_blocks, block_size, num_kv_heads, head_dim]       model dtype (quant_policy 0)
                       [num_blocks, block_size, num_kv_heads, head_dim]       uint8 (quant_policy 8)
                       [num_blocks, block_size, num_kv_heads, head_dim // 2]  uint8, 2 codes a byte (policy 4)
    k_sz, v_sz         [num_blocks, block_size, num_kv_heads, 2]              fp16 (scale, zero), if quantized
    sink               [entries, 2, num_kv_heads, head_dim]                   model dtype, K then V (optional)

Token ``t`` of a sequence lives in slot ``block_table[t // block_size] * block_size + t % block_size``.
Quantization is asymmetric per token and per head: ``x ≈ q * scale + zero`` with ``q`` in
``[0, 2**bits - 1]``; int4 codes pack two per byte, element ``2i`` in the low nibble and ``2i + 1`` in
the high one.

Attention sinks (quantized caches only): ``sink[e]`` holds the exact K (after the K offset, in the cache's
basis) and V of position 0 of the sequences whose first token is entry ``e``'s. A write stores token ``i``'s
K/V in ``sink[sink_slot[i]]`` when ``sink_slot[i] >= 0`` (besides its quantized slot), and attention reads key
position 0 of sequence ``b`` from ``sink[sink_idx[b]]`` instead of the dequantized row when
``sink_idx[b] >= 0``: position 0 then carries no quantization error.

Batches are described as in varlen attention: the queries of sequence ``b`` are rows
``query_start_loc[b] : query_start_loc[b + 1]`` of ``q``, the last of its ``seq_lens[b]`` cached tokens.
These are the oracles for the Triton kernels and the attention path the engine runs on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# int4 range search: each (token, head) takes the range [lo, hi] shrunk about its midpoint by the first of
# these ratios whose dequantized values have the least squared error (16 levels over 64-128 values: clipping
# the extremes often wins). int8 uses the full range.
INT4_CLIP_STEPS = 5
INT4_CLIP_STEP = 0.05  # ratios 1.0, 0.95, ..., 0.8


def _codes(xf: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, ...]:
    # Divide by a tensor: on CUDA, torch turns a division by a Python scalar into a multiplication by its
    # reciprocal, which is not correctly rounded (the kernel divides with div_rn; a 1-ulp difference can
    # round the fp16 scale the other way). Then round-trip through the stored dtype.
    scale = ((hi - lo) / torch.full_like(hi, qmax)).clamp(min=1e-8).half().float()
    zero = lo.half().float()
    return torch.round((xf - zero) / scale).clamp(0, qmax), scale, zero


def quantize_kv_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., D]``: ``(codes, sz)``, uint8 codes ``[..., D]`` (8 bits) or ``[..., D // 2]``
    (4 bits) and fp16 ``sz [..., 2]``.

    ``sz`` holds (scale, zero) rounded to fp16; the codes are computed with the rounded values. int4 picks
    its range per row by the search described at :data:`INT4_CLIP_STEPS` (errors summed in float64).
    """
    if bits not in (4, 8):
        raise ValueError(f"KV quantization supports 4 or 8 bits, got {bits}")
    qmax = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    q, scale, zero = _codes(xf, lo, hi, qmax)
    if bits == 4:
        mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5
        best = ((q * scale).double() + zero.double() - xf.double()).square().sum(-1, keepdim=True)
        for i in range(1, INT4_CLIP_STEPS):
            r = 1.0 - INT4_CLIP_STEP * i
            qc, sc, zc = _codes(xf, mid - half * r, mid + half * r, qmax)
            err = ((qc * sc).double() + zc.double() - xf.double()).square().sum(-1, keepdim=True)
            better = err < best
            q, scale = torch.where(better, qc, q), torch.where(better, sc, scale)
            zero = torch.where(better, zc, zero)
            best = torch.minimum(err, best)
    q = q.to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    sz = torch.cat([scale, zero], dim=-1).half()
    return q, sz


def dequantize_kv_ref(q: torch.Tensor, sz: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv_ref` (up to rounding)."""
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    sz = sz.float()
    return (q.float() * sz[..., :1] + sz[..., 1:]).to(dtype)


def write_kv_ref(
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
) -> None:
    """Store ``k, v [T, Hk, D]`` in the slots ``slot_mapping [T]`` (quantized when ``bits`` is 4 or 8).

    ``k_offset [Hk, D]`` (float32, quantized caches only) is subtracted from K before it is quantized: a
    constant shift of every key changes each query's scores by the same amount, so attention is unchanged,
    and a calibrated per-channel mean of K makes the per-token ranges far smaller. ``sink [E, 2, Hk, D]``
    with ``sink_slot [T]`` (quantized caches only): tokens with ``sink_slot >= 0`` also store their exact K
    (offset subtracted, as quantized) and V in ``sink[sink_slot]``, in ``sink.dtype``."""
    slots = slot_mapping.long()
    if k_offset is not None:
        if not bits:
            raise ValueError("a K offset only applies to a quantized (int8 / int4) cache")
        k = k.float() - k_offset
    if sink is not None and sink_slot is not None:
        if not bits:
            raise ValueError("attention sinks only apply to a quantized (int8 / int4) cache")
        rows = (sink_slot >= 0).nonzero().flatten()
        idx = sink_slot[rows].long()
        sink[idx, 0] = k[rows].to(sink.dtype)
        sink[idx, 1] = v[rows].to(sink.dtype)
    for x, cache, sz in ((k, k_cache, k_sz), (v, v_cache, v_sz)):
        flat = cache.view(-1, *cache.shape[2:])
        if bits:
            if sz is None:
                raise ValueError("a quantized KV cache needs its scale/zero tensors")
            q, s = quantize_kv_ref(x, bits)
            flat.index_copy_(0, slots, q)
            sz.view(-1, *sz.shape[2:]).index_copy_(0, slots, s)
        else:
            flat.index_copy_(0, slots, x.to(cache.dtype))


def gather_kv_ref(
    cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_tokens: int,
    sz: torch.Tensor | None = None,
    bits: int = 0,
    dtype: torch.dtype = torch.float32,
    sink: torch.Tensor | None = None,
    sink_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The first ``num_tokens`` cached tokens of each sequence: ``[B, num_tokens, Hk, D]`` in ``dtype``.

    ``sink [E, Hk, D]`` (K or V part of a layer's sinks) with ``sink_idx [B]``: position 0 of sequence ``b``
    is ``sink[sink_idx[b]]`` where ``sink_idx[b] >= 0``."""
    bs = cache.shape[1]
    nblk = -(-num_tokens // bs)
    table = block_tables[:, :nblk].long().clamp(min=0)  # padding entries (-1) read block 0, masked later
    b = table.shape[0]
    x = cache[table].reshape(b, nblk * bs, *cache.shape[2:])[:, :num_tokens]
    if bits:
        s = sz[table].reshape(b, nblk * bs, *sz.shape[2:])[:, :num_tokens]  # type: ignore[index]
        x = dequantize_kv_ref(x, s, bits, dtype)
    else:
        x = x.to(dtype)
    if sink is not None and sink_idx is not None and num_tokens > 0:
        has = (sink_idx >= 0).to(x.device)[:, None, None]
        x[:, 0] = torch.where(has, sink[sink_idx.long().clamp(min=0)].to(dtype), x[:, 0])
    return x


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_sz: torch.Tensor | None = None,
    v_sz: torch.Tensor | None = None,
    bits: int = 0,
    sink: torch.Tensor | None = None,
    sink_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over each sequence's cached K/V (already written): ``[T, Hq, D]``.

    Query row ``i`` of sequence ``b`` sits at position ``seq_lens[b] - q_len[b] + i`` and sees every cached
    token up to that position. With ``sink [E, 2, Hk, D]`` and ``sink_idx [B]``, key position 0 of sequence
    ``b`` is read from ``sink[sink_idx[b]]`` where that is >= 0. Computed in float32, returned in ``q.dtype``.
    """
    device = q.device
    qsl = query_start_loc.to(device=device, dtype=torch.long)
    lens = seq_lens.to(device=device, dtype=torch.long)
    q_lens = qsl[1:] - qsl[:-1]
    nseq = lens.numel()
    max_q, max_s = int(q_lens.max()), int(lens.max())
    batch_idx = torch.repeat_interleave(torch.arange(nseq, device=device), q_lens)
    row_idx = torch.arange(q.shape[0], device=device) - qsl[:-1][batch_idx]

    q_pad = q.new_zeros((nseq, max_q, *q.shape[1:]), dtype=torch.float32)
    q_pad[batch_idx, row_idx] = q.float()
    sk, sv = (None, None) if sink is None else (sink[:, 0], sink[:, 1])
    k = gather_kv_ref(k_cache, block_tables, max_s, k_sz, bits, sink=sk, sink_idx=sink_idx)
    v = gather_kv_ref(v_cache, block_tables, max_s, v_sz, bits, sink=sv, sink_idx=sink_idx)
    last = (lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, max_q] positions
    mask = torch.arange(max_s, device=device)[None, None, :] <= last[..., None]  # [B, max_q, max_s]
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[2],
    )
    return out.transpose(1, 2)[batch_idx, row_idx].to(q.dtype)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, elem_bytes: int, bits: int) -> int:
    """Cache bytes of one token (K and V, every layer) for a quant policy (0: ``elem_bytes`` per value)."""
    per_head = head_dim * elem_bytes if not bits else head_dim * bits // 8 + 4  # + fp16 (scale, zero)
    return 2 * num_layers * num_kv_heads * per_head
