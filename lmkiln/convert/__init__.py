"""Converters that turn other checkpoint formats into fp16 HF safetensors directories."""

from lmkiln.convert.gguf import convert_gguf, find_packaged_gguf, gguf_architecture, gguf_metadata

__all__ = ["convert_gguf", "find_packaged_gguf", "gguf_architecture", "gguf_metadata"]
