"""Fused RMSNorm (+ residual), rotary and SiLU·mul kernels vs the model's torch code, under the Triton
interpreter (fp32 and fp16: the interpreter rounds fp32 -> bf16 by truncation, so bf16 is covered by
test_fused_gpu.py). Tolerances: fp16 rotary equals the torch ops bit for bit, RMSNorm within one ulp (the sum
of squares is reduced in another order), SiLU·mul within 3 ulps (numpy's exp vs torch's CPU exp: a silu
value near a rounding tie can round the other way); fp32 within a few ulps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkiln.errors import KernelInputError, ModelError
from lmkiln.models.llama import RMSNorm, rotate_half, use_fused_ops

DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def _interpreted() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter test; test_fused_gpu.py covers the kernels on CUDA")
    triton = pytest.importorskip("triton")
    from lmkiln.kernels import fused

    if not isinstance(fused._rmsnorm_kernel, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip("lmkiln.kernels.fused was imported before TRITON_INTERPRET=1 was set")


def _close(out: torch.Tensor, ref: torch.Tensor, ulps: int) -> None:
    """``out`` within ``ulps`` units in the last place of ``ref`` (relative to |ref|, floored at 1e-3)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    err = (out.double() - ref.double()).abs()
    bound = ulps * eps * ref.double().abs().clamp_min(1e-3)
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, {int((err > bound).sum())} elements"


def _rows(t: int, n: int, dtype: torch.dtype, seed: int, strided: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, n + 7 if strided else n, generator=g) * 3).to(dtype)
    return x[:, 3 : 3 + n] if strided else x  # a row-strided view when asked


def _norm(n: int, dtype: torch.dtype, seed: int = 1) -> RMSNorm:
    norm = RMSNorm(n, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "n"), [(1, 64), (3, 576), (17, 100)])
def test_rmsnorm_matches_model(dtype, t, n) -> None:
    from lmkiln.kernels.fused import add_rmsnorm, rmsnorm

    norm = _norm(n, dtype)
    x, r = _rows(t, n, dtype, 2, strided=True), _rows(t, n, dtype, 3)
    with torch.no_grad():
        ref_y = norm(x)
        ref_y2, ref_h = norm(x, r)
    ulps = 1 if dtype == torch.float16 else 4
    _close(rmsnorm(x, norm.weight, norm.eps), ref_y, ulps)
    y, h = add_rmsnorm(x, r, norm.weight, norm.eps)
    assert torch.equal(h, ref_h) and torch.equal(h, x + r)  # the residual add is exact, in the input dtype
    _close(y, ref_y2, ulps)
    assert y.is_contiguous() and h.is_contiguous()
    if dtype == torch.float16:  # different sum orders rarely change an fp16 result
        assert (y != ref_y2).float().mean() < 0.01


def test_add_rmsnorm_consumes_a_float32_accumulator() -> None:
    """``consume=True`` (the atomic split-K GEMV's output): ``x`` float32 is rounded to the residual's dtype
    first, so the results equal the plain kernel's on that rounded ``x``, and ``x`` is left zeroed. (fp16,
    the dtype of that GEMV; the interpreter truncates float32 -> bf16 casts where torch rounds.)"""
    from lmkiln.kernels.fused import add_rmsnorm

    dtype = torch.float16
    norm = _norm(576, dtype)
    acc, r = _rows(3, 576, torch.float32, 6), _rows(3, 576, dtype, 7)
    want_y, want_h = add_rmsnorm(acc.to(dtype), r, norm.weight, norm.eps)
    y, h = add_rmsnorm(acc, r, norm.weight, norm.eps, consume=True)
    assert y.dtype == h.dtype == dtype
    assert torch.equal(y, want_y) and torch.equal(h, want_h)
    assert not acc.any()  # zeroed for the GEMV's next launch
    with pytest.raises(KernelInputError, match="float32 split-K accumulator"):
        add_rmsnorm(r, r, norm.weight, norm.eps, consume=True)
    with pytest.raises(KernelInputError, match="float32 split-K accumulator"):
        add_rmsnorm(torch.zeros(3, 600)[:, :576], r, norm.weight, norm.eps, consume=True)  # row-strided


