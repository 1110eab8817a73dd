"""Shutdown drains: once uvicorn is told to exit (what SIGTERM does), a stream in flight still finishes,
new connections are refused, and the server stops within the timeout."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from lmkiln.server.app import build_app


def test_in_flight_stream_finishes_after_shutdown_starts(fake_engine_cls) -> None:
    engine = fake_engine_cls(reply_len=20, delay=0.05)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "fake"), log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline:
                pytest.fail("the test server did not start")
            time.sleep(0.02)
        body = {"model": "fake", "prompt": "hello there", "stream": True, "max_tokens": 20}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not lines:
                    server.should_exit = True  # the SIGTERM handler's effect
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(c["choices"][0]["text"] for c in chunks).split() == [f"w{i}" for i in range(1, 21)]
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop after draining"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
        assert engine.aborted == []
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
