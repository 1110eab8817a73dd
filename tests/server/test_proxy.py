"""The proxy (``lmkiln serve proxy``) in front of two fake-engine api_servers on loopback: registration,
routing, a dead node dropped with its request retried elsewhere, streaming passthrough, self-registration."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

from lmkiln.server import build_app
from lmkiln.server.launch import serve_registered
from lmkiln.server.proxy import build_proxy_app

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


def served_by(engines: list[Any]) -> list[int]:
    return [len(e.started) for e in engines]


def test_registration_routing_and_streaming(live_server, fake_engine_cls, sse) -> None:
    engines = [fake_engine_cls(reply_len=4), fake_engine_cls(reply_len=4)]
    with (live_server(build_app(engines[0], "fake")) as a, live_server(build_app(engines[1], "fake")) as b,
          live_server(build_proxy_app("random", health_interval_s=0, seed=0)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_available_node"
        assert c.post("/nodes/add", json={"url": a.url}).status_code == 200
        assert c.post("/nodes/add", json={"url": b.url + "/"}).status_code == 200
        bad = c.post("/nodes/add", json={"url": "http://127.0.0.1:9"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "node_unreachable"
        assert c.post("/nodes/add", json={"url": "not a url"}).status_code == 400
        assert set(c.get("/nodes/status").json()["nodes"]) == {a.url, b.url}

        for _ in range(12):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == " w1 w2 w3"
        assert sum(served_by(engines)) == 12 and min(served_by(engines)) >= 2  # random spreads them
        assert c.get("/v1/models").json()["data"][0]["id"] == "fake"
        r = c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # node's 4xx

        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text == " w1 w2 w3"

        status = c.get("/nodes/status").json()["nodes"]
        assert all(n["inflight"] == 0 for n in status.values())
        assert sum(n["served"] for n in status.values()) == 14  # 12 + models + stream; 4xx not counted
        assert c.post("/nodes/remove", json={"url": a.url}).status_code == 200
        assert c.post("/nodes/remove", json={"url": a.url}).status_code == 404
        before = served_by(engines)
        c.post("/v1/chat/completions", json=CHAT)
        assert served_by(engines) == [before[0], before[1] + 1]


@pytest.mark.parametrize("strategy", ["min_expected_latency", "min_observed_latency"])
def test_latency_strategies_prefer_the_fast_node(live_server, fake_engine_cls, strategy) -> None:
    fast, slow = fake_engine_cls(reply_len=3), fake_engine_cls(reply_len=3, delay=0.05)
    with (live_server(build_app(fast, "fake")) as a, live_server(build_app(slow, "fake")) as b,
          live_server(build_proxy_app(strategy, nodes=[a.url, b.url], health_interval_s=0)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        for _ in range(10):
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert len(slow.started) <= 2 < len(fast.started)  # each node is tried, then the fast one wins


def test_dead_node_dropped_and_request_retried(live_server, fake_engine_cls) -> None:
    alive = fake_engine_cls()
    dead_app = build_app(fake_engine_cls(), "fake")
    # min_expected_latency breaks ties by registration order: the first request goes to the dead node
    with (live_server(build_app(alive, "fake")) as a,
          live_server(build_proxy_app("min_expected_latency", health_interval_s=0)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        with live_server(dead_app) as d:
            dead_url = d.url
            c.post("/nodes/add", json={"url": dead_url}).raise_for_status()
            c.post("/nodes/add", json={"url": a.url}).raise_for_status()
        for stream in (True, False, True):
            r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert r.status_code == 200, r.text
        assert r.text.endswith("data: [DONE]\n\n")
        assert len(alive.started) == 3
        assert list(c.get("/nodes/status").json()["nodes"]) == [a.url]  # dropped on the refused connection


def test_health_checks_drop_a_dead_node(live_server, fake_engine_cls) -> None:
    with (live_server(build_app(fake_engine_cls(), "fake")) as a,
          live_server(build_proxy_app("random", health_interval_s=0.1, health_timeout_s=0.5,
                                      max_health_failures=2)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        with live_server(build_app(fake_engine_cls(), "fake")) as d:
            dead_url = d.url
            c.post("/nodes/add", json={"url": dead_url}).raise_for_status()
            c.post("/nodes/add", json={"url": a.url}).raise_for_status()
            time.sleep(0.3)  # healthy nodes stay
            assert set(c.get("/nodes/status").json()["nodes"]) == {a.url, dead_url}
        deadline = time.monotonic() + 5
        while dead_url in c.get("/nodes/status").json()["nodes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(c.get("/nodes/status").json()["nodes"]) == [a.url]


def test_node_5xx_is_retried_elsewhere(live_server, fake_engine_cls) -> None:
    broken, good = fake_engine_cls(fail_at=0), fake_engine_cls()
    with (live_server(build_app(broken, "fake")) as a, live_server(build_app(good, "fake")) as b,
          live_server(build_proxy_app("min_observed_latency", nodes=[a.url, b.url],
                                      health_interval_s=0)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert r.status_code == 200, r.text
    assert broken.started and len(good.started) == 2


def test_all_nodes_failing_gives_an_error_envelope(live_server, fake_engine_cls) -> None:
    broken = fake_engine_cls(fail_at=0)
    with live_server(build_app(broken, "fake")) as a, \
            live_server(build_proxy_app("random", nodes=[a.url], health_interval_s=0)) as proxy:
        r = httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "node_failed"


def test_client_leaving_a_proxied_stream_aborts_on_the_node(live_server, fake_engine_cls) -> None:
    engine = fake_engine_cls(reply_len=200, delay=0.02, session_len=512)
    with (live_server(build_app(engine, "fake")) as a,
          live_server(build_proxy_app("random", nodes=[a.url], health_interval_s=0)) as proxy,
          httpx.Client(base_url=proxy.url, timeout=10) as c):
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "max_tokens": 150, "stream": True}) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n >= 4:
                    break
        deadline = time.monotonic() + 5
        while (engine.active or not engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.active and engine.aborted and not engine.finished
        assert c.get("/nodes/status").json()["nodes"][a.url]["inflight"] == 0


def test_api_server_self_registers_and_leaves(live_server, fake_engine_cls) -> None:
    import socket

    import uvicorn

    with live_server(build_proxy_app("random", health_interval_s=0)) as proxy:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = uvicorn.Server(uvicorn.Config(build_app(fake_engine_cls(), "fake"), host="127.0.0.1",
                                               port=port, log_level="warning"))
        url = f"http://127.0.0.1:{port}"
        thread = threading.Thread(target=asyncio.run, args=(serve_registered(server, url, proxy.url),),
                                  daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while url not in httpx.get(f"{proxy.url}/nodes/status").json()["nodes"]:
                assert time.monotonic() < deadline and thread.is_alive(), "the node did not register"
                time.sleep(0.05)
            assert httpx.post(f"{proxy.url}/v1/chat/completions", json=CHAT).status_code == 200
        finally:
            server.should_exit = True
            thread.join(timeout=20)
        assert not thread.is_alive()
        assert httpx.get(f"{proxy.url}/nodes/status").json()["nodes"] == {}
