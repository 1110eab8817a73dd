"""Paged attention / KV write references against dense attention; KV quantization round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lmkiln.kernels.attention_ref import (
    dequantize_kv_ref,
    paged_attention_ref,
    quantize_kv_ref,
    write_kv_ref,
)

from lmkiln.engine.kv_cache import KVCache


def _dense(q, k, v, start, scale):
    """Queries at positions start.. over keys 0..start+len(q)-1, causal, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    pos_q = start + torch.arange(q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float())


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_paged_attention_matches_dense_for_a_mixed_batch(bits) -> None:
    gen = torch.Generator().manual_seed(0)
    hq, hk, d, bs, nblocks = 4, 2, 16, 4, 40
    cache = KVCache(1, nblocks, bs, hk, d, torch.float32, "cpu", quant_policy=bits)[0]
    # (cached tokens before this step, new tokens): decode, prefill from scratch, chunk after a prefix
    shapes = [(9, 1), (0, 7), (5, 6), (12, 1)]
    free = torch.randperm(nblocks, generator=gen).tolist()
    tables, full_k, full_v = [], [], []
    for ctx, new in shapes:
        n = ctx + new
        tables.append([free.pop() for _ in range(-(-n // bs))])
        full_k.append(torch.randn(n, hk, d, generator=gen))
        full_v.append(torch.randn(n, hk, d, generator=gen))
    # the cached prefix is written first, as earlier steps would have
    for (ctx, _), table, k, v in zip(shapes, tables, full_k, full_v, strict=True):
        if ctx:
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)])
            write_kv_ref(k[:ctx], v[:ctx], cache.k, cache.v, slots, cache.k_sz, cache.v_sz, bits)
    qs = [torch.randn(new, hq, d, generator=gen) for _, new in shapes]
    slots = torch.tensor(
        [
            t[p // bs] * bs + p % bs
            for (ctx, new), t in zip(shapes, tables, strict=True)
            for p in range(ctx, ctx + new)
        ]
    )
    new_k = torch.cat([k[ctx:] for (ctx, _), k in zip(shapes, full_k, strict=True)])
    new_v = torch.cat([v[ctx:] for (ctx, _), v in zip(shapes, full_v, strict=True)])
    write_kv_ref(new_k, new_v, cache.k, cache.v, slots, cache.k_sz, cache.v_sz, bits)
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor([n for _, n in shapes]).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([c + n for c, n in shapes], dtype=torch.int32)
    out = paged_attention_ref(
        torch.cat(qs), cache.k, cache.v, block_tables, qsl, lens, d**-0.5, cache.k_sz, cache.v_sz, bits
    )
    if bits:  # attention over exactly the values the quantized cache holds
        full_k = [dequantize_kv_ref(*quantize_kv_ref(k, bits), bits, torch.float32) for k in full_k]
        full_v = [dequantize_kv_ref(*quantize_kv_ref(v, bits), bits, torch.float32) for v in full_v]
    want = torch.cat(
        [_dense(q, k, v, ctx, d**-0.5) for q, k, v, (ctx, _) in zip(qs, full_k, full_v, shapes, strict=True)]
    )
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_sink_makes_position_0_exact(bits) -> None:
    """Through the backend (int4: Hadamard rotation; both: a K offset): with a sink, attention equals dense
    attention over the quantized cache's values with only position 0 exact (in the cache's basis), and is
    closer to the fp attention than without it."""
    from lmkiln.engine.attention import AttentionMetadata, TorchAttentionBackend

    gen = torch.Generator().manual_seed(bits)
    hq, hk, d, t, bs = 4, 2, 32, 11, 4
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hk, hk))
    k[0] = 3 * k[0] + 2  # a first key unlike the others, as attention sinks are
    mean = torch.randn(hk, d, generator=gen)
    outs = {}
    for sinks in (True, False):
        cache = KVCache(1, 4, bs, hk, d, torch.float32, "cpu", bits, k_offsets=[mean], sink_entries=3)[0]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(t),
            block_tables=torch.arange(3, dtype=torch.int32)[None],
            query_start_loc=torch.tensor([0, t], dtype=torch.int32),
            seq_lens=torch.tensor([t], dtype=torch.int32),
            max_query_len=t,
            max_seq_len=t,
            sink_idx=torch.tensor([2], dtype=torch.int32) if sinks else None,
            sink_slot=torch.tensor([2] + [-1] * (t - 1)) if sinks else None,
        )
        outs[sinks] = TorchAttentionBackend().forward(q, k, v, cache, meta, d**-0.5)
    assert (cache.rotation is not None) == (bits == 4)
    h = cache.rotation if cache.rotation is not None else torch.eye(d)
    kr, vr = k @ h - cache.k_offset, v @ h  # what the quantizer sees
    kq = dequantize_kv_ref(*quantize_kv_ref(kr, bits), bits, torch.float32)
    vq = dequantize_kv_ref(*quantize_kv_ref(vr, bits), bits, torch.float32)
    kq[0], vq[0] = kr[0], vr[0]
    want = _dense(q @ h, kq, vq, 0, d**-0.5) @ h.T
    torch.testing.assert_close(outs[True], want, atol=1e-5, rtol=0)
    exact = _dense(q, k, v, 0, d**-0.5)
    assert (outs[True] - exact).norm() < (outs[False] - exact).norm()


