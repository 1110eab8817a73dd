"""Programmatic dependent launch (``lmkiln.kernels.pdl``).

On the CPU: when PDL is on, the environment switches and their errors, the A/B context, and how many weight
rows an ``fma`` program prefetches. On a Hopper GPU: a decoder-layer chain of every PDL kernel (add+RMSNorm,
qkv GEMV, rotary, KV write, split-KV decode attention and its merge, o GEMV, gate/up GEMV with the SiLU
epilogue, down GEMV), four layers deep, captured in a CUDA graph, gives bit-identical results with PDL on
(with and without the L2 prefetch) and off, replay after replay: the overlap changes timing, never a result.
"""

from __future__ import annotations

import os

import pytest
import torch
from lmkiln.kernels import pdl

from lmkiln.errors import KernelInputError


def test_off_on_the_cpu_and_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    assert pdl.enabled(torch.device("cpu")) is False
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert pdl.enabled(torch.device("cuda", 0)) is False  # no CUDA call needed to say no
    assert pdl.launch_opts(False) == {}
    assert pdl.launch_opts(True) == {"launch_pdl": True}


@pytest.mark.parametrize("value", ["yes", "2", " on"])
def test_bad_switch_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(pdl.PDL_ENV, value)
    with pytest.raises(KernelInputError, match="LMKILN_PDL"):
        pdl.enabled(torch.device("cpu"))


def test_mma_t_launches_without_pdl_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pdl.MMA_T_ENV, raising=False)
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    assert pdl.mma_t_enabled(torch.device("cuda", 0)) is False  # the default: no CUDA call needed
    monkeypatch.setenv(pdl.MMA_T_ENV, "1")
    assert pdl.mma_t_enabled(torch.device("cpu")) is False  # asked for, but PDL itself is off here
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert pdl.mma_t_enabled(torch.device("cuda", 0)) is False
    monkeypatch.setenv(pdl.MMA_T_ENV, "on")
    with pytest.raises(KernelInputError, match="LMKILN_PDL_MMA_T"):
        pdl.mma_t_enabled(torch.device("cpu"))


def test_prefetch_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pdl.PREFETCH_ENV, raising=False)
    assert pdl.prefetch_bytes() == int(pdl.DEFAULT_PREFETCH_MB * 2**20)
    assert pdl.prefetch_bytes(4.0) == 4 * 2**20  # a tuned budget
    monkeypatch.setenv(pdl.PREFETCH_ENV, "0.5")
    assert pdl.prefetch_bytes() == 2**19
    assert pdl.prefetch_bytes(4.0) == 2**19  # the environment overrides the tuned budget
    for bad in ("-1", "lots", "nan"):
        monkeypatch.setenv(pdl.PREFETCH_ENV, bad)
        with pytest.raises(KernelInputError, match="MiB"):
            pdl.prefetch_bytes()


def test_setting_switches_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pdl.PDL_ENV, "1")
    monkeypatch.delenv(pdl.PREFETCH_ENV, raising=False)
    with pdl.setting("off"):
        assert pdl.enabled(torch.device("cuda", 0)) is False
    with pdl.setting("4"):
        assert pdl.prefetch_bytes() == 4 * 2**20
    assert pdl.prefetch_bytes() == int(pdl.DEFAULT_PREFETCH_MB * 2**20)
    assert os.environ[pdl.PDL_ENV] == "1"
    with pytest.raises(KernelInputError, match="variant"), pdl.setting("fast"):
        pass


def test_prefetch_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmkiln.kernels.w4a16 import _prefetch_rows

    monkeypatch.setenv(pdl.PREFETCH_ENV, "8")
    # 7B qkv: 384 panels x split 8 x 128 B = 384 KiB a row level -> 21 rows -> 16 (a power of two)
    assert _prefetch_rows(True, 12288, 32, 8) == 16
    assert _prefetch_rows(False, 12288, 32, 8) == 0
    monkeypatch.delenv(pdl.PREFETCH_ENV)
    assert _prefetch_rows(True, 12288, 32, 8, prefetch_mb=2.0) == 4  # 2 MiB / 384 KiB -> 5 -> 4
    monkeypatch.setenv(pdl.PREFETCH_ENV, "8")
    assert _prefetch_rows(True, 12288, 32, 8, prefetch_mb=2.0) == 16
    # capped at the program's share of K: 2 chunks of 16 rows
    monkeypatch.setenv(pdl.PREFETCH_ENV, "1024")
    assert _prefetch_rows(True, 4096, 32, 16) == 32
    # a budget below one row level prefetches nothing
    monkeypatch.setenv(pdl.PREFETCH_ENV, "0.1")
    assert _prefetch_rows(True, 22016, 32, 4) == 0


