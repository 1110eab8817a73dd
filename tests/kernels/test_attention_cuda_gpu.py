"""The CUDA decode attention with this step's K/V (``kernels/cuda/decode_attention.cu``) on a GPU against the
Triton kernel of the same contract (``LMKILN_CUDA_ATTENTION=0``) and the torch reference: GQA groups, head
dims 64 / 128, contexts of several stages a split, unmapped blocks, padded rows, int32 / int64 slots, the
float32 accumulator it consumes, and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch
from lmkiln.kernels import attention_cuda
from lmkiln.kernels.attention_ref import paged_attention_ref
from lmkiln.kernels.paged_attention import AttentionConfig, make_counters, paged_decode

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _cuda_kernel_runs() -> bool:
    return torch.cuda.is_available() and attention_cuda.enabled(
        torch.device(DEV, torch.cuda.current_device())
    )


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def _case(lens, hq, hk, d, page=64, seed=0, slot_dtype=torch.int64, hole=False):
    """A random fp16 cache (unused blocks NaN), block tables (a -1 hole in row 1 where ``hole``), this step's
    slots (-1 for rows of length 0), q/k/v as a float32 accumulator ``[B, Hq + 2 Hk, D]`` and cos/sin."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    width = max(1, max(-(-n // page) for n in lens)) + 1
    nblocks = sum(-(-n // page) for n in lens) + 4
    k_cache = torch.randn(nblocks, page, hk, d, device=DEV, generator=g).half()
    v_cache = torch.randn(nblocks, page, hk, d, device=DEV, generator=g).half()
    perm = torch.randperm(nblocks, device=DEV, generator=g).tolist()
    tables = torch.full((len(lens), width), -1, dtype=torch.int32, device=DEV)
    used = set()
    for i, n in enumerate(lens):
        for j in range(-(-n // page)):
            tables[i, j] = perm.pop()
            used.add(int(tables[i, j]))
    if hole and len(lens) > 1 and lens[1] > 2 * page:
        tables[1, 0] = -1  # an unmapped block: its keys are masked
    unused = sorted(set(range(nblocks)) - used)
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    pos = (seq.long() - 1).clamp_min(0)
    rows = torch.arange(len(lens), device=DEV)
    slots = torch.where(seq > 0, tables[rows, pos // page].long() * page + pos % page, -1).to(slot_dtype)
    acc = torch.randn(len(lens), hq + 2 * hk, d, device=DEV, generator=g)
    ang = pos.float()[:, None] * 10000.0 ** (-torch.arange(d // 2, device=DEV).float() / (d // 2))
    cos = torch.cat([ang.cos()] * 2, -1).half()
    sin = torch.cat([ang.sin()] * 2, -1).half()
    return k_cache, v_cache, tables, seq, slots, acc, cos, sin


def _run(case, hq, hk, consume, splits, cuda, monkeypatch):
    k_cache, v_cache, tables, seq, slots, acc, cos, sin = (x.clone() for x in case)
    monkeypatch.setenv(attention_cuda.ENABLE_ENV, "1" if cuda else "0")
    q, k, v = acc.split([hq, hk, hk], dim=1)
    if not consume:
        q, k, v = q.half(), k.half(), v.half()
    d = q.shape[2]
    out = paged_decode(
        q,
        k_cache,
        v_cache,
        tables,
        seq,
        d**-0.5,
        config=AttentionConfig(num_splits=splits),
        counters=make_counters(DEV, 1024),
        new_kv=(k, v, slots, cos, sin),
        consume=consume,
    )
    return out, k_cache, v_cache, acc


@pytest.mark.parametrize(
    ("hq", "hk", "d", "lens", "splits"),
    [
        (32, 32, 128, [300], 8),  # the 7B shape at batch 1 (8 splits of 48 keys)
        (32, 32, 128, [1], 8),  # only the new key
        (9, 3, 64, [0, 700, 65, 2], 0),  # SmolLM2's heads; a padded row; 2 stages a split at 700
        (32, 8, 128, [4000, 129], 3),  # GQA 4, 21 stages a split
        (16, 16, 64, [64, 1000], 1),  # one split: no cluster partner
    ],
)
@pytest.mark.parametrize("consume", [True, False])
def test_cuda_decode_matches_triton_and_reference(hq, hk, d, lens, splits, consume, monkeypatch) -> None:
    if not _cuda_kernel_runs():
        pytest.skip("the CUDA decode attention needs compute capability >= 9 and NVRTC")
    case = _case(
        lens, hq, hk, d, seed=hq + len(lens), slot_dtype=torch.int32 if consume else torch.int64, hole=True
    )
    q, k, v = case[5].split([hq, hk, hk], dim=1)
    if not consume:
        q, k, v = q.half(), k.half(), v.half()
    assert attention_cuda.usable(q, case[0], case[1], (k, v, case[4], case[6], case[7]), consume)
    got, kc, vc, acc = _run(case, hq, hk, consume, splits, True, monkeypatch)
    want, kw, vw, accw = _run(case, hq, hk, consume, splits, False, monkeypatch)
    torch.testing.assert_close(kc, kw, atol=0, rtol=0, equal_nan=True)  # the new rows bit for bit
    torch.testing.assert_close(vc, vw, atol=0, rtol=0, equal_nan=True)
    assert got.dtype == torch.float16
    live = torch.tensor(lens, device=DEV) > 0
    assert not got[~live].any()
    assert _rel(got[live], want[live]) < 1e-3
    if consume:
        assert not acc.any() and not accw.any()
    # the reference over the cache as written, with the rotated queries the kernel attends with
    q = case[5][:, :hq].half()
    cos, sin = case[6][:, None, :].float(), case[7][:, None, :].float()
    h = d // 2
    q1, q2 = q[..., :h].float(), q[..., h:].float()
    qr = torch.cat(
        [
            (q1 * cos[..., :h]).half() + (-q2 * sin[..., :h]).half(),
            (q2 * cos[..., h:]).half() + (q1 * sin[..., h:]).half(),
        ],
        -1,
    )
    n = len(lens)
    # (the NaN of unused blocks zeroed: the reference gathers the table's -1 entries too, then masks them)
    kz, vz, qsl = kc.nan_to_num(0.0), vc.nan_to_num(0.0), torch.arange(n + 1, dtype=torch.int32, device=DEV)
    ref = paged_attention_ref(qr, kz, vz, case[2], qsl, case[3], d**-0.5)
    check = live & (case[2] >= 0).sum(1).eq(torch.tensor([-(-x // 64) for x in lens], device=DEV))  # no hole
    assert check.any() and _rel(got[check], ref[check]) < 4e-3


def test_cuda_decode_in_a_cuda_graph(monkeypatch) -> None:
    """Captured once (batch 1, 7B heads, 8 splits), replayed over growing contexts and moved blocks: equal to
    eager launches on the same inputs bit for bit, the accumulator zeroed every time."""
    if not _cuda_kernel_runs():
        pytest.skip("the CUDA decode attention needs compute capability >= 9 and NVRTC")
    monkeypatch.setenv(attention_cuda.ENABLE_ENV, "1")
    hq = hk = 32
    d, page, width, nb = 128, 64, 40, 64
    g = torch.Generator(device=DEV).manual_seed(3)
    k_cache = torch.randn(nb, page, hk, d, device=DEV, generator=g).half()
    v_cache = torch.randn(nb, page, hk, d, device=DEV, generator=g).half()
    tables = torch.full((1, width), -1, dtype=torch.int32, device=DEV)
    seq = torch.zeros(1, dtype=torch.int32, device=DEV)
    slots = torch.full((1,), -1, dtype=torch.int64, device=DEV)
    acc = torch.zeros(1, hq + 2 * hk, d, device=DEV)
    cos = torch.ones(1, d, dtype=torch.float16, device=DEV)
    sin = torch.zeros(1, d, dtype=torch.float16, device=DEV)
    out = torch.empty(1, hq, d, dtype=torch.float16, device=DEV)
    q, k, v = acc.split([hq, hk, hk], dim=1)
    counters = make_counters(DEV, 64)

    def step() -> None:
        paged_decode(
            q,
            k_cache,
            v_cache,
            tables,
            seq,
            d**-0.5,
            config=AttentionConfig(num_splits=8),
            out=out,
            counters=counters,
            new_kv=(k, v, slots, cos, sin),
            consume=True,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    perm = torch.randperm(nb, device=DEV, generator=g).to(torch.int32)
    for n in (1, 64, 65, 511, 2000):
        nblk = -(-n // page)
        tables.fill_(-1)
        tables[0, :nblk] = perm[:nblk]
        seq.fill_(n)
        slots.fill_(int(tables[0, (n - 1) // page]) * page + (n - 1) % page)
        ang = (n - 1) * 10000.0 ** (-torch.arange(d // 2, device=DEV).float() / (d // 2))
        cos.copy_(torch.cat([ang.cos()] * 2).half())
        sin.copy_(torch.cat([ang.sin()] * 2).half())
        fresh = torch.randn(acc.shape, device=DEV, generator=g)
        acc.copy_(fresh)
        out.fill_(float("nan"))
        graph.replay()
        got, cache = out.clone(), (k_cache.clone(), v_cache.clone())
        assert not acc.any()
        acc.copy_(fresh)
        step()
        torch.testing.assert_close(got, out, atol=0, rtol=0)
        assert torch.equal(cache[0], k_cache) and torch.equal(cache[1], v_cache)
        perm = perm.roll(7)
