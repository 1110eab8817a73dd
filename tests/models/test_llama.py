"""Our model code against transformers' on checkpoints written by ``save_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch

from lmkiln.errors import ModelError
from lmkiln.models import CausalLM, Checkpoint, ModelConfig


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": None}),
    ],
)
def test_logits_match_transformers(tmp_path, make_tiny_model, family, overrides):
    path = make_tiny_model(tmp_path / family, family, **overrides)
    ids = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(1))
    ours = CausalLM.from_checkpoint(Checkpoint(path))
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(got, _hf_logits(path, ids), rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path, make_tiny_model):
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    ckpt = Checkpoint(tmp_path / "sharded")
    assert len(ckpt.weight_files) > 1
    ids = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        a = CausalLM.from_checkpoint(ckpt)(ids)
        b = CausalLM.from_checkpoint(Checkpoint(src))(ids)
    torch.testing.assert_close(a, b)


def test_config_facts(tiny_llama_dir):
    cfg = ModelConfig.from_dir(tiny_llama_dir)
    assert (cfg.family, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == ("llama", 2, 2, 32)
    assert cfg.qkv_bias is False


def test_missing_dir():
    with pytest.raises(ModelError, match="does not exist"):
        Checkpoint("/nonexistent/model")


def test_not_an_hf_dir(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        Checkpoint(tmp_path)


def test_unsupported_architecture_names_supported(tmp_path, tiny_llama_dir):
    d = tmp_path / "gpt2"
    d.mkdir()
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        Checkpoint(d)


def test_corrupt_safetensors(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelError, match="not a readable safetensors"):
        Checkpoint(d)


def test_no_weights(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="convert them to safetensors"):
        Checkpoint(d)


def test_shape_mismatch_is_reported(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "mismatch"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"does not match|implies"):
        CausalLM.from_checkpoint(Checkpoint(d))


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
)
def test_rotary_table_gathers_what_the_rotary_computes(tmp_path, make_tiny_model, rope):
    """The decode step's cos / sin gathered from the precomputed table equal computing them, bit for bit;
    a rope type whose frequencies depend on the positions seen (dynamic) builds no table and computes."""
    from lmkiln.models.llama import Rotary

    over = {} if rope is None else {"rope_scaling": rope}
    path = make_tiny_model(tmp_path / "rope", "llama", **over)
    rotary = Rotary(ModelConfig.from_dir(path))
    positions = torch.tensor([0, 5, 63, 127, 7])
    want = [t[0] for t in rotary(positions[None], torch.float16)]
    built = rotary.build_table(128, torch.float16, torch.device("cpu"))
    assert built == (rope is None or rope["rope_type"] != "dynamic")
    assert (rotary.table is not None) == built
    for got, ref in zip(rotary.at(positions, torch.float16), want, strict=True):
        assert got.shape == ref.shape and torch.equal(got, ref)
    # another dtype than the table's: computed
    assert torch.equal(rotary.at(positions, torch.float32)[0], rotary(positions[None], torch.float32)[0][0])
