"""Model configuration read from an HF ``config.json`` (one home for architecture facts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkiln.errors import ModelError

# HF architecture name -> family. All share the Llama block; they differ in biases, GQA and tying.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hf_config: Any  # transformers.PretrainedConfig, used for rotary embedding parameters

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        cfg_path = model_dir / "config.json"
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} does not exist; pass an HF checkpoint directory")
        if not cfg_path.is_file():
            raise ModelError(
                f"{model_dir} has no config.json: it is not a Hugging Face checkpoint directory "
                "(for a .gguf file run `lmkiln convert gguf FILE OUT_DIR` first)"
            )
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read {cfg_path}: {e}; the file is unreadable or not valid JSON") from e
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # transformers raises many types for a bad config
            raise ModelError(f"transformers cannot parse {cfg_path}: {e}") from e
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            architecture=arch,
            family=family,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hf_config=hf,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
