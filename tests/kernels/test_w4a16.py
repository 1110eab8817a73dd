"""W4A16 kernels vs the pure-torch reference under the Triton interpreter (tiny and odd shapes)."""

from __future__ import annotations

import functools

import pytest
import torch
from lmkiln.kernels.reference import dequant_ref, w4a16_matmul_ref

from lmkiln.errors import QuantConfigError

pytestmark = pytest.mark.usefixtures("interpreted")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    assert torch.isfinite(y).all()
    return float((y - ref).norm() / ref.norm())


def _w4a16():
    from lmkiln.kernels import w4a16

    return w4a16


@pytest.mark.parametrize(
    ("k", "n", "g", "dtype", "split"),
    [(384, 64, 64, torch.float16, 1), (256, 96, 32, torch.bfloat16, 3), (128, 32, 128, torch.float16, 2)],
)
def test_gemv_matches_reference(make_packed, k, n, g, dtype, split):
    w4a16 = _w4a16()
    p = make_packed(k, n, g, seed=k + n)
    x = torch.randn(1, k).to(dtype)
    cfg = w4a16.KernelConfig(kind="gemv", block_n=32, split_k=split, num_stages=1)
    scratch = w4a16.make_scratch("cpu", 64)
    y = w4a16.gemv(x, p["qweight"], p["sz"], None, cfg, scratch)
    assert y.dtype == dtype and y.shape == (1, n)
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[dtype]
    assert int(scratch.abs().sum()) == 0  # split-K counters are left zeroed


@pytest.mark.parametrize(
    ("m", "k", "n", "g", "dtype", "zfold", "join", "split", "bm"),
    [
        (1, 256, 64, 32, torch.float16, True, True, 1, 16),
        (5, 384, 64, 64, torch.float16, True, False, 2, 16),
        (17, 128, 96, 128, torch.bfloat16, True, True, 1, 16),
        (3, 256, 32, 128, torch.bfloat16, True, False, 3, 16),
        (33, 256, 64, 64, torch.float16, False, True, 1, 32),
        (7, 128, 64, 32, torch.bfloat16, False, False, 2, 16),
        (20, 384, 32, 128, torch.float16, False, True, 1, 16),
    ],
)
def test_mma_matches_reference(make_packed, m, k, n, g, dtype, zfold, join, split, bm):
    w4a16 = _w4a16()
    p = make_packed(k, n, g, seed=m)
    x = torch.randn(m, k).to(dtype)
    cfg = w4a16.KernelConfig(kind="mma", block_m=bm, block_n=32, split_k=split, zfold=zfold, join=join)
    scratch = w4a16.make_scratch("cpu", 64)
    y = w4a16.mma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[dtype]
    assert int(scratch.abs().sum()) == 0


@pytest.mark.parametrize(
    ("m", "k", "n", "g", "dtype", "join", "split", "bm", "bn"),
    [
        (1, 256, 64, 32, torch.float16, True, 1, 16, 64),
        (5, 384, 128, 64, torch.float16, True, 2, 16, 64),
        (17, 128, 128, 128, torch.bfloat16, True, 1, 16, 128),
        (3, 256, 64, 128, torch.bfloat16, False, 3, 16, 64),
        (33, 256, 192, 64, torch.float16, False, 1, 32, 64),
        (40, 384, 64, 128, torch.float16, True, 2, 16, 64),
    ],
)
def test_mma_t_matches_reference(make_packed, m, k, n, g, dtype, join, split, bm, bn):
    """Swapped operands: odd M (masked activation columns), several row tiles, split-K with a short last
    split, every group size, JOIN on and off."""
    w4a16 = _w4a16()
    p = make_packed(k, n, g, seed=m + 7)
    x = torch.randn(m, k).to(dtype)
    cfg = w4a16.KernelConfig(kind="mma_t", block_m=bm, block_n=bn, split_k=split, join=join)
    scratch = w4a16.make_scratch("cpu", 64)
    y = w4a16.mma_t(x, p["qweight"], p["sz"], None, cfg, scratch)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[dtype]
    assert int(scratch.abs().sum()) == 0


