"""W4A16 kernels on a CUDA GPU at real Llama shapes (skipped without CUDA)."""

from __future__ import annotations

import functools

import pytest
import torch

from lmkiln.errors import QuantConfigError

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 12288), (11008, 4096)]  # (K, N): fused qkv and down of Llama-2-7B


def _ref(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    from lmkiln.kernels.reference import dequant_ref

    return x.double() @ dequant_ref(p["qweight"], p["sz"], torch.float64)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_all_kernels_real_shapes(make_packed, dtype, g):
    """Every kernel kind at the qkv and down shapes: partial row tiles, split-K, every output written. The
    swapped-operand ``mma_t`` gets no zero points (it dequantizes ``q * s + m``)."""
    from lmkiln.kernels import w4a16

    tol = 2e-3 if dtype == torch.float16 else 1e-2
    scratch = w4a16.make_scratch("cuda")
    for k, n in SHAPES:
        p = make_packed(k, n, g, seed=k, device="cuda")
        fma = functools.partial(w4a16.KernelConfig, kind="fma", num_stages=1)
        t = functools.partial(w4a16.KernelConfig, kind="mma_t", zfold=False)
        cfgs = [
            (1, fma(block_m=1, block_n=128, split_k=6)),
            (1, fma(block_m=1, block_n=256, num_warps=4, split_k=5, chunks=2, flush=4)),
            (3, fma(block_m=4, block_n=128, split_k=7, flush=4, num_stages=2)),
            (13, fma(block_m=8, block_n=128, num_warps=4, split_k=3, flush=4)),
            (1, w4a16.KernelConfig(kind="gemv", block_n=128, split_k=4)),
            (1, w4a16.KernelConfig(kind="mma", block_m=16, block_n=128, split_k=8, zfold=True, join=True)),
            (13, w4a16.KernelConfig(kind="mma", block_m=16, block_n=64, split_k=3, zfold=True, join=False)),
            (61, w4a16.KernelConfig(kind="mma", block_m=64, block_n=128, split_k=2, zfold=False, join=True)),
            (
                300,
                w4a16.KernelConfig(kind="mma", block_m=128, block_n=128, num_warps=8, zfold=False, join=True),
            ),
            (
                300,
                w4a16.KernelConfig(kind="mma", block_m=64, block_n=256, num_warps=4, zfold=True, join=False),
            ),
            (700, w4a16.KernelConfig(kind="dequant_mm", block_n=64)),
            (16, t(block_m=16, block_n=128, split_k=6, num_stages=4, join=True)),
            (5, t(block_m=16, block_n=64, split_k=3, num_stages=3, join=False)),
            (61, t(block_m=64, block_n=128, split_k=2, num_stages=3, join=True)),
            (40, t(block_m=32, block_n=256, num_warps=8, split_k=4, num_stages=3, join=False)),
            (300, t(block_m=128, block_n=128, num_warps=8, num_stages=2, join=True)),
        ]
        for m, cfg in cfgs:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = torch.full(
                (m, n), float("nan"), device="cuda", dtype=dtype
            )  # poison: every element is written
            zeros = None if cfg.kind == "mma_t" else p["zeros"]
            w4a16.LAUNCHERS[cfg.kind](x, p["qweight"], p["sz"], zeros, cfg, scratch, out=y)
            err = _rel(y, _ref(x, p))
            assert err < tol, (k, n, m, cfg, err)
        assert int(scratch.abs().sum()) == 0


@pytest.mark.parametrize(
    "cfg",
    [
        {"kind": "mma", "block_m": 16, "block_n": 64, "split_k": 16},
        {"kind": "fma", "block_m": 8, "block_n": 128, "split_k": 16, "num_stages": 1},
    ],
)
def test_split_k_is_deterministic(make_packed, cfg):
    from lmkiln.kernels import w4a16

    p = make_packed(4096, 4096, 128, device="cuda")
    x = torch.randn(8, 4096, device="cuda", dtype=torch.float16)
    kc = w4a16.KernelConfig(**cfg)
    launch = w4a16.LAUNCHERS[kc.kind]
    ys = [launch(x, p["qweight"], p["sz"], p["zeros"], kc, w4a16.make_scratch("cuda")) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_fma_large_activations_stay_finite(make_packed):
    """fp16 partial sums hold ``x * (q - z) * s`` (the layer's real products), so activation outliers of
    |x| = 2000 (LLM "massive activations") neither overflow nor lose accuracy."""
    from lmkiln.kernels import w4a16

    p = make_packed(11008, 4096, 128, device="cuda")
    x = torch.randn(4, 11008, device="cuda")
    x[:, torch.randperm(11008, device="cuda")[:8]] = 2000.0
    x = x.half()
    cfg = w4a16.KernelConfig(kind="fma", block_m=4, block_n=128, split_k=8, num_stages=1, flush=4)
    y = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, w4a16.make_scratch("cuda"))
    assert _rel(y, _ref(x, p)) < 2e-3


def test_dispatch_every_m(make_packed):
    from lmkiln.kernels.dispatch import w4a16_matmul

    p = make_packed(4096, 4096, 128, device="cuda")
    for m in (1, 2, 3, 4, 8, 9, 16, 33, 64, 128, 256, 1024):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert _rel(w4a16_matmul(x, p["qweight"], p["sz"], p["zeros"]), _ref(x, p)) < 2e-3, m


def test_bad_inputs_on_gpu(make_packed):
    from lmkiln.kernels.dispatch import w4a16_matmul

    p = make_packed(4096, 4096, 128, device="cuda")
    with pytest.raises(QuantConfigError, match="contiguous"):
        w4a16_matmul(torch.randn(4096, 4, device="cuda").half().t(), p["qweight"], p["sz"])
    with pytest.raises(QuantConfigError, match="float16 or bfloat16"):
        w4a16_matmul(torch.randn(4, 4096, device="cuda"), p["qweight"], p["sz"])
    with pytest.raises(QuantConfigError, match="different devices"):
        w4a16_matmul(torch.randn(4, 4096).half().cuda(), p["qweight"].cpu(), p["sz"])


def test_cuda_graph_and_compile(make_packed):
    from lmkiln.layers import Int4Linear

    p = make_packed(4096, 4096, 128, device="cuda")
    lin = Int4Linear(p["qweight"], p["sz"], p["zeros"]).cuda()
    x = torch.randn(4, 4096, device="cuda", dtype=torch.float16)
    eager = lin(x)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x)  # warm-up (compile) outside capture
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = lin(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(out, lin(x))
    compiled = torch.compile(lin, fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))
    assert eager.shape == (4, 4096)


