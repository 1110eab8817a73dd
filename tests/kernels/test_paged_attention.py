"""Triton KV write and paged attention vs the pure-torch references, under the Triton interpreter (small
shapes: odd lengths across block boundaries, GQA, int8/int4 caches, split-KV, padded rows, prefix hits)."""

from __future__ import annotations

import pytest
import torch
from lmkiln.kernels.attention_ref import dequantize_kv_ref, paged_attention_ref, write_kv_ref

from lmkiln.engine.kv_cache import KVCache
from lmkiln.errors import KernelInputError

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # max |out - ref| (|out| <~ 2)


@pytest.fixture(autouse=True)
def _interpreted() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter test; test_paged_attention_gpu.py covers the kernels on CUDA")
    triton = pytest.importorskip("triton")
    from lmkiln.kernels import paged_attention

    if not isinstance(paged_attention._paged_attn_kernel, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip("lmkiln.kernels.paged_attention was imported before TRITON_INTERPRET=1 was set")


def _layer(bits: int, dtype: torch.dtype, nblocks: int, page: int, hk: int, d: int):
    return KVCache(1, nblocks, page, hk, d, dtype, "cpu", quant_policy=bits)[0]


def _copy(c):
    return [None if x is None else x.clone() for x in (c.k, c.v, c.k_sz, c.v_sz)]


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize(
    ("dtype", "hk", "d"), [(torch.float32, 3, 48), (torch.float16, 2, 32), (torch.bfloat16, 5, 64)]
)
def test_write_kv_bit_identical_to_reference(bits, dtype, hk, d) -> None:
    from lmkiln.kernels.kv_cache import write_kv

    g = torch.Generator().manual_seed(bits + d)
    t, nblocks, page = 11, 4, 8
    k = (torch.randn(t, hk, d, generator=g) * 3 + 1).to(dtype)
    v = torch.randn(t, 2 * hk, d, generator=g).to(dtype)[:, ::2]  # strided heads (a view of a wider tensor)
    slots = torch.randperm(nblocks * page, generator=g)[:t]
    slots[[2, 7]] = -1  # padding rows: skipped
    got, want = _layer(bits, dtype, nblocks, page, hk, d), _layer(bits, dtype, nblocks, page, hk, d)
    for c in (got, want):  # a sentinel everywhere, so a stray write shows
        c.k.fill_(7)
        c.v.fill_(7)
        if bits:
            c.k_sz.fill_(7)
            c.v_sz.fill_(7)
    # a K offset (calibrated per-channel mean) is subtracted before quantizing: same codes as the reference
    off = (torch.randn(hk, d, generator=g) * 2).contiguous() if bits else None
    write_kv(k, v, got.k, got.v, slots, got.k_sz, got.v_sz, bits, off)
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], want.k, want.v, slots[keep], want.k_sz, want.v_sz, bits, off)
    for a, b in zip(_copy(got), _copy(want), strict=True):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_write_kv_constant_rows(bits) -> None:
    """A head whose values are all equal (range 0: the scale rounds to 0 in fp16) dequantizes to the value."""
    from lmkiln.kernels.kv_cache import write_kv

    x = torch.full((2, 1, 16), 0.375)
    x[1, 0, 3] = -1.0  # a normal row next to it
    c = _layer(bits, torch.float32, 1, 4, 1, 16)
    write_kv(x, x, c.k, c.v, torch.tensor([0, 1]), c.k_sz, c.v_sz, bits)
    deq = dequantize_kv_ref(c.k[0, :2], c.k_sz[0, :2], bits, torch.float32)
    assert torch.equal(deq[0], x[0]) and c.k_sz[0, 0, 0, 0] == 0
    ref = _layer(bits, torch.float32, 1, 4, 1, 16)
    write_kv_ref(x[1:], x[1:], ref.k, ref.v, torch.tensor([1]), ref.k_sz, ref.v_sz, bits)
    assert torch.equal(c.k[0, 1], ref.k[0, 1]) and torch.equal(c.k_sz[0, 1], ref.k_sz[0, 1])