def test_mma_t_rejects_bad_tiles(make_packed):
    w4a16 = _w4a16()
    p = make_packed(128, 96, 128, seed=1)
    x = torch.randn(4, 128, dtype=torch.float16)
    with pytest.raises(QuantConfigError, match="multiple of the tile"):
        w4a16.mma_t(x, p["qweight"], p["sz"], None, w4a16.KernelConfig(kind="mma_t", block_n=64))
    p = make_packed(128, 64, 128, seed=1)
    with pytest.raises(QuantConfigError, match="block_n must be a power of two >= 64"):
        w4a16.mma_t(x, p["qweight"], p["sz"], None, w4a16.KernelConfig(kind="mma_t", block_n=32))
    with pytest.raises(QuantConfigError, match="block_m must be a power of two >= 16"):
        w4a16.mma_t(x, p["qweight"], p["sz"], None, w4a16.KernelConfig(kind="mma_t", block_m=8, block_n=64))


@pytest.mark.parametrize(
    ("m", "k", "n", "g", "dtype", "bm", "bn", "warps", "split", "chunks", "flush"),
    [
        (1, 256, 64, 128, torch.float16, 1, 64, 2, 1, 1, 2),
        (3, 384, 64, 64, torch.float16, 4, 32, 1, 2, 2, 2),
        (5, 256, 96, 32, torch.bfloat16, 2, 32, 1, 3, 1, 1),
        (8, 512, 64, 128, torch.float16, 8, 64, 2, 3, 2, 4),
    ],
)
def test_fma_matches_reference(make_packed, m, k, n, g, dtype, bm, bn, warps, split, chunks, flush):
    """The CUDA-core kernel (interpreter: its float32 path; the packed-fp16 asm path runs in the gpu tests),
    including several row blocks (M > block_m), split-K tails and chunks past the end of a split."""
    w4a16 = _w4a16()
    p = make_packed(k, n, g, seed=m + k)
    x = torch.randn(m, k).to(dtype)
    cfg = w4a16.KernelConfig(
        kind="fma", block_m=bm, block_n=bn, num_warps=warps, split_k=split, chunks=chunks, flush=flush
    )
    scratch = w4a16.make_scratch("cpu", 64)
    y = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch)
    assert y.dtype == dtype and y.shape == (m, n)
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[dtype]
    assert int(scratch.abs().sum()) == 0


@pytest.mark.parametrize(("m", "split"), [(1, 3), (5, 2)])
def test_fma_atomic_reduce_adds_into_a_float32_output(make_packed, m, split):
    """``reduce="atomic"``: every split-K program adds its partial into the caller's zeroed float32 ``out``
    (no counters, no workspace); bad outputs and the SiLU epilogue are refused."""
    w4a16 = _w4a16()
    p = make_packed(384, 64, 64, seed=m)
    x = torch.randn(m, 384).to(torch.float16)
    cfg = w4a16.KernelConfig(kind="fma", block_m=4, block_n=32, num_warps=1, split_k=split, chunks=2, flush=1)
    out = torch.zeros(m, 64)
    scratch = w4a16.make_scratch("cpu", 64)
    assert w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch, out=out, reduce="atomic") is out
    assert _rel(out, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[torch.float16]
    ordered = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch, out=torch.zeros(m, 64))
    assert _rel(out, ordered) < 1e-6  # the same float32 partials, summed in another order
    assert not scratch.any()
    again = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, out=out, reduce="atomic")
    assert _rel(again, 2 * ordered) < 1e-6  # it adds: the caller must zero `out` between launches
    for bad in (None, torch.zeros(m, 64, dtype=torch.float16), torch.zeros(m, 32)):
        with pytest.raises(QuantConfigError, match="zeroed float32"):
            w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, out=bad, reduce="atomic")
    with pytest.raises(QuantConfigError, match="reduce="):
        w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, reduce="fast")


