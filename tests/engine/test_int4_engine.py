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