# ------------------------------------------------------------------------------------------------ GPU


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="PDL needs a CUDA GPU of compute capability >= 9")
def test_decoder_chain_in_a_graph_is_bit_identical_with_pdl() -> None:
    from lmkiln.kernels import fused
    from lmkiln.kernels.kv_cache import write_kv
    from lmkiln.kernels.paged_attention import AttentionConfig, paged_decode
    from lmkiln.kernels.w4a16 import KernelConfig, fma, make_scratch

    from lmkiln.bench.kernels import make_weights

    dev = torch.device("cuda")
    hidden, hq, hk, d, inter, layers, page, ctx = 1024, 8, 2, 128, 2048, 4, 64, 300
    gen = torch.Generator(device=dev).manual_seed(0)
    w = [
        {
            "qkv": make_weights(hidden, (hq + 2 * hk) * d, 128, dev, seed=10 * i),
            "o": make_weights(hq * d, hidden, 128, dev, seed=10 * i + 1),
            "gate_up": make_weights(hidden, 2 * inter, 128, dev, seed=10 * i + 2),
            "down": make_weights(inter, hidden, 128, dev, seed=10 * i + 3),
            "norm": torch.rand(hidden, generator=gen, device=dev).half() + 0.5,
        }
        for i in range(layers)
    ]
    cfg = KernelConfig(kind="fma", block_m=1, block_n=64, split_k=4, num_warps=2, chunks=2)
    blocks = (ctx + page) // page + 1
    caches = [
        tuple(torch.randn(blocks, page, hk, d, generator=gen, device=dev).half() for _ in range(2))
        for _ in range(layers)
    ]
    tables = torch.arange(blocks, device=dev, dtype=torch.int32)[None, :]
    lens = torch.tensor([ctx + 1], device=dev, dtype=torch.int32)
    slot = torch.tensor([ctx], device=dev, dtype=torch.int64)
    pos = torch.arange(d // 2, device=dev).float() / (d // 2)
    cos = torch.cat([pos.cos(), pos.cos()])[None, :].half()
    sin = torch.cat([pos.sin(), pos.sin()])[None, :].half()
    x0 = torch.randn(1, hidden, generator=gen, device=dev).half()
    scratch = make_scratch(dev)
    attn_cfg = AttentionConfig(num_splits=2)

    def forward() -> torch.Tensor:
        x, res = fused.rmsnorm(x0, w[0]["norm"], 1e-5), x0
        for i, lw in enumerate(w):
            qkv = fma(x, lw["qkv"].qweight, lw["qkv"].sz, lw["qkv"].zeros, cfg, scratch)
            q, k, v = qkv.view(1, hq + 2 * hk, d).split([hq, hk, hk], dim=1)
            fused.rotary_(q, k, cos, sin)
            write_kv(k, v, *caches[i], slot)
            a = paged_decode(q, *caches[i], tables, lens, d**-0.5, config=attn_cfg)
            o = fma(a.reshape(1, hq * d), lw["o"].qweight, lw["o"].sz, lw["o"].zeros, cfg, scratch)
            x, res = fused.add_rmsnorm(o, res, lw["norm"], 1e-5)
            g = lw["gate_up"]
            h = fma(x, g.qweight, g.sz, g.zeros, cfg, scratch, silu=True)
            y = fma(h, lw["down"].qweight, lw["down"].sz, lw["down"].zeros, cfg, scratch)
            x, res = fused.add_rmsnorm(y, res, lw["norm"], 1e-5)
        return torch.cat([x, res])

    results = {}
    for variant in ("off", "0", "8"):
        with pdl.setting(variant):
            eager = forward()
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                forward()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                out = forward()
            replays = []
            for _ in range(3):
                graph.replay()
                replays.append(out.clone())
            torch.cuda.synchronize()
        assert torch.isfinite(eager).all()
        for r in replays:
            assert torch.equal(r, eager), f"PDL {variant}: graph replay differs from eager"
        results[variant] = eager
    assert torch.equal(results["0"], results["off"])
    assert torch.equal(results["8"], results["off"])