def test_fma_f16x2_dequant_identities():
    """The bit tricks of ``_deq4_f16x2`` (emulated exactly in float64): nibbles (t, t+4) of a word OR-ed into
    ``0x64006400`` (t = 0, 2) or masked in place (t = 1, 3) give ``q - z`` after one packed sub / fma with the
    ``(1024 + z)`` / ``-(64 + z)`` half2 constants that ``_zpairs`` builds."""
    import inspect

    w4a16 = _w4a16()
    src = inspect.getsource(w4a16._deq4_f16x2.fn) + inspect.getsource(w4a16._zpairs.fn)
    for const in ("0x000F000F, 0x64006400", "0x00F000F0, 0x64006400", "0x2C002C00", "0x6400", "0xD400"):
        assert const in src

    def halves(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = (u & 0xFFFF).to(torch.int16).view(torch.float16).double()
        hi = (u >> 16).to(torch.int16).view(torch.float16).double()
        return lo, hi

    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    z = torch.randint(0, 16, (4096,), generator=g, dtype=torch.int64)
    zs_lo, _ = halves(z + 0x6400)
    zf_lo, _ = halves(z * 16 + 0xD400)
    magic = 0x64006400
    parts = [
        (w & 0x000F000F) | magic,
        (w & 0x00F000F0) | magic,
        ((w >> 8) & 0x000F000F) | magic,
        ((w >> 8) & 0x00F000F0) | magic,
    ]
    for t, part in enumerate(parts):
        lo, hi = halves(part)
        if t % 2 == 0:
            lo, hi = lo - zs_lo, hi - zs_lo
        else:
            lo, hi = lo / 16 + zf_lo, hi / 16 + zf_lo
        q_lo = ((w >> (4 * t)) & 0xF).double()
        q_hi = ((w >> (4 * t + 16)) & 0xF).double()
        torch.testing.assert_close(lo, q_lo - z.double(), rtol=0, atol=0)
        torch.testing.assert_close(hi, q_hi - z.double(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_kernel(make_packed, dtype):
    w4a16 = _w4a16()
    p = make_packed(256, 64, 64)
    w = w4a16.dequant(p["qweight"], p["sz"], dtype, block_n=32)
    # exact in fp16; bf16 within one ulp (the interpreter's float32 -> bf16 cast truncates)
    rtol = 0.0 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(w, dequant_ref(p["qweight"], p["sz"], dtype), rtol=rtol, atol=0)


def test_dequant_mm(make_packed):
    w4a16 = _w4a16()
    p = make_packed(128, 64, 128)
    x = torch.randn(9, 128).half()
    y = w4a16.dequant_mm(x, p["qweight"], p["sz"], None, w4a16.KernelConfig(kind="dequant_mm", block_n=32))
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[torch.float16]


def test_bad_inputs_raise_clear_errors(make_packed):
    w4a16 = _w4a16()
    p = make_packed(256, 64, 64)
    cfg = w4a16.KernelConfig(kind="mma", block_m=16, block_n=32)
    x = torch.randn(4, 256).half()
    with pytest.raises(QuantConfigError, match="contiguous"):
        w4a16.mma(torch.randn(256, 4).half().t(), p["qweight"], p["sz"], p["zeros"], cfg)
    with pytest.raises(QuantConfigError, match="float16 or bfloat16"):
        w4a16.mma(x.float(), p["qweight"], p["sz"], p["zeros"], cfg)
    with pytest.raises(QuantConfigError, match="K=128 features"):
        w4a16.mma(x[:, :128].contiguous(), p["qweight"], p["sz"], p["zeros"], cfg)
    with pytest.raises(QuantConfigError, match="BLOCK_N=128"):
        w4a16.mma(x, p["qweight"], p["sz"], p["zeros"], w4a16.KernelConfig(kind="mma", block_n=128))
    with pytest.raises(QuantConfigError, match="gemv takes exactly one row"):
        w4a16.gemv(x, p["qweight"], p["sz"], None, w4a16.KernelConfig(kind="gemv", block_n=32))
    fma = functools.partial(w4a16.KernelConfig, kind="fma", block_m=4, block_n=32, num_warps=1)
    with pytest.raises(QuantConfigError, match="needs the packed `zeros`"):
        w4a16.fma(x, p["qweight"], p["sz"], None, fma())
    with pytest.raises(QuantConfigError, match="block_m must be 1, 2, 4 or 8"):
        w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], fma(block_m=16))
    with pytest.raises(QuantConfigError, match="sub-tile rows"):
        w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], fma(block_n=64, num_warps=3))
    with pytest.raises(QuantConfigError, match="flush=3 must divide"):
        w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], fma(flush=3))
    # K not a multiple of the layout chunk / of a supported group size
    bad_q = torch.zeros(2, 20, 32, dtype=torch.int32)  # K = 160
    with pytest.raises(QuantConfigError, match="multiple of 128"):
        w4a16.mma(torch.randn(1, 160).half(), bad_q, torch.zeros(5, 64, 2).half(), None, cfg)
    with pytest.raises(QuantConfigError, match="group size"):
        w4a16.mma(x, p["qweight"], torch.zeros(3, 64, 2).half(), None, cfg)  # 256 / 3 rows per group
    with pytest.raises(QuantConfigError, match="int32"):
        w4a16.mma(x, p["qweight"].view(torch.float32), p["sz"], p["zeros"], cfg)


