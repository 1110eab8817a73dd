"""Errors the engine raises for input a user can fix (all subclasses of :class:`lmkiln.errors.LmkilnError`).

They live here until the lead moves them into :mod:`lmkiln.errors`; the CLI already prints any
``LmkilnError`` without a traceback.
"""

from __future__ import annotations

from lmkiln.errors import LmkilnError


class EngineConfigError(LmkilnError):
    """Engine settings that cannot work (block size, budgets, device, dtype, quant policy)."""


class RequestError(LmkilnError):
    """A request the engine refuses: prompt longer than the session, bad sampling settings, unknown ids."""


class CacheMemoryError(LmkilnError):
    """Not enough memory for the weights plus the KV cache the settings ask for."""
