"""Server protocol on a scripted fake engine: responses, SSE framing, errors, auth, overload, aborts."""

from __future__ import annotations

import asyncio
import time

import pytest

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}]}


def run(coro):
    return asyncio.run(coro)


def test_chat_and_completion_responses(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            ch = body["choices"][0]
            assert ch["message"] == {"role": "assistant", "content": " w1 w2 w3 w4 w5"}
            assert ch["finish_reason"] == "stop"
            assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                                     "prompt_tokens_details": None}
            r = await c.post("/v1/completions", json={"model": "fake", "prompt": "a b c", "max_tokens": 3})
            body = r.json()
            assert body["object"] == "text_completion"
            ch = body["choices"][0]
            assert ch["text"] == " w1 w2 w3" and ch["finish_reason"] == "length"
            models = (await c.get("/v1/models")).json()
            assert models["data"][0]["id"] == "fake" and models["data"][0]["max_model_len"] == 64

    run(main())


def test_sampling_fields_reach_the_engine(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            req = {**CHAT, "temperature": 0.3, "top_p": 0.9, "top_k": -1, "min_p": 0.1, "seed": 7, "n": 2,
                   "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
                   "stop": "x", "max_completion_tokens": 4, "max_tokens": 9, "unknown_field": 1}
            r = await c.post("/v1/chat/completions", json=req)
            assert r.status_code == 200, r.text
        p0, p1 = (s[1] for s in fake.started)
        assert (p0.temperature, p0.top_p, p0.top_k, p0.min_p, p0.max_tokens) == (0.3, 0.9, 0, 0.1, 4)
        assert (p0.presence_penalty, p0.frequency_penalty, p0.repetition_penalty) == (0.5, -0.5, 1.1)
        assert p0.stop == ("x",) and (p0.seed, p1.seed) == (7, 8)

    run(main())


def test_stream_framing_roles_finish_and_usage(fake, make_client, sse) -> None:
    async def main():
        async with make_client(fake) as c:
            req = {**CHAT, "stream": True, "n": 2, "stream_options": {"include_usage": True}}
            r = await c.post("/v1/chat/completions", json=req)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            ev = sse(r.text)
            assert ev[-1] == "[DONE]" and ev[-2]["choices"] == []
            assert ev[-2]["usage"]["completion_tokens"] == 10
            chunks = ev[:-2]
            for i in range(2):
                mine = [ch["choices"][0] for ch in chunks if ch["choices"][0]["index"] == i]
                assert mine[0]["delta"]["role"] == "assistant"
                assert all(m["delta"].get("role") is None for m in mine[1:])
                assert [m["finish_reason"] for m in mine].count("stop") == 1 and mine[-1]["finish_reason"]
                assert "".join(m["delta"].get("content") or "" for m in mine) == " w1 w2 w3 w4 w5"
            r = await c.post("/v1/completions", json={"prompt": "a", "stream": True, "max_tokens": 2})
            ev = sse(r.text)
            assert ev[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in ev[:-1]) == " w1 w2"
            assert [e["choices"][0]["finish_reason"] for e in ev[:-1]] == [None, "length"]

    run(main())


def test_stop_string_is_excluded(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/v1/completions", json={"prompt": "a", "stop": [" w3"]})
            ch = r.json()["choices"][0]
            assert ch["text"] == " w1 w2" and ch["finish_reason"] == "stop"

    run(main())


def test_logprobs_shapes(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
            content = r.json()["choices"][0]["logprobs"]["content"]
            assert len(content) == 5 and content[0]["token"] == " w1" and len(content[0]["top_logprobs"]) == 2
            r = await c.post("/v1/completions", json={"prompt": "a", "logprobs": 1, "max_tokens": 2})
            lp = r.json()["choices"][0]["logprobs"]
            assert lp["tokens"] == [" w1", " w2"] and lp["text_offset"] == [0, 3]
            r = await c.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2})
            assert r.status_code == 400
            r = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21})
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"

    run(main())


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_validation_errors_are_400_envelopes(fake, make_client, patch, param) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, **patch})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error" and err["param"].startswith(param)

    run(main())


def test_error_envelopes(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 63})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 62})
            assert r.status_code == 200
            r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type":
                                                                                  "application/json"})
            assert r.status_code == 400 and "error" in r.json()
            r = await c.post("/v1/completions", json={"prompt": "<bad>", "stream": True})
            assert r.status_code == 400 and "bad token" in r.json()["error"]["message"]
            r = await c.get("/nope")
            assert r.status_code == 404 and "error" in r.json()

    run(main())