def test_dispatch_cpu_uses_reference_and_validates(make_packed):
    from lmkiln.kernels.dispatch import heuristic_config, w4a16_matmul

    p = make_packed(256, 64, 64)
    x = torch.randn(2, 3, 256).half()
    y = w4a16_matmul(x, p["qweight"], p["sz"])
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y, w4a16_matmul_ref(x, p["qweight"], p["sz"]))
    with pytest.raises(QuantConfigError, match="contiguous"):
        w4a16_matmul(x.transpose(0, 1), p["qweight"], p["sz"])
    kinds = {}
    for m in (1, 2, 3, 16, 64, 256, 257, 4096):
        cfg = heuristic_config(m, 22016, 4096, 128)
        assert 22016 % cfg.block_n == 0 and cfg.split_k >= 1
        kinds[m] = cfg.kind
    tc = {2: "mma_t", 3: "mma_t", 16: "mma_t", 64: "mma_t", 256: "mma_t"}
    assert kinds == {1: "fma", **tc, 257: "dequant_mm", 4096: "dequant_mm"}
    assert heuristic_config(2, 4096 + 32, 4096, 128).kind == "fma"  # no 64-column tiles for mma_t
    assert heuristic_config(1, 4096, 4096, 128, fma=False).kind == "gemv"  # bf16
    assert heuristic_config(2, 4096, 4096, 128, fma=False).kind == "mma_t"
    assert heuristic_config(16, 4096 + 32, 4096, 128).kind == "mma"  # N not a multiple of mma_t's 64 columns
    t = heuristic_config(40, 4096, 4096, 128)
    assert (t.block_m, t.join) == (64, False) and heuristic_config(20, 4096, 4096, 128).block_m == 32


def test_dispatch_interpreter_path_matches(make_packed):
    from lmkiln.kernels.dispatch import heuristic_config, w4a16_matmul

    p = make_packed(128, 64, 128)
    x = torch.randn(3, 128).half()
    cfg = heuristic_config(3, 64, 128, 128)
    y = w4a16_matmul(x, p["qweight"], p["sz"], p["zeros"], config=cfg)
    assert _rel(y, w4a16_matmul_ref(x, p["qweight"], p["sz"])) < TOL[torch.float16]


def test_custom_op_cpu_and_fake(make_packed):
    from lmkiln.kernels.dispatch import w4a16_mm
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_packed(128, 64, 128)
    x = torch.randn(5, 128).half()
    empty = torch.zeros(0, dtype=torch.int32)
    torch.testing.assert_close(
        torch.ops.lmkiln.w4a16_mm(x, p["qweight"], p["sz"], p["zeros"], empty),
        w4a16_matmul_ref(x, p["qweight"], p["sz"]),
    )
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = w4a16_mm(
            fx, *(mode.from_tensor(p[k]) for k in ("qweight", "sz", "zeros")), mode.from_tensor(empty)
        )
        assert out.shape == (5, 64) and out.dtype == torch.float16