def test_dense_reference_agrees_with_sdpa() -> None:
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(_dense(q, k, v, 0, 8**-0.5), sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quantization_error(bits) -> None:
    """Values inside the stored range are within half a step; int8 keeps the full range; int4's range
    search never does worse than the full min-max range, and often better."""
    qmax = (1 << bits) - 1
    x = torch.randn(64, 3, 32)
    q, sz = quantize_kv_ref(x, bits)
    assert q.dtype == torch.uint8 and q.shape[-1] == (32 if bits == 8 else 16) and sz.shape == (64, 3, 2)
    deq = dequantize_kv_ref(q, sz, bits, torch.float32)
    step, lo = sz[..., :1].float(), sz[..., 1:].float()
    inside = (x >= lo - step / 2) & (x <= lo + step * (qmax + 0.5))  # (fp16 scales round the range)
    assert ((deq - x).abs() <= step * 0.5 + 1e-3)[inside].all()
    mse = (deq - x).square().sum(-1)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s, z = ((hi - lo) / qmax).half().float(), lo.half().float()
    full = (torch.round((x - z) / s).clamp(0, qmax) * s + z - x).square().sum(-1)
    if bits == 8:
        assert inside.all() and torch.allclose(mse, full)
    else:
        assert (mse <= full + 1e-6).all() and (mse < 0.95 * full).float().mean() > 0.2


def test_quantized_cache_capacity_ratios() -> None:
    """int8 holds >= 1.9x and int4 >= 3.7x the tokens of an fp16 cache in the same memory (head_dim 128),
    attention sinks included (64 entries, 7B shape, a 16 GiB cache); the plan subtracts the sinks' bytes."""
    from types import SimpleNamespace

    from lmkiln.engine.config import EngineConfig
    from lmkiln.engine.model_runner import plan_num_blocks

    args = (32, 64, 8, 128)
    fp16 = KVCache.bytes_per_block(*args, torch.float16, 0)
    assert fp16 / KVCache.bytes_per_block(*args, torch.float16, 8) >= 1.9
    assert fp16 / KVCache.bytes_per_block(*args, torch.float16, 4) >= 3.7
    budget = 16 << 30
    for bits, ratio in ((8, 1.9), (4, 3.7)):
        sinks = KVCache.sink_bytes(32, 32, 128, torch.float16, bits, 64)
        assert sinks == 2 * 32 * 64 * 32 * 128 * 2
        blocks = (budget - sinks) // KVCache.bytes_per_block(32, 64, 32, 128, torch.float16, bits)
        assert blocks / (budget // KVCache.bytes_per_block(32, 64, 32, 128, torch.float16, 0)) >= ratio
    assert KVCache.sink_bytes(32, 32, 128, torch.float16, 0, 64) == 0
    tiny = KVCache(2, 3, 4, 2, 8, torch.float16, "cpu", quant_policy=4, sink_entries=5)
    assert tiny[1].sink.shape == (5, 2, 2, 8) and tiny[1].sink.dtype == torch.float16
    assert tiny.nbytes() == sum(
        t.numel() * t.element_size() for lc in tiny.layers for t in (lc.k, lc.v, lc.k_sz, lc.v_sz, lc.sink)
    )
    assert KVCache(2, 3, 4, 2, 8, torch.float16, "cpu", quant_policy=0, sink_entries=5)[0].sink is None
    cfg = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=8)
    loaded = SimpleNamespace(config=cfg, dtype=torch.float16, device=torch.device("cpu"))
    per_block = KVCache.bytes_per_block(2, 4, 2, 8, torch.float16, 4)
    for entries in (0, 64):
        ec = EngineConfig(
            "unused",
            block_size=4,
            quant_policy=4,
            kv_sink_entries=entries,
            cache_max_entry_count=1.0,
            cpu_cache_bytes=100 * per_block,
        )
        want = (100 * per_block - KVCache.sink_bytes(2, 2, 8, torch.float16, 4, entries)) // per_block
        assert plan_num_blocks(ec, loaded, 1 << 20) == want
    assert want < 100
