"""Shared fixtures: the real SmolLM2-135M-Instruct checkpoint (fp16 HF dir) and its tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run through the interpreter on machines without CUDA. TRITON_INTERPRET must be set before
# lmkiln.kernels.w4a16 is imported (triton.jit reads it when a kernel is defined): here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOURCES_MODEL = REPO_ROOT / "resources" / "models" / "SmolLM2-135M-Instruct"


def _is_converted_model(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not (manifest.is_file() and (path / "config.json").is_file()):
        return False
    try:
        return json.loads(manifest.read_text()).get("kind") == "hf_model"
    except (OSError, json.JSONDecodeError):
        return False


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh conversion of the packaged SmolLM2 GGUF, verified (reloaded, logits checked), made once; alone
    in its parent directory. Tests must not change it (tests/convert compares its bytes)."""
    from lmkiln.convert import convert_gguf, find_packaged_gguf
    from lmkiln.errors import ModelError

    try:
        gguf = find_packaged_gguf()
    except ModelError as e:
        pytest.skip(f"SmolLM2 GGUF not installed ({e})")
    return convert_gguf(gguf, tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct", verify=True)


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest) -> Path:
    """fp16 HF dir of SmolLM2-135M-Instruct: resources/models/... if built, else ``smollm2_conversion``."""
    if _is_converted_model(RESOURCES_MODEL):
        return RESOURCES_MODEL
    return request.getfixturevalue("smollm2_conversion")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    """The SmolLM2 tokenizer loaded from :func:`smollm2_dir`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with a reason, where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tiny_model(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """A small random HF checkpoint written with ``save_pretrained`` (the real HF loading path)."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    kw.update(overrides)
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[family]
    model = model_cls(config_cls(**kw)).eval()
    if family == "qwen2":  # random (not zero) q/k/v biases, so a dropped bias shows
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    _write_tiny_tokenizer(path, kw["vocab_size"])
    return path


def _write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``w0 .. wN`` (plus <unk>, <s>), saved as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (GQA 4/2, hidden 128) written by transformers."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def make_tiny_model():
    """``make_tiny_model(path, family="llama", **config_overrides) -> path`` (session-scoped: a function)."""
    return write_tiny_model


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread for the test: small ops gain nothing from more, and on a busy 2-core runner (the
    workflow builds run in the background, tests/workflow/conftest.py) OpenMP threads spinning against other
    processes made such tests 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def interpreted() -> None:
    """Skip unless the Triton interpreter runs the kernels on CPU tensors (CUDA machines: gpu tests)."""
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter test; the gpu-marked tests cover the kernels on this CUDA machine")
    pytest.importorskip("triton")
    from lmkiln.kernels import w4a16

    if not isinstance(w4a16._mma_kernel, __import__("triton").runtime.interpreter.InterpretedFunction):
        pytest.skip("lmkiln.kernels.w4a16 was imported before TRITON_INTERPRET=1 was set")


def random_packed(
    k: int, n: int, group_size: int, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Packed tensors of a random ``[K, N]`` int4 weight (codes, zeros and fp16 scales drawn uniformly)."""
    from lmkiln.quant.pack import pack_codes

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g, dtype=torch.uint8)
    scales = (torch.rand((k // group_size, n), generator=g) * 0.02 + 0.004).half()
    return {key: v.to(device) for key, v in pack_codes(codes, zeros, scales).items()}


@pytest.fixture()
def make_packed():
    """``make_packed(k, n, group_size, seed=0, device="cpu") -> {"qweight", "sz", "zeros"}``."""
    return random_packed
