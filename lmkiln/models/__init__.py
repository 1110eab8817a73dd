"""Model definitions and checkpoint loading (Llama family: Llama, Mistral, Qwen2)."""

from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from lmkiln.models.llama import CausalLM, DecoderLayer

__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "Checkpoint", "DecoderLayer", "ModelConfig"]