def test_rmsnorm_leading_dims_and_empty() -> None:
    from lmkiln.kernels.fused import add_rmsnorm, rmsnorm

    norm = _norm(64, torch.float32)
    x = _rows(6, 64, torch.float32, 4).view(2, 3, 64)
    with torch.no_grad():
        _close(rmsnorm(x, norm.weight, norm.eps), norm(x), 4)
    y, h = add_rmsnorm(x[:0], x[:0], norm.weight, norm.eps)
    assert y.shape == h.shape == (0, 3, 64)


def _rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``Attention.forward_paged``'s torch rotary for ``x [T, H, D]``, ``cos/sin [T, D]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _cos_sin(t: int, d: int, dtype: torch.dtype, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Real rotary tables for random positions (equal halves), as ``Rotary`` produces them."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (t, 1), generator=g).float()
    inv = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.cat((pos * inv, pos * inv), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("t", "hq", "hk", "d"), [(1, 4, 2, 64), (3, 3, 1, 32), (17, 4, 4, 96), (2, 70, 10, 128)]
)
def test_rotary_in_place_on_fused_qkv_views(dtype, t, hq, hk, d) -> None:
    from lmkiln.kernels.fused import rotary_

    g = torch.Generator().manual_seed(t * 100 + d)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)  # a fused qkv projection's output
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    cos, sin = _cos_sin(t, d, dtype)
    want_q, want_k, want_v = _rotary_ref(q, cos, sin), _rotary_ref(k, cos, sin), v.clone()
    rotary_(q, k, cos, sin)
    if dtype == torch.float16:
        assert torch.equal(q, want_q) and torch.equal(k, want_k)  # same fp32 ops, same roundings
    else:
        _close(q, want_q, 2)
        _close(k, want_k, 2)
    assert torch.equal(v, want_v)  # the neighbouring slice is untouched


def test_rotary_general_tables_and_contiguous_inputs() -> None:
    """Unequal cos/sin halves (any table) and plain contiguous q/k."""
    from lmkiln.kernels.fused import rotary_

    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(5, 2, 16, generator=g).half(), torch.randn(5, 1, 16, generator=g).half()
    cos, sin = torch.randn(5, 16, generator=g).half(), torch.randn(5, 16, generator=g).half()
    want_q, want_k = _rotary_ref(q, cos, sin), _rotary_ref(k, cos, sin)
    rotary_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    rotary_(q[:0], k[:0], cos[:0], sin[:0])  # no tokens: nothing to do


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "i"), [(1, 64), (3, 160), (17, 2500)])
def test_silu_mul_fused_and_two_inputs(dtype, t, i) -> None:
    from lmkiln.kernels.fused import silu_mul

    gate_up = _rows(t, 2 * i, dtype, 7)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, as MLP.forward takes them
    want = F.silu(gate) * up
    for out in (silu_mul(gate_up), silu_mul(gate, up)):
        assert out.is_contiguous()
        if dtype == torch.float16:  # numpy's and torch's CPU exp differ near rounding ties of silu
            _close(out, want, 3)
            assert (out != want).float().mean() < 0.01
        else:
            _close(out, want, 4)
    assert silu_mul(gate_up[:0]).shape == (0, i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "i", "b"), [(1, 64, 32), (3, 96, 32), (5, 4096, 32), (2, 24, 4)])