@pytest.mark.parametrize(
    ("bits", "dtype", "hk", "d"),
    [(8, torch.float16, 3, 48), (4, torch.bfloat16, 2, 32), (4, torch.float32, 5, 64)],
)
def test_write_kv_sinks_bit_identical_to_reference(bits, dtype, hk, d) -> None:
    """Tokens with a sink slot also store their exact K (offset subtracted) and V in natural element order;
    codes are unchanged; pad rows and entries past the table are skipped."""
    from lmkiln.kernels.kv_cache import write_kv

    g = torch.Generator().manual_seed(bits * d)
    t, nblocks, page, entries = 9, 3, 8, 4
    k = (torch.randn(t, hk, d, generator=g) * 3 + 1).to(dtype)
    v = torch.randn(t, hk, d, generator=g).to(dtype)
    slots = torch.randperm(nblocks * page, generator=g)[:t]
    slots[5] = -1  # a pad row: neither its slot nor its sink entry is written
    sink_slot = torch.tensor([2, -1, -1, 0, -1, 1, entries, -1, -1])  # token 6: past the table, skipped
    off = (torch.randn(hk, d, generator=g) * 2).contiguous()
    got, want = _layer(bits, dtype, nblocks, page, hk, d), _layer(bits, dtype, nblocks, page, hk, d)
    sinks = [torch.full((entries, 2, hk, d), 7.0, dtype=dtype) for _ in range(2)]
    write_kv(k, v, got.k, got.v, slots, got.k_sz, got.v_sz, bits, off, sinks[0], sink_slot)
    keep = slots >= 0
    ref_slot = torch.where(sink_slot < entries, sink_slot, -1)[keep]
    kv = (k[keep], v[keep], want.k, want.v, slots[keep], want.k_sz, want.v_sz)
    write_kv_ref(*kv, bits, off, sinks[1], ref_slot)
    for a, b in zip(_copy(got), _copy(want), strict=True):
        assert torch.equal(a, b)
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even)
        torch.testing.assert_close(sinks[0], sinks[1], rtol=2**-7, atol=0)
    else:
        assert torch.equal(sinks[0], sinks[1])
    assert torch.equal(sinks[0][0, 1], v[3]) and torch.equal(sinks[1][2, 0], (k[0].float() - off).to(dtype))
    assert (sinks[0][[1, 3]] == 7).all()  # the pad row's entry and an unused one are untouched


