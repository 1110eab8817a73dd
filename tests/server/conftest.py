"""A scripted fake engine (the server's :class:`EngineClient` shape) and HTTP helpers for the server tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lmkiln.engine import RequestOutput, SamplingParams
from lmkiln.engine.errors import RequestError
from lmkiln.engine.outputs import Logprobs
from lmkiln.server import EngineStats, build_app


class FakeEngine:
    """Every prompt token is a word; the reply is ``w1 w2 ... wK`` (one word per token), ``K = reply_len``
    unless ``max_tokens`` cuts it (``length``) or a stop string matches (``stop``, cut from the text).
    ``delay`` seconds pass between tokens; ``fail_at`` raises after that many tokens."""

    def __init__(self, reply_len: int = 5, delay: float = 0.0, session_len: int = 64,
                 fail_at: int | None = None) -> None:
        self.reply_len = reply_len
        self.delay = delay
        self.session_len = session_len
        self.fail_at = fail_at
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started: list[tuple[list[int], SamplingParams, str, str | None]] = []
        self.sessions: dict[str, int] = {}
        self.closed = False

    async def encode(self, prompt: Any, session_id: str | None = None) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            prompt = " ".join(m["content"] for m in prompt)
        if isinstance(prompt, str):
            if "<bad>" in prompt:
                raise RequestError("the prompt has a bad token")
            return [len(w) for w in prompt.split()] or [0]
        return list(prompt)

    def token_text(self, token_id: int) -> str:
        return f" w{token_id}"

    def history_len(self, session_id: str | None) -> int:
        return self.sessions.get(session_id, 0) if session_id else 0

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.active), used_blocks=len(self.active), num_blocks=16,
                           kv_cache_usage=len(self.active) / 16)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       session_id: str | None = None) -> AsyncIterator[RequestOutput]:
        self.started.append((prompt_ids, params, request_id, session_id))
        self.active.add(request_id)
        finished = False
        try:
            await asyncio.sleep(0)
            text, ids = "", []
            for i in range(1, self.reply_len + 1):
                if self.fail_at is not None and i > self.fail_at:
                    raise RuntimeError("scripted failure")
                if self.delay:
                    await asyncio.sleep(self.delay)
                ids.append(i)
                delta = self.token_text(i)
                text += delta
                reason = None
                for s in params.stop:
                    if s in text:
                        cut = text.index(s)
                        delta = delta[: max(0, len(delta) - (len(text) - cut))]
                        text, reason = text[:cut], "stop"
                        break
                if reason is None and i == params.max_tokens:
                    reason = "length"
                if reason is None and i == self.reply_len:
                    reason = "stop"
                finished = reason is not None
                lps = None
                if params.logprobs is not None:
                    lps = [Logprobs(t, -0.5, {t: -0.5, 99: -2.0}) for t in ids]
                yield RequestOutput(request_id, prompt_ids, list(ids), text, [i], delta, finished, reason,
                                    logprobs=lps, session_id=session_id)
                if finished:
                    self.finished.append(request_id)
                    if session_id:
                        self.sessions[session_id] = self.history_len(session_id) + len(prompt_ids) + i
                    return
        finally:
            self.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> bool:
        return request_id in self.active

    async def end_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    async def close(self) -> None:
        self.closed = True


@pytest.fixture()
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture()
def make_client() -> Callable[..., httpx.AsyncClient]:
    """``make_client(engine, **build_app_kwargs)``: an httpx client on the app (ASGI transport)."""

    def make(engine: Any, model_name: str = "fake", **kw: Any) -> httpx.AsyncClient:
        app = build_app(engine, model_name, **kw)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return make


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body: JSON objects, and the string ``[DONE]``; every frame must be ``data: ...\\n\\n``."""
    frames = body.split("\n\n")
    assert frames[-1] == "", f"stream does not end with a blank line: {body[-40:]!r}"
    events: list[Any] = []
    for f in frames[:-1]:
        assert f.startswith("data: "), f
        data = f[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture()
def sse() -> Callable[[str], list[Any]]:
    return sse_events


@pytest.fixture()
def fake_engine_cls() -> type[FakeEngine]:
    return FakeEngine


class LiveServer:
    """A uvicorn server on 127.0.0.1 (a free port) in a background thread; stopped on exit (bounded)."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread: Any = None

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop")


@pytest.fixture()
def live_server() -> type[LiveServer]:
    """``with live_server(app) as srv: ... srv.url``"""
    return LiveServer


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Real-engine tests run with one intra-op thread (as tests/engine does: faster on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