def test_silu_mul_interleaved_reads_the_blocks_in_place(dtype, t, i, b) -> None:
    # [g_0, u_0, g_1, u_1, ...] blocks of b columns (gate_up_interleave): the same numbers, bit for bit, as
    # the plain kernel on the de-interleaved gate and up (one launch over whole rows)
    from lmkiln.kernels.fused import silu_mul

    y = _rows(t, 2 * i, dtype, 11)
    blocks = y.unflatten(-1, (-1, 2, b))
    gate, up = blocks[:, :, 0].flatten(1), blocks[:, :, 1].flatten(1)
    out = silu_mul(y, interleave=b)
    assert out.shape == (t, i) and out.is_contiguous()
    assert torch.equal(out, silu_mul(gate, up))
    assert silu_mul(y[:0], interleave=b).shape == (0, i)


def test_launchers_reject_bad_inputs(monkeypatch) -> None:
    from lmkiln.kernels.fused import add_rmsnorm, rmsnorm, rotary_, silu_mul

    w = torch.ones(64)
    x = torch.randn(3, 64)
    with pytest.raises(KernelInputError, match="fp16, bf16 or fp32"):
        rmsnorm(x.double(), w, 1e-5)
    with pytest.raises(KernelInputError, match="weight has 32"):
        rmsnorm(x, torch.ones(32), 1e-5)
    with pytest.raises(KernelInputError, match="contiguous last dim"):
        rmsnorm(x.t(), torch.ones(3), 1e-5)
    with pytest.raises(KernelInputError, match="share one dtype"):
        add_rmsnorm(x, x.half(), w, 1e-5)
    with pytest.raises(KernelInputError, match="same shape"):
        add_rmsnorm(x, x[:2], w, 1e-5)
    q, k, cs = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 16)
    with pytest.raises(KernelInputError, match="even head_dim"):
        rotary_(q[..., :15], k[..., :15], cs[:, :15], cs[:, :15])
    with pytest.raises(KernelInputError, match="cos must be"):
        rotary_(q, k, cs[:1], cs)
    with pytest.raises(KernelInputError, match="k \\[2, 2, 8\\]"):
        rotary_(q, k[..., :8], cs, cs)
    with pytest.raises(KernelInputError, match="must have 3 dims"):
        rotary_(q[0], k, cs, cs)
    with pytest.raises(KernelInputError, match="must be even"):
        silu_mul(torch.randn(2, 7))
    with pytest.raises(KernelInputError, match="same shape"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(KernelInputError, match="multiple of 2 x interleave"):
        silu_mul(torch.randn(2, 96), interleave=32)
    with pytest.raises(KernelInputError, match="one gate_up tensor"):
        silu_mul(torch.randn(2, 64), torch.randn(2, 64), interleave=32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="CUDA device"):
        rmsnorm(x, w, 1e-5)


def test_use_fused_ops_switch(monkeypatch) -> None:
    monkeypatch.delenv("LMKILN_FUSED", raising=False)
    assert not use_fused_ops(torch.device("cpu"))
    assert use_fused_ops(torch.device("cuda"))
    monkeypatch.setenv("LMKILN_FUSED", "0")
    assert not use_fused_ops(torch.device("cuda"))
    monkeypatch.setenv("LMKILN_FUSED", "1")
    assert use_fused_ops(torch.device("cpu"))
    monkeypatch.setenv("LMKILN_FUSED", "yes")
    with pytest.raises(ModelError, match="LMKILN_FUSED"):
        use_fused_ops(torch.device("cpu"))


def test_silu_mul_over_interleaved_gate_up_blocks() -> None:
    """What ``dispatch.gate_up_silu`` launches for a GEMM over an interleaved gate/up (M > 8 or bf16): the
    [g, u] block pairs as two strided views, equal to the torch reference over the same blocks."""
    from lmkiln.kernels.fused import silu_mul
    from lmkiln.kernels.reference import gate_up_silu_ref

    y = _rows(5, 256, torch.float32, 11)
    pairs = y.view(-1, 64)
    out = silu_mul(pairs[:, :32], pairs[:, 32:]).reshape(5, 128)
    _close(out, gate_up_silu_ref(y), 4)
