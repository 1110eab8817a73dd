"""OpenAI-compatible serving of the lmkiln engine (:func:`build_app`) and the terminal chat."""

from __future__ import annotations

from lmkiln.server.app import build_app
from lmkiln.server.engine_client import AsyncEngineClient, EngineClient, EngineStats, as_client

__all__ = ["AsyncEngineClient", "EngineClient", "EngineStats", "as_client", "build_app"]
