"""Fused small-op kernels on a CUDA GPU at 7B shapes (hidden 4096, 32/8 heads of 128, intermediate 11008)
against the model's torch ops on the same GPU, CUDA-graph capture and replay, and the engine A/B
(``LMKILN_FUSED=1`` vs ``0``) on SmolLM2 with CUDA-graph decode.

Expected: rotary bit-identical in every dtype (same fp32 ops and roundings, FMA contraction off); SiLU·mul
within one ulp (expf and IEEE division, as torch; in practice identical); RMSNorm within two ulps in fp16/bf16
(its sum of squares is reduced in another order, then rounded twice) on at most 1% of the elements, fp32
within 4 ulps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkiln.models.llama import RMSNorm, rotate_half

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _ulp_check(out: torch.Tensor, ref: torch.Tensor, ulps: int, max_frac: float = 1.0) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    eps = torch.finfo(ref.dtype).eps
    err = (out.double() - ref.double()).abs()
    bound = ulps * eps * ref.double().abs().clamp_min(1e-3)
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, {int((err > bound).sum())} elements"
    frac = float((out != ref).double().mean())
    assert frac <= max_frac, f"{frac:.2%} of the elements differ"


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, device=DEV, generator=g) * scale).to(dtype)


def _norm(n: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(n, 1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(n, dtype=torch.float32, seed=1, scale=0.3) + 1)
    return norm


def _rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _cos_sin(t: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 8192, (t, 1), device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    inv = 500000.0 ** (-torch.arange(0, d, 2, device=DEV).float() / d)
    ang = torch.cat((pos * inv, pos * inv), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 16, 257, 2048])
def test_rmsnorm_7b(dtype, t) -> None:
    from lmkiln.kernels.fused import add_rmsnorm, rmsnorm

    n = 4096
    norm = _norm(n, dtype)
    x, r = _randn(t, n, dtype=dtype, seed=t, scale=4), _randn(t, n, dtype=dtype, seed=t + 1, scale=20)
    with torch.no_grad():
        ref_y, (ref_y2, ref_h) = norm(x), norm(x, r)
    half = dtype != torch.float32
    y, h = add_rmsnorm(x, r, norm.weight, norm.eps)
    assert torch.equal(h, ref_h)
    # a 1-ulp difference of the fp32 normalized value can become 2 ulps in fp16/bf16: it is rounded twice
    # (the cast back to the input dtype, then the product with the weight), as in the torch module
    _ulp_check(y, ref_y2, 2 if half else 4, 0.01 if half else 1.0)
    _ulp_check(rmsnorm(x, norm.weight, norm.eps), ref_y, 2 if half else 4, 0.01 if half else 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "hq", "hk"), [(1, 32, 8), (64, 32, 32), (777, 32, 8), (3, 64, 8)])
def test_rotary_7b_bit_identical(dtype, t, hq, hk) -> None:
    from lmkiln.kernels.fused import rotary_

    d = 128
    qkv = _randn(t, (hq + 2 * hk) * d, dtype=dtype, seed=t + hq, scale=3)
    q, k, v = (p.view(t, -1, d) for p in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    cos, sin = _cos_sin(t, d, dtype)
    want_q, want_k, want_v = _rotary_ref(q, cos, sin), _rotary_ref(k, cos, sin), v.clone()
    rotary_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 16, 300])
def test_silu_mul_7b(dtype, t) -> None:
    from lmkiln.kernels.fused import silu_mul

    i = 11008
    gate_up = _randn(t, 2 * i, dtype=dtype, seed=t, scale=3)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    _ulp_check(silu_mul(gate_up), want, 1, 0.001)
    _ulp_check(silu_mul(gate, up), want, 1, 0.001)
    sep_g, sep_u = gate.contiguous(), up.contiguous()
    _ulp_check(silu_mul(sep_g, sep_u), want, 1, 0.001)
    # the int4 engine's gate/up order (gate_up_interleave, 32-column blocks): the same numbers as above
    inter = torch.stack((sep_g.unflatten(-1, (-1, 32)), sep_u.unflatten(-1, (-1, 32))), dim=-2).flatten(-3)
    assert torch.equal(silu_mul(inter, interleave=32), silu_mul(sep_g, sep_u))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype) -> None:
    """A decoder layer's small ops captured in one graph; replays on new inputs equal eager calls."""
    from lmkiln.kernels.fused import add_rmsnorm, rmsnorm, rotary_, silu_mul

    t, n, hq, hk, d, i = 8, 4096, 32, 8, 128, 11008
    norm = _norm(n, dtype)
    x, r = torch.empty(t, n, device=DEV, dtype=dtype), torch.empty(t, n, device=DEV, dtype=dtype)
    qkv = torch.empty(t, (hq + 2 * hk) * d, device=DEV, dtype=dtype)
    gate_up = torch.empty(t, 2 * i, device=DEV, dtype=dtype)
    cos, sin = _cos_sin(t, d, dtype)

    def step():
        y0 = rmsnorm(x, norm.weight, norm.eps)
        y, h = add_rmsnorm(x, r, norm.weight, norm.eps)
        q, k, _ = (p.view(t, -1, d) for p in qkv.split([hq * d, hk * d, hk * d], dim=-1))
        rotary_(q, k, cos, sin)
        return y0, y, h, silu_mul(gate_up)

    def fill(seed):
        for j, buf in enumerate((x, r, qkv, gate_up)):
            buf.copy_(_randn(*buf.shape, dtype=dtype, seed=seed * 10 + j, scale=3))

    with torch.no_grad():
        fill(0)
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        for seed in (1, 2):
            fill(seed)
            qkv0 = qkv.clone()
            graph.replay()
            torch.cuda.synchronize()
            got = [s.clone() for s in static] + [qkv.clone()]
            fill(seed)
            assert torch.equal(qkv, qkv0)
            want = [*step(), qkv]
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b)
            assert not torch.equal(got[-1], qkv0)  # rotary did run in the replay


def test_engine_fused_ops_ab_on_smollm2(smollm2_dir, smollm2_tokenizer, monkeypatch) -> None:
    """CUDA-graph decode with the fused ops gives the torch ops' greedy tokens (64 tokens, 4 prompts)."""
    from lmkiln.engine import LLMEngine, SamplingParams
    from lmkiln.engine.config import EngineConfig

    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Water boils at"]
    prompts = [smollm2_tokenizer(s)["input_ids"] for s in texts]
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LMKILN_FUSED", flag)
        cfg = EngineConfig(smollm2_dir, device="cuda", dtype="float16", max_num_seqs=8, session_len=256,
                           cache_max_entry_count=0.2)
        eng = LLMEngine(cfg)
        assert eng.runner.decode_graphs is not None
        outs[flag] = [o.token_ids for o in eng.generate(prompts, greedy)]
        del eng
        torch.cuda.empty_cache()
    assert outs["1"] == outs["0"]
