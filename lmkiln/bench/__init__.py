"""Benchmarks: kernel timings against baselines and the hardware floor."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from lmkiln.errors import LmkilnError


def report_main(produce: Callable[[], Any], fmt: Callable[[Any], str] | None) -> int:
    """The tail of a benchmark's ``main``: log at INFO, run ``produce``, print ``fmt(report)`` (nothing when
    ``fmt`` is None) and return 0; an lmkiln error (no GPU, bad settings) prints one ``error:`` line on
    stderr and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = produce()
    except LmkilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if fmt is not None:
        print(fmt(report))
    return 0