@pytest.mark.parametrize(
    ("bits", "dtype", "hq", "hk", "d", "sinks"),
    [
        (0, torch.float16, 6, 2, 32, False),
        (8, torch.float32, 4, 4, 48, True),
        (4, torch.bfloat16, 9, 3, 64, True),
        (4, torch.float16, 8, 1, 16, False),
    ],
)
def test_write_kv_with_rope_equals_rotary_then_write(bits, dtype, hq, hk, d, sinks) -> None:
    """``write_kv(..., rope=(q, cos, sin))`` (the decode step's one launch) leaves q, the cache and the sinks
    bit-identical to ``rotary_(q, k, cos, sin)`` and then ``write_kv``, on strided views of one fused qkv."""
    from lmkiln.kernels.fused import rotary_
    from lmkiln.kernels.kv_cache import write_kv

    g = torch.Generator().manual_seed(hq * d + bits)
    t, nblocks, page, entries = 7, 3, 8, 2
    qkv = (torch.randn(t, hq + 2 * hk, d, generator=g) * 2).to(dtype)
    pos = torch.randint(0, 500, (t,), generator=g).float()[:, None]
    freq = 10000.0 ** (-torch.arange(d // 2).float() / (d // 2))
    cos = torch.cat([(pos * freq).cos()] * 2, -1).to(dtype)
    sin = torch.cat([(pos * freq).sin()] * 2, -1).to(dtype)
    slots = torch.randperm(nblocks * page, generator=g)[:t]
    slots[3] = -1
    sink_slot = torch.tensor([1, -1, -1, -1, 0, -1, -1]) if sinks else None
    off = torch.randn(hk, d, generator=g).contiguous() if bits else None
    results = []
    for fused in (False, True):
        x = qkv.clone()
        q, k, v = x.split([hq, hk, hk], dim=1)
        c = _layer(bits, dtype, nblocks, page, hk, d)
        sink = torch.zeros(entries, 2, hk, d, dtype=dtype) if sinks else None
        if fused:
            write_kv(k, v, c.k, c.v, slots, c.k_sz, c.v_sz, bits, off, sink, sink_slot, rope=(q, cos, sin))
        else:
            rotary_(q, k, cos, sin)
            write_kv(k, v, c.k, c.v, slots, c.k_sz, c.v_sz, bits, off, sink, sink_slot)
        results.append([q, *(y for y in (*_copy(c), sink) if y is not None)])
    assert not torch.equal(results[0][0], qkv[:, :hq])  # q was rotated
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    if hk > 1:
        x = qkv.clone()
        k, v, c = x[:, hq : hq + hk], x[:, hq + hk :], _layer(bits, dtype, nblocks, page, hk, d)
        with pytest.raises(KernelInputError, match="multiple of k's"):
            write_kv(k, v, c.k, c.v, slots, c.k_sz, c.v_sz, bits, rope=(x[:, : hk + 1], cos, sin))


def _sink_args(hk, d, dtype, idx, seed=0):
    """Random sink entries (not the cache's position-0 values, so a missed substitution shows)."""
    g = torch.Generator().manual_seed(seed + 17)
    sink = torch.randn(3, 2, hk, d, generator=g).to(dtype)
    return sink, torch.tensor(idx, dtype=torch.int32)


def _batch(shapes, bits, dtype, hq, hk, d, page, seed=0, pad_rows=0):
    """A cache holding each sequence's (cached prefix + new) tokens (written by the reference; the write
    kernel is bit-identical to it), every unused block poisoned with NaN; the step's metadata and queries."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-(c + n) // page) for c, n in shapes)
    nblocks = need + 3
    c = _layer(bits, dtype, nblocks, page, hk, d)
    # block 0 is in use (the reference reads it for -1 table entries); the spare ones are poisoned
    used = [0, *(torch.randperm(nblocks - 1, generator=g)[: need - 1] + 1).tolist()]
    spare = sorted(set(range(nblocks)) - set(used))
    if bits:
        c.k_sz[spare], c.v_sz[spare] = float("nan"), float("nan")
    else:
        c.k[spare], c.v[spare] = float("nan"), float("nan")
    tables, slots = [], []
    for ctx, new in shapes:
        tab = [used.pop() for _ in range(-(-(ctx + new) // page))]
        tables.append(tab)
        slots += [tab[p // page] * page + p % page for p in range(ctx + new)]
    n = len(slots)
    k = torch.randn(n, hk, d, generator=g).to(dtype)
    v = torch.randn(n, hk, d, generator=g).to(dtype)
    write_kv_ref(k, v, c.k, c.v, torch.tensor(slots), c.k_sz, c.v_sz, bits)
    width = max(map(len, tables)) + 1
    tables += [[]] * pad_rows
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    q_lens = [new for _, new in shapes] + [1] * pad_rows
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([ctx + new for ctx, new in shapes] + [0] * pad_rows, dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    return c, q, bt, qsl, lens, max(q_lens)


def _check_close(out, ref, dtype, rows):
    assert torch.isfinite(out).all()
    err = (out[:rows].float() - ref[:rows].float()).abs().max().item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize(
    ("bits", "dtype", "hq", "hk", "d", "page", "splits"),
    [
        (0, torch.float32, 4, 4, 64, 16, 1),
        (8, torch.float32, 6, 2, 64, 16, 4),
        (4, torch.float32, 6, 2, 32, 64, 2),
        (0, torch.bfloat16, 8, 2, 32, 16, 3),
        (8, torch.float16, 4, 1, 128, 16, 2),
        (4, torch.float16, 3, 3, 16, 64, 1),
    ],
)
@pytest.mark.parametrize("own_counters", [False, True])
def test_decode_matches_reference(bits, dtype, hq, hk, d, page, splits, own_counters) -> None:
    """Lengths 1, 17, 69, 130 across block boundaries, one padded row (seq_len 0, table -1): zeros. The last
    split merges (split counters: the caller's, left zeroed, or a set made for the call); a second launch
    agrees bit for bit."""
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    shapes = [(0, 1), (16, 1), (68, 1), (129, 1)]
    c, q, bt, qsl, lens, _ = _batch(shapes, bits, dtype, hq, hk, d, page, seed=hq + d, pad_rows=1)
    ref = paged_attention_ref(q[:4], c.k, c.v, bt[:4], qsl[:5], lens[:4], d**-0.5, c.k_sz, c.v_sz, bits)
    counters = make_counters("cpu", 64) if own_counters else None
    args = (q, c.k, c.v, bt, lens, d**-0.5, c.k_sz, c.v_sz, bits, AttentionConfig(num_splits=splits))
    out = paged_decode(*args, counters=counters)
    assert out.dtype == dtype and out.shape == q.shape
    _check_close(out, ref, dtype, 4)
    assert not out[4].any()
    if counters is not None:
        assert not counters.any()
    torch.testing.assert_close(paged_decode(*args, counters=counters), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("bits", "dtype", "hq", "hk", "d", "page", "block_m"),
    [
        (0, torch.float32, 6, 2, 32, 16, 0),
        (8, torch.float32, 4, 4, 64, 64, 16),
        (4, torch.float32, 6, 2, 64, 16, 32),
        (0, torch.float16, 2, 2, 32, 64, 0),
        (4, torch.bfloat16, 3, 1, 32, 16, 16),
    ],
)
def test_prefill_matches_reference(bits, dtype, hq, hk, d, page, block_m) -> None:
    """A mixed batch: prefill from scratch, a prefix-cache hit, a chunk after a long prefix, decode rows."""
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_prefill

    shapes = [(0, 7), (37, 5), (5, 40), (12, 1), (0, 1), (64, 16)]
    c, q, bt, qsl, lens, max_q = _batch(shapes, bits, dtype, hq, hk, d, page, seed=hq * d + bits)
    ref = paged_attention_ref(q, c.k, c.v, bt, qsl, lens, d**-0.5, c.k_sz, c.v_sz, bits)
    cfg = AttentionConfig(block_m=block_m, block_n=16 if block_m else 0)
    out = paged_prefill(q, c.k, c.v, bt, qsl, lens, max_q, d**-0.5, c.k_sz, c.v_sz, bits, cfg)
    _check_close(out, ref, dtype, q.shape[0])


@pytest.mark.parametrize(
    ("bits", "dtype", "hq", "hk", "d", "page", "splits"),
    [
        (4, torch.float32, 6, 2, 32, 16, 2),
        (8, torch.float16, 4, 1, 64, 16, 1),
        (4, torch.bfloat16, 3, 3, 16, 64, 3),
    ],
)
def test_decode_reads_sinks(bits, dtype, hq, hk, d, page, splits) -> None:
    """Key position 0 comes from the sequence's sink entry (only the split holding key 0 substitutes it)."""
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    shapes = [(0, 1), (16, 1), (68, 1), (129, 1)]
    c, q, bt, qsl, lens, _ = _batch(shapes, bits, dtype, hq, hk, d, page, seed=hq + d, pad_rows=1)
    sink, idx = _sink_args(hk, d, dtype, [1, -1, 0, 2, -1], seed=d)
    args = (c.k, c.v, bt[:4], qsl[:5], lens[:4], d**-0.5, c.k_sz, c.v_sz, bits)
    ref = paged_attention_ref(q[:4], *args, sink, idx[:4])
    assert not torch.allclose(ref[[0, 2, 3]], paged_attention_ref(q[:4], *args)[[0, 2, 3]], atol=0.05)
    cfg = AttentionConfig(num_splits=splits)
    out = paged_decode(q, c.k, c.v, bt, lens, d**-0.5, c.k_sz, c.v_sz, bits, cfg, sink=sink, sink_idx=idx)
    _check_close(out, ref, dtype, 4)
    assert not out[4].any()
    counters = make_counters("cpu", 64)
    merged = paged_decode(
        q, c.k, c.v, bt, lens, d**-0.5, c.k_sz, c.v_sz, bits, cfg, sink=sink, sink_idx=idx, counters=counters
    )
    _check_close(merged, ref, dtype, 4)
    assert not counters.any()


@pytest.mark.parametrize(
    ("bits", "dtype", "hq", "hk", "d", "page", "block_m"),
    [(4, torch.float32, 6, 2, 32, 16, 32), (8, torch.bfloat16, 2, 2, 32, 64, 0)],
)
def test_prefill_reads_sinks(bits, dtype, hq, hk, d, page, block_m) -> None:
    """A mixed batch with prefix hits and several query tiles a sequence: every tile reads key 0's sink."""
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_prefill

    shapes = [(0, 7), (37, 5), (5, 40), (12, 1), (64, 16)]
    c, q, bt, qsl, lens, max_q = _batch(shapes, bits, dtype, hq, hk, d, page, seed=hq * d + bits)
    sink, idx = _sink_args(hk, d, dtype, [0, 1, -1, 1, 2], seed=d)
    ref = paged_attention_ref(q, c.k, c.v, bt, qsl, lens, d**-0.5, c.k_sz, c.v_sz, bits, sink, idx)
    cfg = AttentionConfig(block_m=block_m, block_n=16 if block_m else 0)
    out = paged_prefill(
        q, c.k, c.v, bt, qsl, lens, max_q, d**-0.5, c.k_sz, c.v_sz, bits, cfg, sink=sink, sink_idx=idx
    )
    _check_close(out, ref, dtype, q.shape[0])


def test_sinks_are_validated() -> None:
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import paged_decode

    c, q, bt, _, lens, _ = _batch([(5, 1), (9, 1)], 4, torch.float32, 4, 2, 32, 16)
    sink, idx = _sink_args(2, 32, torch.float32, [0, -1])
    args = (q, c.k, c.v, bt, lens, 1.0, c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match=r"sink must be a contiguous \[entries, 2, 2, 32\]"):
        paged_decode(*args, sink=sink[:, :, :1], sink_idx=idx)
    with pytest.raises(KernelInputError, match="sink_idx must be int32"):
        paged_decode(*args, sink=sink, sink_idx=idx.long())
    fp = _layer(0, torch.float32, 4, 16, 2, 32)
    with pytest.raises(KernelInputError, match="only apply to a quantized"):
        paged_decode(q, fp.k, fp.v, bt, lens, 1.0, sink=sink, sink_idx=idx)
    k = q[:, :2].contiguous()
    with pytest.raises(KernelInputError, match="sink_slot must be"):
        write_kv(k, k, c.k, c.v, torch.tensor([0, 1]), c.k_sz, c.v_sz, 4, None, sink, idx[:1])


def test_decode_and_prefill_kernels_agree_on_a_decode_batch() -> None:
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_decode, paged_prefill

    c, q, bt, qsl, lens, _ = _batch([(30, 1), (3, 1), (90, 1)], 8, torch.float32, 4, 2, 32, 16, seed=3)
    a = paged_decode(q, c.k, c.v, bt, lens, 0.3, c.k_sz, c.v_sz, 8, AttentionConfig(num_splits=3))
    b = paged_prefill(q, c.k, c.v, bt, qsl, lens, 1, 0.3, c.k_sz, c.v_sz, 8)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def test_launchers_reject_bad_inputs() -> None:
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import paged_decode, paged_prefill

    c, q, bt, qsl, lens, _ = _batch([(5, 1), (9, 1)], 4, torch.float32, 4, 2, 32, 16)
    with pytest.raises(KernelInputError, match="multiple of num_kv_heads"):
        paged_decode(q[:, :3], c.k, c.v, bt, lens, 1.0, c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match="needs its"):
        paged_decode(q, c.k, c.v, bt, lens, 1.0, None, c.v_sz, 4)
    with pytest.raises(KernelInputError, match=r"\[num_blocks, block_size, 2, 32\] for 2 KV heads"):
        paged_decode(q, c.k, c.v, bt, lens, 1.0, c.k_sz, c.v_sz, 8)  # int4 cache passed as int8
    with pytest.raises(KernelInputError, match="seq_lens must be int32"):
        paged_decode(q, c.k, c.v, bt, lens.long(), 1.0, c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match="one query per sequence"):
        paged_decode(q[:1], c.k, c.v, bt, lens, 1.0, c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match=r"batch x KV heads = 4 .*make_counters"):
        few = torch.zeros(3, dtype=torch.int32)
        paged_decode(q, c.k, c.v, bt, lens, 1.0, c.k_sz, c.v_sz, 4, counters=few)
    with pytest.raises(KernelInputError, match="query_start_loc"):
        paged_prefill(q, c.k, c.v, bt, qsl[:-1], lens, 1, 1.0, c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match="contiguous last dim"):
        paged_prefill(q.transpose(1, 2), c.k, c.v, bt, qsl, lens, 1, 1.0, c.k_sz, c.v_sz, 4)
    k = torch.randn(2, 2, 31)
    with pytest.raises(KernelInputError, match="odd"):
        write_kv(k, k, c.k, c.v, torch.tensor([0, 1]), c.k_sz, c.v_sz, 4)
    with pytest.raises(KernelInputError, match="slot_mapping"):
        write_kv(q[:, :2], q[:, :2], c.k, c.v, torch.tensor([0.0, 1.0]), c.k_sz, c.v_sz, 4)


@pytest.mark.parametrize(("quant_policy", "fused"), [(4, "0"), (8, "1"), (0, "1")])
def test_triton_backend_runs_the_engine_like_the_torch_backend(
    tiny_llama_dir, monkeypatch, quant_policy, fused
) -> None:
    """Greedy tokens and logprobs of the tiny Llama (GQA 4/2) with the Triton backend (int4 / int8 cache with
    attention sinks, padded decode buffers as the CUDA-graph path uses) equal the torch backend's. With the
    fused ops (``LMKILN_FUSED=1``) the rotary runs inside the KV write and the decode kernel merges its own
    splits; at batch 1 over an unquantized cache the decode kernel also rotates and stores the step's K/V."""
    from lmkiln.engine import LLMEngine, SamplingParams
    from lmkiln.engine.attention import TritonAttentionBackend

    prompts = [list(range(3, 24)), [7, 8], [3, *range(40, 53), 5]]  # two share position 0's entry
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    kw = dict(
        block_size=4,
        cache_max_entry_count=64,
        max_num_seqs=4,
        session_len=64,
        quant_policy=quant_policy,
        kv_sink_entries=4,
    )
    ref = LLMEngine.from_pretrained(tiny_llama_dir, **kw)
    want = ref.generate(prompts, p)
    monkeypatch.setenv("LMKILN_ATTENTION", "triton")
    monkeypatch.setenv("LMKILN_FUSED", fused)
    eng = LLMEngine.from_pretrained(tiny_llama_dir, **kw)
    assert isinstance(eng.runner.backend, TritonAttentionBackend)
    eng.runner.enable_decode_graphs(capture=False)
    backend, new_kv = eng.runner.backend, []
    decode = backend._decode
    backend._decode = lambda *a, **k: new_kv.append(k.get("new_kv") is not None) or decode(*a, **k)
    got = eng.generate(prompts, p)
    assert new_kv and not any(new_kv)  # batches of 3 keep the KV-write launch
    if quant_policy == 0 and fused == "1":  # batch 1: the decode kernel writes the step's K/V itself
        new_kv.clear()
        assert eng.generate(prompts[:1], p)[0].token_ids == ref.generate(prompts[:1], p)[0].token_ids
        assert new_kv and all(new_kv)
    if quant_policy:
        assert eng.scheduler.sinks.num_hits == 1 and eng.runner.kv_cache[1].sink[:2].abs().sum() > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want, strict=True):
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-4)


def test_make_attention_backend(monkeypatch) -> None:
    from lmkiln.engine.attention import TorchAttentionBackend, TritonAttentionBackend, make_attention_backend
    from lmkiln.engine.errors import EngineConfigError

    monkeypatch.delenv("LMKILN_ATTENTION", raising=False)
    assert isinstance(make_attention_backend("cpu"), TorchAttentionBackend)
    assert isinstance(make_attention_backend(torch.device("cuda", 0)), TritonAttentionBackend)
    monkeypatch.setenv("LMKILN_ATTENTION", "torch")
    assert isinstance(make_attention_backend("cuda"), TorchAttentionBackend)
    monkeypatch.setenv("LMKILN_ATTENTION", "Triton")
    assert isinstance(make_attention_backend("cpu"), TritonAttentionBackend)
    monkeypatch.setenv("LMKILN_ATTENTION", "flash")
    with pytest.raises(EngineConfigError, match="LMKILN_ATTENTION"):
        make_attention_backend("cpu")


@pytest.mark.parametrize(
    ("dtype", "hq", "hk", "d", "page", "splits"),
    [
        (torch.float32, 4, 4, 64, 16, 1),
        (torch.float16, 6, 2, 32, 16, 3),
        (torch.bfloat16, 8, 2, 32, 64, 2),
        (torch.float16, 4, 1, 128, 16, 4),
    ],
)
def test_decode_with_new_kv_equals_rotary_write_then_decode(dtype, hq, hk, d, page, splits) -> None:
    """``paged_decode(..., new_kv=(k, v, slots, cos, sin))`` (the decode step without a KV-write launch):
    the output and the cache are bit-identical to ``write_kv(k, v, ..., rope=(q, cos, sin))`` then
    ``paged_decode``, although the new rows hold NaN before (the kernel must not read them back); the pad row
    (slot -1) writes nothing; q, k and v are left as they were."""
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    shapes = [(0, 1), (16, 1), (68, 1), (129, 1)]
    c, q, bt, _, lens, _ = _batch(shapes, 0, dtype, hq, hk, d, page, seed=hq + d + 1, pad_rows=1)
    b = q.shape[0]
    pos = (lens.long() - 1).clamp_min(0)
    slots = torch.where(lens > 0, bt[torch.arange(b), pos // page].long() * page + pos % page, -1)
    c.k.view(-1, hk, d)[slots[:4]] = float("nan")  # this step's rows are not written yet
    c.v.view(-1, hk, d)[slots[:4]] = float("nan")
    g = torch.Generator().manual_seed(d)
    k = torch.randn(b, hk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, d, generator=g).to(dtype)
    freq = 10000.0 ** (-torch.arange(d // 2).float() / (d // 2))
    ang = pos.float()[:, None] * freq
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    cfg = AttentionConfig(num_splits=splits)
    caches, outs = [], []
    for fused in (False, True):
        kc, vc = c.k.clone(), c.v.clone()
        qx, kx, vx = q.clone(), k.clone(), v.clone()
        args = (kc, vc, bt, lens, d**-0.5, None, None, 0, cfg)
        if fused:
            out = paged_decode(qx, *args, counters=make_counters("cpu", 64), new_kv=(kx, vx, slots, cos, sin))
            assert torch.equal(qx, q) and torch.equal(kx, k) and torch.equal(vx, v)
        else:
            write_kv(kx, vx, kc, vc, slots, rope=(qx, cos, sin))
            out = paged_decode(qx, *args)
        caches.append((kc, vc))
        outs.append(out)
    assert torch.isfinite(outs[1][:4]).all()
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    for want, got in zip(caches[0], caches[1], strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    with pytest.raises(KernelInputError, match="float cache"):
        q8 = _layer(8, dtype, 4, page, hk, d)
        paged_decode(q, q8.k, q8.v, bt, lens, 1.0, q8.k_sz, q8.v_sz, 8, new_kv=(k, v, slots, cos, sin))
    with pytest.raises(KernelInputError, match="new_kv's v"):
        paged_decode(q, c.k, c.v, bt, lens, 1.0, new_kv=(k, v.double(), slots, cos, sin))


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_consumes_a_float32_qkv_accumulator(splits) -> None:
    """``consume=True``: q, k and v are views of a float32 split-K accumulator (the fused qkv GEMV's atomic
    output); the kernel rounds them to the activations' dtype (``cos``'s, fp16) first, so output and cache
    equal the fp16 path's on the rounded values, and leaves the accumulator zeroed (the last split of each
    KV head, or the only one), with the caller's split counters or without."""
    from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

    dtype, hq, hk, d, page = torch.float16, 6, 2, 32, 16
    shapes = [(0, 1), (16, 1), (68, 1), (129, 1)]
    c, q16, bt, _, lens, _ = _batch(shapes, 0, dtype, hq, hk, d, page, seed=5, pad_rows=1)
    b = q16.shape[0]
    pos = (lens.long() - 1).clamp_min(0)
    slots = torch.where(lens > 0, bt[torch.arange(b), pos // page].long() * page + pos % page, -1)
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(b, hq + 2 * hk, d, generator=g)  # float32, as the atomic GEMV leaves it
    acc_saved = acc.clone()
    q, k, v = acc.split([hq, hk, hk], dim=1)
    ang = pos.float()[:, None] * 10000.0 ** (-torch.arange(d // 2).float() / (d // 2))
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    cfg = AttentionConfig(num_splits=splits)
    kc, vc = c.k.clone(), c.v.clone()
    want = paged_decode(q.to(dtype), kc, vc, bt, lens, d**-0.5, config=cfg, counters=make_counters("cpu", 64),
                        new_kv=(k.to(dtype), v.to(dtype), slots, cos, sin))
    for counters in (make_counters("cpu", 64), None):
        acc.copy_(acc_saved)
        kc2, vc2 = c.k.clone(), c.v.clone()
        got = paged_decode(q, kc2, vc2, bt, lens, d**-0.5, config=cfg, counters=counters,
                           new_kv=(k, v, slots, cos, sin), consume=True)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        torch.testing.assert_close(kc2, kc, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(vc2, vc, atol=0, rtol=0, equal_nan=True)
        assert not acc.any()
    with pytest.raises(KernelInputError, match="float32 q, k, v"):
        paged_decode(q16, c.k, c.v, bt, lens, 1.0, new_kv=(k, v, slots, cos, sin), consume=True)


def test_decode_splits_stay_within_two_programs_an_sm(monkeypatch) -> None:
    """The split count from shapes: a power of two with batch x KV heads x splits <= 2 x SMs (batch 1 of a
    7B shape on an H100: 8, not 16), capped by the longest context (>= 64 keys a split)."""
    from lmkiln.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert [paged_attention.decode_splits(b, 32, 4096, cuda) for b in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert paged_attention.decode_splits(1, 32, 256, cuda) == 4  # 64 keys a split at least
    assert paged_attention.decode_splits(1, 8, 1 << 16, cuda) == 32
    assert paged_attention.decode_splits(1, 32, 4096, torch.device("cpu")) == 1