def test_tuned_table_lookup(tmp_path, monkeypatch):
    import json

    from lmkiln.kernels import dispatch

    table = {
        "device": "cpu",
        "entries": [
            {
                "n": 64,
                "k": 128,
                "group_size": 128,
                "dtype": "float16",
                "m_max": 1,
                "config": {"kind": "gemv", "block_n": 64, "split_k": 2},
            },
            {
                "n": 64,
                "k": 128,
                "group_size": 128,
                "dtype": "float16",
                "m_max": 64,
                "config": {"kind": "mma", "block_m": 32, "block_n": 64},
            },
        ],
    }
    (tmp_path / "cpu.json").write_text(json.dumps(table))
    monkeypatch.setattr(dispatch, "TUNED_DIR", tmp_path)
    dispatch.load_tuned.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert dispatch.choose_config(1, 64, 128, 128, torch.float16, cpu).kind == "gemv"
        assert dispatch.choose_config(7, 64, 128, 128, torch.bfloat16, cpu).block_m == 32
        assert dispatch.choose_config(4096, 64, 128, 128, torch.float16, cpu).block_m == 32  # largest entry
        assert dispatch.choose_config(2, 96, 128, 128, torch.float16, cpu).kind == "fma"  # heuristic
        assert dispatch.choose_config(9, 128, 128, 128, torch.float16, cpu).kind == "mma_t"
        assert dispatch.choose_config(9, 96, 128, 128, torch.float16, cpu).kind == "mma"  # N % 64 != 0
    finally:
        dispatch.load_tuned.cache_clear()


@pytest.mark.parametrize(
    ("m", "k", "n", "dtype", "bm", "bn", "warps", "split"),
    [
        (1, 256, 128, torch.float16, 1, 64, 2, 2),
        (3, 384, 192, torch.float16, 4, 64, 2, 3),
        (6, 256, 256, torch.bfloat16, 8, 128, 4, 1),
    ],
)
def test_fma_silu_epilogue_matches_unfused(make_packed, m, k, n, dtype, bm, bn, warps, split):
    """``fma(..., silu=True)`` over an interleaved gate/up weight writes ``silu(gate) * up`` of the original
    (concatenated) weight's GEMM: the same numbers as the GEMM + ``kernels.fused.silu_mul`` (exactly: both
    round the GEMM output, the SiLU and the product to the dtype), and close to the float reference."""
    from lmkiln.kernels.fused import silu_mul

    from lmkiln.quant.pack import gate_up_interleave

    w4a16 = _w4a16()
    p = make_packed(k, n, 64, seed=m + n)
    q, sz, zeros, _ = gate_up_interleave(p["qweight"], p["sz"], p["zeros"])
    x = torch.randn(m, k).to(dtype)
    cfg = w4a16.KernelConfig(kind="fma", block_m=bm, block_n=bn, num_warps=warps, split_k=split)
    scratch = w4a16.make_scratch("cpu", 64)
    y = w4a16.fma(x, q, sz, zeros, cfg, scratch, silu=True)
    assert y.shape == (m, n // 2) and y.dtype == dtype and int(scratch.abs().sum()) == 0
    gate, up = w4a16.fma(x, p["qweight"], p["sz"], p["zeros"], cfg, scratch).chunk(2, dim=-1)
    assert torch.equal(y, silu_mul(gate, up))
    ref = w4a16_matmul_ref(x.float(), p["qweight"], p["sz"])
    want = torch.nn.functional.silu(ref[:, : n // 2]) * ref[:, n // 2 :]
    assert _rel(y, want) < TOL[dtype] * 2


def test_silu_epilogue_needs_whole_gate_up_pairs(make_packed) -> None:
    w4a16 = _w4a16()
    p = make_packed(128, 64, 64)
    cfg = w4a16.KernelConfig(kind="fma", block_m=1, block_n=32, num_warps=1)
    with pytest.raises(QuantConfigError, match="multiple of 64"):
        w4a16.fma(torch.randn(1, 128).half(), p["qweight"], p["sz"], p["zeros"], cfg, silu=True)
