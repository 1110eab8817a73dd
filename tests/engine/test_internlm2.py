"""InternLM2 conversion: config parsing (rope scaling) and an exact wqkv / w1 w3 w2 round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lmkiln.errors import ModelError
from lmkiln.models.internlm2 import hf_to_internlm2, internlm2_config, internlm2_to_hf, is_internlm2


def _config(tmp_path, **extra):
    raw = {
        "architectures": ["InternLM2ForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 11,
        "bias": True,
        **extra,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_config_and_rope_scaling(tmp_path) -> None:
    d = _config(tmp_path, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert is_internlm2(d)
    cfg = internlm2_config(d)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias, cfg.o_bias) == (4, 2, 8, True, True)
    assert cfg.hf_config.rope_parameters == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    _config(tmp_path, rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ModelError, match="yarn"):
        internlm2_config(tmp_path)


def test_wqkv_split_follows_the_grouped_layout(tmp_path) -> None:
    cfg = internlm2_config(_config(tmp_path))
    # rows of wqkv, per kv head h: q heads 2h and 2h+1, then k head h, then v head h (head_dim 8 rows each)
    wqkv = torch.arange(2 * 4 * 8, dtype=torch.float32)[:, None].repeat(1, 32)
    hf = internlm2_to_hf({"model.layers.0.attention.wqkv.weight": wqkv}, cfg)
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"][:, 0] for p in "qkv")
    assert q[8:16].tolist() == list(range(8, 16)) and q[16:24].tolist() == list(range(32, 40))
    assert k[:8].tolist() == list(range(16, 24)) and v[8:].tolist() == list(range(56, 64))


def test_round_trip_is_exact(tmp_path) -> None:
    cfg = internlm2_config(_config(tmp_path))
    g = torch.Generator().manual_seed(0)
    names = {
        "self_attn.q_proj": (32, 32),
        "self_attn.k_proj": (16, 32),
        "self_attn.v_proj": (16, 32),
        "self_attn.o_proj": (32, 32),
        "mlp.gate_proj": (64, 32),
        "mlp.up_proj": (64, 32),
        "mlp.down_proj": (32, 64),
    }
    hf = {f"model.layers.0.{n}.weight": torch.randn(s, generator=g) for n, s in names.items()}
    hf.update(
        {
            f"model.layers.0.self_attn.{p}_proj.bias": torch.randn(n, generator=g)
            for p, n in (("q", 32), ("k", 16), ("v", 16))
        }
    )
    hf.update(
        {
            "model.layers.0.input_layernorm.weight": torch.randn(32, generator=g),
            "model.layers.0.post_attention_layernorm.weight": torch.randn(32, generator=g),
            "model.embed_tokens.weight": torch.randn(11, 32, generator=g),
            "model.norm.weight": torch.randn(32, generator=g),
            "lm_head.weight": torch.randn(11, 32, generator=g),
        }
    )
    inter = hf_to_internlm2(hf, cfg)
    assert "model.layers.0.attention.wqkv.bias" in inter and "model.layers.0.feed_forward.w2.weight" in inter
    back = internlm2_to_hf(inter, cfg)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
