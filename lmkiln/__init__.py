"""lmkiln: turn an LLM checkpoint into a fast, served, 4-bit model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "LLMEngine", "SamplingParams", "__version__", "pipeline"]

if TYPE_CHECKING:
    from lmkiln.engine import AsyncEngine, LLMEngine, SamplingParams, pipeline


def __getattr__(name: str) -> Any:
    """The engine API, imported on first use (``import lmkiln`` stays light for the CLI)."""
    if name in ("AsyncEngine", "LLMEngine", "SamplingParams", "pipeline"):
        import lmkiln.engine

        return getattr(lmkiln.engine, name)
    raise AttributeError(f"module 'lmkiln' has no attribute {name!r}")
