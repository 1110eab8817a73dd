"""The CUDA C++ batch-1 GEMV (``kernels/cuda/w4a16_gemv.cu``, NVRTC) against the float64 reference and the
Triton ``fma`` kernel (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from lmkiln.errors import QuantConfigError

pytestmark = pytest.mark.gpu


def _exact(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    from lmkiln.kernels.reference import dequant_ref

    return (x.double() @ dequant_ref(p["qweight"], p["sz"], torch.float64)).float()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


OPTIONS = [
    {},
    {"unroll": 1, "pipe": False, "preload": False, "warps": 1},
    {"unroll": 4, "flush": 2, "pipe": False, "warps": 4},
    {"unroll": 2, "flush": 4, "preload": False, "warps": 8},
    {"tc": True, "unroll": 1, "pipe": False},
    {"tc": True, "unroll": 2, "warps": 4, "preload": False},
    {"tc": True, "unroll": 1, "pipe": False, "warps": 2, "ksplit": 4},
    {"unroll": 2, "warps": 1, "ksplit": 8},
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize(
    ("k", "n", "g", "split"),
    [
        (128, 32, 128, 1),  # one chunk, one warp of four in use
        (384, 96, 64, 2),  # N not a multiple of the CTA's 128 columns, odd chunk count
        (1280, 160, 32, 3),  # splits of 4, 4, 2 chunks (a short last split)
        (4096, 12288, 128, 8),  # the 7B fused qkv
        (11008, 4096, 128, 22),  # the 7B down
    ],
)
def test_atomic_matches_reference(make_packed, opts, k, n, g, split):
    from lmkiln.kernels import w4a16_cuda

    p = make_packed(k, n, g, seed=k + n, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.zeros(1, n, device="cuda", dtype=torch.float32)
    o = w4a16_cuda.CudaGemvOptions(**opts)
    w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], split, out=out, options=o)
    assert _rel(out, _exact(x, p)) < 2e-3
    # adds into what is there: a second launch doubles it
    first = out.clone()
    w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], split, out=out, options=o)
    torch.testing.assert_close(out, 2 * first, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("tc", "ksplit"), [(False, 1), (True, 1), (True, 4), (False, 2)])
@pytest.mark.parametrize(
    ("k", "n", "g", "split"),
    [(256, 128, 64, 2), (4096, 22016, 128, 4), (640, 192, 32, 5), (512, 256, 128, 1)],
)
def test_ordered_and_silu(make_packed, k, n, g, split, tc, ksplit):
    """fp16 output summed in split order (deterministic, bit-equal between runs), and the SiLU epilogue over
    an interleaved gate/up weight equal to the unfused GEMM + ``silu_mul``; the counters are left zero."""
    from lmkiln.kernels import w4a16_cuda
    from lmkiln.kernels.fused import silu_mul

    from lmkiln.quant.pack import gate_up_interleave

    p = make_packed(k, n, g, seed=n, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    scratch = torch.zeros(1024, dtype=torch.int32, device="cuda")
    o = w4a16_cuda.CudaGemvOptions(tc=tc, ksplit=ksplit)
    y = w4a16_cuda.gemv(
        x, p["qweight"], p["sz"], p["zeros"], split, reduce="ordered", scratch=scratch, options=o
    )
    assert y.dtype == torch.float16 and y.shape == (1, n)
    assert _rel(y, _exact(x, p)) < 2e-3
    again = w4a16_cuda.gemv(
        x, p["qweight"], p["sz"], p["zeros"], split, reduce="ordered", scratch=scratch, options=o
    )
    assert torch.equal(y, again)
    q, sz, zeros, _ = gate_up_interleave(p["qweight"], p["sz"], p["zeros"])
    h = w4a16_cuda.gemv(x, q, sz, zeros, split, reduce="ordered", silu=True, scratch=scratch, options=o)
    gate, up = y.chunk(2, dim=-1)
    assert h.shape == (1, n // 2)
    assert torch.equal(h, silu_mul(gate, up))
    assert int(scratch.abs().sum()) == 0


def test_matches_triton_fma_closely(make_packed):
    """Same dequantization and fp16 products as the Triton ``fma`` kernel (flush per word-row): the two sum in
    other orders, so they agree to float32 rounding of fp16 partials."""
    from lmkiln.kernels import w4a16, w4a16_cuda

    k, n = 4096, 4096
    p = make_packed(k, n, 128, seed=7, device="cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    cfg = w4a16.KernelConfig(kind="fma", block_m=1, block_n=64, num_warps=2, split_k=16, chunks=2, flush=1)
    a = torch.zeros(1, n, device="cuda")
    b = torch.zeros(1, n, device="cuda")
    w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, out=a, reduce="atomic")
    w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], 16, out=b)
    assert _rel(b, a) < 2e-4


def test_graph_capture_and_bad_inputs(make_packed):
    from lmkiln.kernels import w4a16_cuda

    p = make_packed(512, 256, 128, seed=3, device="cuda")
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    out = torch.zeros(1, 256, device="cuda")
    w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], 2, out=out)  # build outside the capture
    want = out.clone()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.zero_()
        with torch.cuda.graph(g, stream=s):
            out.zero_()
            w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], 2, out=out)
    torch.cuda.current_stream().wait_stream(s)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(QuantConfigError, match="exactly one row"):
        w4a16_cuda.gemv(x.repeat(2, 1), p["qweight"], p["sz"], p["zeros"], 2, out=out)
    with pytest.raises(QuantConfigError, match="zeroed float32"):
        w4a16_cuda.gemv(x, p["qweight"], p["sz"], p["zeros"], 2, out=out.half())
    with pytest.raises(QuantConfigError, match="fp16"):
        w4a16_cuda.gemv(x.bfloat16(), p["qweight"], p["sz"], p["zeros"], 2, out=out)
