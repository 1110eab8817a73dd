"""Packed dirs served through Int4Linear (fused q/k/v and gate/up) equal the dequantized model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmkiln.engine import EngineConfigError, LLMEngine, SamplingParams, load_model
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.loader import resolve_int4
from lmkiln.layers import Int4Linear

PROMPTS = [list(range(3, 24)), [7, 8], [*range(40, 53), 5]]


@pytest.fixture()
def packed_dir(tmp_path: Path, make_tiny_model) -> Path:
    """A packed qwen2 (q/k/v biases) whose hidden size 192 makes the packer pad K to 256."""
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.pack import pack_checkpoint
    from lmkiln.quant.rtn import QuantSpec

    tmp = tmp_path
    src = make_tiny_model(
        tmp / "qwen", "qwen2", hidden_size=192, num_attention_heads=3, num_key_value_heads=1
    )
    awq = rtn_quantize(src, tmp / "awq", QuantSpec(4, 64), progress=False)
    return pack_checkpoint(awq, tmp / "packed")


def test_int4_linears_match_dequantized(packed_dir: Path) -> None:
    on = load_model(packed_dir, int4="on")
    off = load_model(packed_dir, int4="off")
    assert on.int4 and not off.int4
    layer = on.model.model.layers[0]
    int4 = [m for m in on.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * on.config.num_layers  # 2 + 2 GEMMs a layer
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and not hasattr(layer.self_attn, "q_proj")
    assert layer.self_attn.qkv_proj.in_features == 192 and layer.self_attn.qkv_proj.packed_k == 256
    assert layer.self_attn.qkv_proj.bias is not None
    assert on.weight_bytes < off.weight_bytes
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(on.model(ids), off.model(ids), atol=1e-4, rtol=1e-4)

    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    kw = dict(block_size=4, cache_max_entry_count=64, max_prefill_token_num=8)
    got = LLMEngine(EngineConfig(packed_dir, **kw), loaded=on).generate(PROMPTS, p)
    ref = LLMEngine(EngineConfig(packed_dir, **kw), loaded=off).generate(PROMPTS, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref, strict=True):
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_int4_mode_resolution(monkeypatch, packed_dir: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_int4(None, "packed", cpu, torch.float32)
    assert resolve_int4("on", "packed", cpu, torch.float32)
    assert not resolve_int4("on", "hf_model", cpu, torch.float32)
    assert resolve_int4("auto", "packed", cuda, torch.float16)
    with pytest.raises(EngineConfigError, match="float16 or bfloat16"):
        resolve_int4("auto", "packed", cuda, torch.float32)
    monkeypatch.setenv("LMKILN_INT4", "on")
    assert load_model(packed_dir).int4
    monkeypatch.setenv("LMKILN_INT4", "yes")
    with pytest.raises(EngineConfigError, match="LMKILN_INT4"):
        load_model(packed_dir)


def test_fused_ops_interleave_gate_up_for_the_silu_epilogue(packed_dir: Path, monkeypatch) -> None:
    """With the fused ops (``LMKILN_FUSED=1``; the Triton interpreter on the CPU) the runner swaps each int4
    gate/up for an ``Int4GateUpSiLU``: no SiLU·mul launch, same greedy tokens as the torch ops."""
    triton = pytest.importorskip("triton")
    from lmkiln.kernels import fused

    from lmkiln.layers import Int4GateUpSiLU

    if torch.cuda.is_available() or not isinstance(
        fused._rmsnorm_kernel, triton.runtime.interpreter.InterpretedFunction
    ):
        pytest.skip("CPU-interpreter test (the GPU engine tests run the fused path on CUDA)")
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    kw = dict(block_size=4, cache_max_entry_count=64, max_prefill_token_num=8)
    outs, silu_calls = {}, []
    for flag in ("0", "1"):
        monkeypatch.setenv("LMKILN_FUSED", flag)
        loaded = load_model(packed_dir, int4="on")
        count = lambda *a, _f=fused.silu_mul, **k: silu_calls.append(1) or _f(*a, **k)  # noqa: E731
        monkeypatch.setattr(fused, "silu_mul", count)
        outs[flag] = LLMEngine(EngineConfig(packed_dir, **kw), loaded=loaded).generate(PROMPTS, p)
        swapped = [isinstance(layer.mlp.gate_up_proj, Int4GateUpSiLU) for layer in loaded.model.model.layers]
        assert swapped == [flag == "1"] * loaded.config.num_layers and not silu_calls
        monkeypatch.undo()
    assert [o.token_ids for o in outs["1"]] == [o.token_ids for o in outs["0"]]
    for a, b in zip(outs["1"], outs["0"], strict=True):
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-4)


def test_a_failed_forward_zeroes_the_atomic_accumulators(packed_dir: Path, monkeypatch) -> None:
    """A forward that fails between a GEMV and its consumer must not leave an accumulator dirty for the next
    step (``Int4Linear.matmul_acc``): the runner zeroes them all before re-raising."""
    eng = LLMEngine(EngineConfig(packed_dir, cache_max_entry_count=16, session_len=64))
    int4 = [m for m in eng.runner.model.modules() if isinstance(m, Int4Linear)]
    for m in int4:  # as a GEMV leaves its output pending for a consumer
        m.acc = torch.ones(1, m.out_features)

    def fail(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(eng.runner.model, "forward_paged", fail)
    with pytest.raises(RuntimeError, match="injected"):
        eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
    assert all(not m.acc.any() for m in int4)
