"""InternLM2 checkpoints: read their config and convert their fused weights to our Llama layout on load.

InternLM2 is a Llama block with other names and two fusions: ``attention.wqkv`` holds, for each KV head,
its ``num_heads / num_kv_heads`` query heads, then its key head, then its value head (``[kv_heads, groups + 2,
head_dim, hidden]`` when viewed by rows); ``feed_forward.w1 / w3 / w2`` are gate / up / down. The rotary
embedding is Llama's (rotate-half), with ``rope_theta`` and optional ``linear`` / ``dynamic`` scaling.
:func:`hf_to_internlm2` is the inverse conversion (used to write test checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from lmkiln.errors import ModelError
from lmkiln.models.config import ModelConfig

ARCHITECTURE = "InternLM2ForCausalLM"

_RENAME = {  # InternLM2 name (inside a layer, or top level) -> HF Llama name
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "model.norm.weight": "model.norm.weight",
}


def is_internlm2(model_dir: str | Path) -> bool:
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return ARCHITECTURE in (raw.get("architectures") or [])


def internlm2_config(model_dir: str | Path) -> ModelConfig:
    """A :class:`ModelConfig` (with a Llama ``hf_config`` for the rotary tables) from InternLM2's config."""
    from transformers import LlamaConfig

    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        rope = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
        scaling = raw.get("rope_scaling") or None
        if scaling:
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind not in ("linear", "dynamic"):
                raise ModelError(f"{path}: rope_scaling type {kind!r} is not supported (linear, dynamic)")
            rope.update(rope_type=kind, factor=float(scaling["factor"]))
        hf = LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=raw.get("eos_token_id"),
            bos_token_id=raw.get("bos_token_id"),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"cannot read the InternLM2 config {path}: {e!r}") from e
    bias = bool(raw.get("bias", False))
    return ModelConfig(
        architecture=ARCHITECTURE,
        family="internlm2",
        hidden_size=hidden,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=hidden // heads,
        vocab_size=hf.vocab_size,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=hf.tie_word_embeddings,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        hf_config=hf,
    )


def internlm2_to_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama-named tensors from InternLM2-named ones (``wqkv`` split into q/k/v)."""
    groups, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 5:
            raise ModelError(f"unexpected tensor {name!r} in an InternLM2 checkpoint")
        base, inner, leaf = ".".join(parts[:3]), ".".join(parts[3:-1]), parts[-1]
        if inner == "attention.wqkv":
            rows = t.reshape(cfg.num_kv_heads, groups + 2, d, *t.shape[1:])
            q = rows[:, :groups].reshape(cfg.q_size, *t.shape[1:])
            k = rows[:, groups].reshape(cfg.kv_size, *t.shape[1:])
            v = rows[:, groups + 1].reshape(cfg.kv_size, *t.shape[1:])
            for p, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{base}.self_attn.{p}.{leaf}"] = x.contiguous()
        elif inner in _RENAME:
            out[f"{base}.{_RENAME[inner]}.{leaf}"] = t
        else:
            raise ModelError(f"unexpected tensor {name!r} in an InternLM2 checkpoint")
    return out


def hf_to_internlm2(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`internlm2_to_hf` (a tied ``lm_head`` is written out as ``output.weight``)."""
    groups, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    back_top = {v: k for k, v in _TOP.items()}
    back = {v: k for k, v in _RENAME.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in back_top:
            out[back_top[name]] = t
            continue
        parts = name.split(".")
        base, inner, leaf = ".".join(parts[:3]), ".".join(parts[3:-1]), parts[-1]
        if inner in ("self_attn.k_proj", "self_attn.v_proj"):
            continue
        if inner == "self_attn.q_proj":
            q = t.reshape(cfg.num_kv_heads, groups, d, *t.shape[1:])
            k = tensors[f"{base}.self_attn.k_proj.{leaf}"].reshape(cfg.num_kv_heads, 1, d, *t.shape[1:])
            v = tensors[f"{base}.self_attn.v_proj.{leaf}"].reshape(cfg.num_kv_heads, 1, d, *t.shape[1:])
            out[f"{base}.attention.wqkv.{leaf}"] = (
                torch.cat([q, k, v], 1).reshape(-1, *t.shape[1:]).contiguous()
            )
        else:
            out[f"{base}.{back[inner]}.{leaf}"] = t
    if "output.weight" not in out:
        out["output.weight"] = out["model.tok_embeddings.weight"].clone()
    return out


def read_internlm2_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an InternLM2 safetensors checkpoint (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
