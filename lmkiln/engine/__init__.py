"""lmkiln's inference engine: paged KV cache, continuous batching, chunked prefill, prefix caching,
sessions, sampling; an :class:`LLMEngine` (sync) and an :class:`AsyncEngine` (asyncio streaming).

Quick start::

    from lmkiln.engine import pipeline, SamplingParams
    pipe = pipeline("results/SmolLM2-135M-Instruct/awq")
    out = pipe(["Hello!"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].text)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmkiln.engine.async_engine import AsyncEngine, EngineDeadError
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import CacheMemoryError, EngineConfigError, RequestError
from lmkiln.engine.llm_engine import LLMEngine
from lmkiln.engine.loader import LoadedModel, artifact_kind, load_model
from lmkiln.engine.request_output import RequestOutput
from lmkiln.engine.sampling_params import SamplingParams


def pipeline(model_dir: str | Path, **engine_kwargs: Any) -> LLMEngine:
    """An :class:`LLMEngine` for an HF, AWQ or packed model directory; call it with prompts (text, token
    ids or chat messages) and optional :class:`SamplingParams`. ``engine_kwargs`` are
    :class:`EngineConfig` fields (``cache_max_entry_count``, ``session_len``, ``enable_prefix_caching``,
    ...)."""
    return LLMEngine(EngineConfig(model_dir=model_dir, **engine_kwargs))


__all__ = [
    "AsyncEngine",
    "CacheMemoryError",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "LLMEngine",
    "LoadedModel",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "artifact_kind",
    "load_model",
    "pipeline",
]