def test_api_keys(fake, make_client) -> None:
    async def main():
        async with make_client(fake, api_keys=["k1", "k2"]) as c:
            assert (await c.get("/health")).status_code == 200
            for path in ("/v1/models", "/metrics", "/docs"):
                r = await c.get(path)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k2"})
            assert r.status_code == 200
            assert (await c.get("/docs", headers={"Authorization": "Bearer k1"})).status_code == 200

    run(main())


def test_overload_is_429_then_503_with_retry_after(fake_engine_cls, make_client) -> None:
    eng = fake_engine_cls(reply_len=50, delay=0.01)

    async def main():
        async with make_client(eng, max_concurrent_requests=1, max_queued_requests=1,
                               queue_timeout_s=0.1) as c:
            first = asyncio.create_task(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 50}))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(c.post("/v1/completions", json={"prompt": "a"}))
            await asyncio.sleep(0.02)
            r = await c.post("/v1/completions", json={"prompt": "a"})
            assert r.status_code == 429 and "Retry-After" in r.headers
            r2 = await second
            assert r2.status_code == 503 and r2.headers["Retry-After"] == "1"
            assert (await first).status_code == 200
            assert (await c.post("/v1/completions", json={"prompt": "a"})).status_code == 200
            m = (await c.get("/metrics")).text
            assert "lmkiln_server_requests_active 0.0" in m

    run(main())


def test_failure_mid_stream_is_an_error_event(fake_engine_cls, make_client, sse) -> None:
    eng = fake_engine_cls(fail_at=2)

    async def main():
        async with make_client(eng) as c:
            r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            ev = sse(r.text)
            assert ev[-1] == "[DONE]" and ev[-2]["error"]["type"] == "server_error"
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-2]) == " w1 w2"

    run(main())


def test_client_leaving_a_stream_aborts_every_choice(fake_engine_cls, live_server) -> None:
    import httpx

    from lmkiln.server import build_app

    eng = fake_engine_cls(reply_len=1000, delay=0.005, session_len=4096)
    with live_server(build_app(eng, "fake")) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "stream": True, "n": 3, "max_tokens": 900}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if "w3" in line:
                    break
        for _ in range(200):
            if not eng.active and len(eng.aborted) == 3:
                break
            time.sleep(0.01)
        assert not eng.active and len(eng.aborted) == 3 and not eng.finished, (eng.started, eng.finished)


def test_abort_request_route_and_sessions(fake, make_client) -> None:
    async def main():
        async with make_client(fake) as c:
            r = await c.post("/abort_request", json={"request_id": "nope"})
            assert r.json() == {"success": False}
            r = await c.post("/v1/chat/completions", json={**CHAT, "session_id": "s1"})
            assert r.status_code == 200 and fake.started[-1][3] == "s1"
            assert fake.history_len("s1") == 7
            r = await c.post("/v1/chat/completions", json={**CHAT, "session_id": "s1", "max_tokens": 56})
            assert r.json()["error"]["code"] == "context_length_exceeded"
            r = await c.post("/v1/chat/completions", json={**CHAT, "session_id": "s1", "n": 2})
            assert r.status_code == 400
            r = await c.post("/abort_request", json={"session_id": "s1", "end_session": True})
            assert r.json() == {"success": True}
            assert (await c.post("/abort_request", json={})).status_code == 400

    run(main())


def test_metrics_are_per_app(fake, fake_engine_cls, make_client) -> None:
    async def main():
        async with make_client(fake) as a, make_client(fake_engine_cls()) as b:
            await a.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3})
            ma, mb = (await a.get("/metrics")).text, (await b.get("/metrics")).text
            assert "lmkiln_generation_tokens_total 3.0" in ma and "lmkiln_prompt_tokens_total 2.0" in ma
            assert "lmkiln_generation_tokens_total 0.0" in mb
            for name in ("lmkiln_time_to_first_token_seconds_count 1.0", "lmkiln_e2e_request_latency_seconds",
                         "lmkiln_inter_token_latency_seconds", "lmkiln_num_requests_running",
                         "lmkiln_kv_cache_usage_ratio", "lmkiln_num_preemptions_total"):
                assert name in ma, name

    run(main())