@pytest.mark.parametrize("m", [16, 300])
def test_silu_over_interleaved_gate_up_at_larger_m(make_packed, m):
    """M > 8 (mma / dequant + cuBLAS, no SiLU epilogue): the GEMM over the interleaved gate/up, then one
    ``silu_mul`` reading the 32-column blocks in place, gives what ``silu_mul`` over the plain weight's GEMM
    gives (the same columns, permuted)."""
    from lmkiln.kernels.dispatch import w4a16_matmul
    from lmkiln.kernels.fused import silu_mul

    from lmkiln.quant.pack import gate_up_interleave

    p = make_packed(4096, 22016, 128, seed=m, device="cuda")
    q, sz, zeros, _ = gate_up_interleave(p["qweight"], p["sz"], p["zeros"])
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    y = w4a16_matmul(x, q, sz, zeros, silu=True)
    gate, up = w4a16_matmul(x, p["qweight"], p["sz"], p["zeros"]).chunk(2, dim=-1)
    assert y.shape == (m, 11008)
    torch.testing.assert_close(y, silu_mul(gate, up), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_fma_silu_epilogue_equals_gemm_then_silu_mul(make_packed, m):
    """The packed-fp16 fma kernel with the SiLU epilogue over an interleaved gate/up (Llama-2-7B's 4096 x
    22016) writes exactly what the GEMM + ``kernels.fused.silu_mul`` write."""
    from lmkiln.kernels import w4a16
    from lmkiln.kernels.fused import silu_mul

    from lmkiln.quant.pack import gate_up_interleave

    p = make_packed(4096, 22016, 128, seed=m, device="cuda")
    q, sz, zeros, _ = gate_up_interleave(p["qweight"], p["sz"], p["zeros"])
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    cfg = w4a16.KernelConfig(kind="fma", block_m=1 << (m - 1).bit_length(), block_n=128, split_k=4)
    scratch = w4a16.make_scratch("cuda")
    y = w4a16.fma(x, q, sz, zeros, cfg, scratch, silu=True)
    gate, up = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch).chunk(2, dim=-1)
    assert torch.equal(y, silu_mul(gate, up))
