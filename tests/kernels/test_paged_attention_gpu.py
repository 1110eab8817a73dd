"""Triton KV write and paged attention on a CUDA GPU at real shapes (32 q / 8 kv heads, head_dim 128, 4k
contexts), against the pure-torch references; CUDA-graph capture and replay of a padded decode step."""

from __future__ import annotations

import pytest
import torch
from lmkiln.kernels.attention_ref import paged_attention_ref, write_kv_ref

from lmkiln.engine.kv_cache import KVCache

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2, torch.float32: 1e-5}  # ‖out − ref‖ / ‖ref‖


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _batch(shapes, bits, dtype, hq, hk, d, page, seed=0, pad_rows=0, spare=8):
    """Cache (unused blocks poisoned with NaN) holding each sequence's tokens, metadata and queries."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = sum(-(-(c + n) // page) for c, n in shapes)
    nblocks = need + spare
    c = KVCache(1, nblocks, page, hk, d, dtype, DEV, quant_policy=bits)[0]
    used = [0, *(torch.randperm(nblocks - 1, device=DEV, generator=g)[: need - 1] + 1).tolist()]
    unused = sorted(set(range(nblocks)) - set(used))
    if bits:
        c.k_sz[unused], c.v_sz[unused] = float("nan"), float("nan")
    else:
        c.k[unused], c.v[unused] = float("nan"), float("nan")
    tables, slots = [], []
    for ctx, new in shapes:
        tab = [used.pop() for _ in range(-(-(ctx + new) // page))]
        tables.append(tab)
        slots += [tab[p // page] * page + p % page for p in range(ctx + new)]
    n = len(slots)
    k = torch.randn(n, hk, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(n, hk, d, device=DEV, generator=g).to(dtype)
    write_kv_ref(k, v, c.k, c.v, torch.tensor(slots, device=DEV), c.k_sz, c.v_sz, bits)
    width = max(map(len, tables)) + 2
    tables += [[]] * pad_rows
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV)
    q_lens = [new for _, new in shapes] + [1] * pad_rows
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    lens = torch.tensor([ctx + new for ctx, new in shapes] + [0] * pad_rows, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), hq, d, device=DEV, generator=g).to(dtype)
    return c, q, bt, qsl, lens, max(q_lens)


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_kv_bit_identical_on_gpu(bits, dtype) -> None:
    from lmkiln.kernels.kv_cache import write_kv

    g = torch.Generator(device=DEV).manual_seed(bits)
    t, hk, d, nblocks, page = 777, 8, 128, 40, 64
    qkv = torch.randn(t, 48, d, device=DEV, generator=g).to(dtype) * 4  # k, v as views of a fused tensor
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(nblocks * page, device=DEV, generator=g)[:t]
    slots[::13] = -1
    caches = [KVCache(1, nblocks, page, hk, d, dtype, DEV, quant_policy=bits)[0] for _ in range(2)]
    for c in caches:
        c.k.fill_(3)
        c.v.fill_(3)
    write_kv(k, v, caches[0].k, caches[0].v, slots, caches[0].k_sz, caches[0].v_sz, bits)
    keep = slots >= 0
    write_kv_ref(
        k[keep], v[keep], caches[1].k, caches[1].v, slots[keep], caches[1].k_sz, caches[1].v_sz, bits
    )
    for name in ("k", "v", "k_sz", "v_sz"):
        a, b = getattr(caches[0], name), getattr(caches[1], name)
        if a is not None:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hk", "d", "page"), [(32, 8, 128, 64), (32, 32, 128, 16), (12, 4, 64, 64)])
def test_decode_real_shapes(bits, dtype, hq, hk, d, page) -> None:
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_decode

    shapes = [(4095, 1), (0, 1), (776, 1), (2048, 1), (2999, 1)]
    c, q, bt, qsl, lens, _ = _batch(shapes, bits, dtype, hq, hk, d, page, seed=hq + bits, pad_rows=2)
    n = len(shapes)
    ref = paged_attention_ref(q[:n], c.k, c.v, bt[:n], qsl[: n + 1], lens[:n], d**-0.5, c.k_sz, c.v_sz, bits)
    for splits in (0, 1, 8, 13):  # 0: the launcher's choice
        out = torch.full_like(q, float("nan"))
        paged_decode(
            q, c.k, c.v, bt, lens, d**-0.5, c.k_sz, c.v_sz, bits, AttentionConfig(num_splits=splits), out
        )
        assert _rel(out[:n], ref) < TOL[dtype], splits
        assert not out[n:].any()  # padded rows: zeros


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_real_shapes(bits, dtype) -> None:
    """Prefill from scratch, a prefix-cache hit (3.5k cached + 596 new), decode rows, a chunk."""
    from lmkiln.kernels.paged_attention import paged_prefill

    shapes = [(0, 1000), (3500, 596), (2000, 1), (100, 300), (0, 1)]
    c, q, bt, qsl, lens, max_q = _batch(shapes, bits, dtype, 32, 8, 128, 64, seed=bits)
    ref = paged_attention_ref(q, c.k, c.v, bt, qsl, lens, 128**-0.5, c.k_sz, c.v_sz, bits)
    out = paged_prefill(q, c.k, c.v, bt, qsl, lens, max_q, 128**-0.5, c.k_sz, c.v_sz, bits)
    assert _rel(out, ref) < TOL[dtype]
    for lo, hi in zip(qsl[:-1].tolist(), qsl[1:].tolist(), strict=True):  # every sequence, not just the norm
        assert _rel(out[lo:hi], ref[lo:hi]) < TOL[dtype]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinks_on_gpu(bits, dtype) -> None:
    """Sink rows written bit-identical to the reference (K offset subtracted; fp32 -> bf16 rounds to nearest
    even on the GPU), and decode / prefill reading key 0 from them."""
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_decode, paged_prefill

    g = torch.Generator(device=DEV).manual_seed(bits)
    t, hk, d, entries = 300, 8, 128, 16
    k = torch.randn(t, hk, d, device=DEV, generator=g).to(dtype) * 4
    v = torch.randn(t, hk, d, device=DEV, generator=g).to(dtype)
    off = torch.randn(hk, d, device=DEV, generator=g)
    slots = torch.arange(t, device=DEV)
    sink_slot = torch.full((t,), -1, dtype=torch.long, device=DEV)
    sink_slot[::37] = torch.arange(9, device=DEV)  # tokens 0, 37, ... into entries 0..8
    a, b = (
        KVCache(1, 8, 64, hk, d, dtype, DEV, quant_policy=bits, sink_entries=entries)[0] for _ in range(2)
    )
    write_kv(k, v, a.k, a.v, slots, a.k_sz, a.v_sz, bits, off, a.sink, sink_slot)
    write_kv_ref(k, v, b.k, b.v, slots, b.k_sz, b.v_sz, bits, off, b.sink, sink_slot)
    for name in ("k", "v", "k_sz", "v_sz", "sink"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    sink = torch.randn(4, 2, hk, d, device=DEV, generator=g).to(dtype)
    c, q, bt, qsl, lens, _ = _batch([(4095, 1), (0, 1), (776, 1)], bits, dtype, 32, hk, d, 64, pad_rows=1)
    idx = torch.tensor([2, 0, -1, -1], dtype=torch.int32, device=DEV)
    ref = paged_attention_ref(
        q[:3], c.k, c.v, bt[:3], qsl[:4], lens[:3], d**-0.5, c.k_sz, c.v_sz, bits, sink, idx[:3]
    )
    for splits in (1, 8):
        out = paged_decode(
            q,
            c.k,
            c.v,
            bt,
            lens,
            d**-0.5,
            c.k_sz,
            c.v_sz,
            bits,
            AttentionConfig(num_splits=splits),
            sink=sink,
            sink_idx=idx,
        )
        assert _rel(out[:3], ref) < TOL[dtype] and _rel(out[1:2], ref[1:2]) < TOL[dtype], splits
        assert not out[3:].any()
    c, q, bt, qsl, lens, max_q = _batch([(0, 300), (1000, 100)], bits, dtype, 32, hk, d, 64, seed=1)
    idx = torch.tensor([1, 3], dtype=torch.int32, device=DEV)
    ref = paged_attention_ref(q, c.k, c.v, bt, qsl, lens, d**-0.5, c.k_sz, c.v_sz, bits, sink, idx)
    args = (c.k, c.v, bt, qsl, lens, max_q, d**-0.5, c.k_sz, c.v_sz, bits)
    out = paged_prefill(q, *args, sink=sink, sink_idx=idx)
    assert _rel(out, ref) < TOL[dtype]


def test_fp32_queries_on_gpu() -> None:
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_decode, paged_prefill

    c, q, bt, qsl, lens, max_q = _batch([(300, 1), (17, 1)], 8, torch.float32, 8, 2, 64, 16)
    ref = paged_attention_ref(q, c.k, c.v, bt, qsl, lens, 0.125, c.k_sz, c.v_sz, 8)
    out = paged_decode(q, c.k, c.v, bt, lens, 0.125, c.k_sz, c.v_sz, 8, AttentionConfig(num_splits=4))
    assert _rel(out, ref) < TOL[torch.float32]
    out = paged_prefill(q, c.k, c.v, bt, qsl, lens, max_q, 0.125, c.k_sz, c.v_sz, 8)
    assert _rel(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [0, 4])
def test_decode_step_in_a_cuda_graph(bits) -> None:
    """write_kv + paged_decode captured once for a padded batch of 8 (block tables 80 wide), replayed with new
    inputs (more sequences, longer contexts, new blocks): equal to eager launches, pad rows stay zeros."""
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import paged_decode

    hq, hk, d, page, nb, bmax, width = 32, 8, 128, 64, 400, 8, 80
    c = KVCache(1, nb, page, hk, d, torch.float16, DEV, quant_policy=bits)[0]
    g = torch.Generator(device=DEV).manual_seed(0)
    for x in (c.k, c.v):  # a random cache (codes or values) stands for the earlier steps' tokens
        x.copy_(
            torch.randint(0, 255, x.shape, device=DEV, generator=g)
            if bits
            else torch.randn(x.shape, device=DEV)
        )
    for x in (c.k_sz, c.v_sz) if bits else ():
        x.copy_(torch.rand(x.shape, device=DEV, generator=g) * 0.1)
    q = torch.zeros(bmax, hq, d, dtype=torch.float16, device=DEV)
    k = torch.zeros(bmax, hk, d, dtype=torch.float16, device=DEV)
    v = torch.zeros_like(k)
    slots = torch.full((bmax,), -1, dtype=torch.long, device=DEV)
    lens = torch.zeros(bmax, dtype=torch.int32, device=DEV)
    tables = torch.full((bmax, width), -1, dtype=torch.int32, device=DEV)
    out = torch.zeros_like(q)

    def step() -> None:
        write_kv(k, v, c.k, c.v, slots, c.k_sz, c.v_sz, bits)
        paged_decode(q, c.k, c.v, tables, lens, d**-0.5, c.k_sz, c.v_sz, bits, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    perm = torch.randperm(nb, device=DEV, generator=g).to(torch.int32)
    for real, ctx in ((3, [5, 700, 64]), (6, [1, 4000, 129, 63, 2048, 5000])):
        q.normal_(generator=g)
        k.normal_(generator=g)
        v.normal_(generator=g)
        slots.fill_(-1)
        lens.zero_()
        tables.fill_(-1)
        used = 0
        for i, n in enumerate(ctx):
            nblk = -(-n // page)
            tables[i, :nblk] = perm[used : used + nblk]
            used += nblk
            lens[i] = n
            slots[i] = int(tables[i, (n - 1) // page]) * page + (n - 1) % page
        out.fill_(float("nan"))
        graph.replay()
        got = out.clone()
        after = [x.clone() for x in (c.k, c.v, c.k_sz, c.v_sz) if x is not None]
        step()  # eager on the same inputs (writing the same tokens again changes nothing)
        torch.testing.assert_close(got, out, atol=0, rtol=0)
        assert all(torch.equal(a, x) for a, x in zip(after, (c.k, c.v, c.k_sz, c.v_sz), strict=False))
        assert not got[real:].any()
        ref = paged_attention_ref(
            q[:real],
            c.k,
            c.v,
            tables[:real],
            torch.arange(real + 1, dtype=torch.int32, device=DEV),
            lens[:real],
            d**-0.5,
            c.k_sz,
            c.v_sz,
            bits,
        )
        assert _rel(got[:real], ref) < TOL[torch.float16]


@pytest.mark.parametrize(
    ("dtype", "hq", "hk", "splits"), [(torch.float16, 32, 32, 0), (torch.bfloat16, 32, 8, 3)]
)
def test_decode_with_new_kv_on_gpu(dtype, hq, hk, splits) -> None:
    """The decode kernel that rotates and stores the step's K/V itself (``new_kv``) against
    ``write_kv(..., rope=...)`` then ``paged_decode`` at 7B-like head shapes with the in-kernel split merge:
    the cache bit-identical (FMA contraction off, as in write_kv), the output equal up to rounding (that
    launch option also changes the softmax's arithmetic); the new rows hold NaN before (never read back)."""
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    d, page = 128, 64
    shapes = [(0, 1), (130, 1), (700, 1), (63, 1)]
    c, q, bt, _, lens, _ = _batch(shapes, 0, dtype, hq, hk, d, page, seed=hk, pad_rows=1)
    b = q.shape[0]
    pos = (lens.long() - 1).clamp_min(0)
    rows = torch.arange(b, device=DEV)
    slots = torch.where(lens > 0, bt[rows, pos // page].long() * page + pos % page, -1)
    c.k.view(-1, hk, d)[slots[:4]] = float("nan")
    c.v.view(-1, hk, d)[slots[:4]] = float("nan")
    g = torch.Generator(device=DEV).manual_seed(1)
    k = torch.randn(b, hk, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(b, hk, d, device=DEV, generator=g).to(dtype)
    ang = pos.float()[:, None] * 10000.0 ** (-torch.arange(d // 2, device=DEV).float() / (d // 2))
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    cfg = AttentionConfig(num_splits=splits)
    results = []
    for fused in (False, True):
        kc, vc = c.k.clone(), c.v.clone()
        qx, kx, vx = q.clone(), k.clone(), v.clone()
        args = (kc, vc, bt, lens, d**-0.5, None, None, 0, cfg)
        counters = make_counters(DEV, 256)
        if fused:
            out = paged_decode(qx, *args, counters=counters, new_kv=(kx, vx, slots, cos, sin))
        else:
            write_kv(kx, vx, kc, vc, slots, rope=(qx, cos, sin))
            out = paged_decode(qx, *args, counters=counters)
        results.append((out, kc, vc))
    (want, *want_cache), (got, *got_cache) = results
    for a, b in zip(got_cache, want_cache, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    assert not got[4].any()
    assert _rel(got[:4], want[:4]) < (1e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_consumes_a_float32_qkv_accumulator_on_gpu(splits) -> None:
    """``consume=True`` at batch 1, 7B head shapes: q, k, v as float32 views of the qkv GEMV's atomic
    accumulator give the fp16 path's cache bit for bit and its output, and leave the accumulator zeroed."""
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    hq = hk = 32
    d, page = 128, 64
    c, _, bt, _, lens, _ = _batch([(300, 1)], 0, torch.float16, hq, hk, d, page, seed=7)
    slots = bt[0, 300 // page].long().view(1) * page + 300 % page
    g = torch.Generator(device=DEV).manual_seed(2)
    acc = torch.randn(1, hq + 2 * hk, d, device=DEV, generator=g)
    q, k, v = acc.split([hq, hk, hk], dim=1)
    ang = 300.0 * 10000.0 ** (-torch.arange(d // 2, device=DEV).float() / (d // 2))
    cos = torch.cat([ang.cos()] * 2).view(1, d).half()
    sin = torch.cat([ang.sin()] * 2).view(1, d).half()
    cfg = AttentionConfig(num_splits=splits)
    kc, vc = c.k.clone(), c.v.clone()
    want = paged_decode(q.half(), kc, vc, bt, lens, d**-0.5, config=cfg, counters=make_counters(DEV, 64),
                        new_kv=(k.half(), v.half(), slots, cos, sin))
    got = paged_decode(q, c.k, c.v, bt, lens, d**-0.5, config=cfg, counters=make_counters(DEV, 64),
                       new_kv=(k, v, slots, cos, sin), consume=True)
    torch.testing.assert_close(c.k, kc, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(c.v, vc, atol=0, rtol=0, equal_nan=True)
    assert got.dtype == torch.float16 and _rel(got, want) < 1e-3
    assert not acc.any()
