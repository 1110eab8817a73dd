"""Fuzz the server's OpenAPI schema (schemathesis) on the fake engine: no request may get a 5xx.

Bounded: ``MAX_EXAMPLES`` generated requests per operation, each with a 10 s timeout (a few seconds in
all on the fake engine). Hypothesis drives each operation's strategy directly (schemathesis'
``from_fixture`` pytest integration does not run under pytest 9).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from lmkiln.server import build_app

schemathesis = pytest.importorskip("schemathesis")

log = logging.getLogger(__name__)

MAX_EXAMPLES = 40


def fuzz(op: Any, seen: set[int]) -> None:
    """``MAX_EXAMPLES`` generated requests of one operation; a 5xx fails with a curl reproducer."""

    @given(case=op.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case: Any) -> None:
        response = case.call(timeout=10)
        seen.add(response.status_code)
        if response.status_code >= 500:
            pytest.fail(f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}\n"
                        f"reproduce: {case.as_curl_command()}")

    check()


def test_no_server_errors(fake_engine_cls) -> None:
    engine = fake_engine_cls(reply_len=4, session_len=256)
    app = build_app(engine, "fake", max_concurrent_requests=4, queue_timeout_s=5)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /abort_request"}
    statuses: dict[str, set[int]] = {}

    for op in operations:
        fuzz(op, statuses.setdefault(f"{op.method.upper()} {op.path}", set()))
    log.info("statuses per operation: %s", statuses)
    assert not engine.active  # nothing left running
    # the generator reached real answers, not only validation errors
    assert 200 in statuses["POST /v1/completions"] | statuses["POST /v1/chat/completions"]
