"""The server on the real engine (SmolLM2-135M-Instruct, fp32 CPU, a few tokens per request): streaming
equals non-streaming at temperature 0, n > 1, stop strings, max_tokens, sessions, error envelopes, and
aborts (explicit or a dropped client) leave no running request and no used KV block behind."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lmkiln.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams, load_model
from lmkiln.server import build_app

MODEL = "smol"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]
SESSION_LEN = 256


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    return load_model(smollm2_dir, "cpu", "float32")


@pytest.fixture()
def make_engine(smollm2_dir, loaded, smollm2_tokenizer):
    def make() -> LLMEngine:
        cfg = EngineConfig(smollm2_dir, device="cpu", block_size=16, cache_max_entry_count=64,
                           session_len=SESSION_LEN, max_prefill_token_num=128)
        return LLMEngine(cfg, tokenizer=smollm2_tokenizer, loaded=loaded)

    return make


def client_for(engine: LLMEngine, **kw) -> tuple[httpx.AsyncClient, AsyncEngine]:
    aeng = AsyncEngine(engine)
    app = build_app(aeng, MODEL, **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60), aeng


def assert_engine_idle(engine: LLMEngine) -> None:
    bm, sch = engine.block_manager, engine.scheduler
    assert not sch.running and not sch.waiting and not sch.requests
    assert bm.num_free_blocks == bm.num_blocks


def test_stream_equals_non_stream_and_the_engine(make_engine, sse) -> None:
    engine = make_engine()
    want = engine.generate([MSGS], SamplingParams(temperature=0, max_tokens=8))[0]

    async def main():
        c, aeng = client_for(engine)
        async with c:
            body = {"model": MODEL, "messages": MSGS, "temperature": 0, "max_tokens": 8}
            r = (await c.post("/v1/chat/completions", json=body)).json()
            s = await c.post("/v1/chat/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}})
            cr = (await c.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "temperature": 0,
                                                        "max_tokens": 6, "stream": False})).json()
            cs = await c.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "temperature": 0,
                                                       "max_tokens": 6, "stream": True})
        await aeng.close()
        return r, sse(s.text), cr, sse(cs.text)

    r, ev, cr, cev = asyncio.run(main())
    text = r["choices"][0]["message"]["content"]
    assert text == want.text and want.finish_reason == r["choices"][0]["finish_reason"]
    assert r["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert r["usage"]["completion_tokens"] == len(want.token_ids)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-2]) == text
    assert [e["choices"][0]["finish_reason"] for e in ev[:-2] if e["choices"][0]["finish_reason"]] == [
        r["choices"][0]["finish_reason"]]
    assert ev[-2]["usage"] == r["usage"] and ev[-1] == "[DONE]"
    assert cr["choices"][0]["finish_reason"] == "length" and cr["usage"]["completion_tokens"] == 6
    assert "".join(e["choices"][0]["text"] for e in cev[:-1]) == cr["choices"][0]["text"]
    assert_engine_idle(engine)


def test_n_stop_and_max_tokens(make_engine) -> None:
    engine = make_engine()

    async def main():
        c, aeng = client_for(engine)
        async with c:
            base = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 10,
                    "ignore_eos": True}
            one = (await c.post("/v1/completions", json=base)).json()
            two = (await c.post("/v1/completions", json={**base, "n": 2})).json()
            text = one["choices"][0]["text"]
            stop = text[len(text) // 2: len(text) // 2 + 3]
            cut = (await c.post("/v1/completions", json={**base, "stop": [stop]})).json()
        await aeng.close()
        return one, two, cut, text, stop

    one, two, cut, text, stop = asyncio.run(main())
    assert one["choices"][0]["finish_reason"] == "length" and one["usage"]["completion_tokens"] == 10
    assert [ch["text"] for ch in two["choices"]] == [text, text] and two["usage"]["completion_tokens"] == 20
    assert [ch["index"] for ch in two["choices"]] == [0, 1]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.index(stop)] and stop not in cut["choices"][0]["text"]
    assert_engine_idle(engine)


def test_error_envelopes_on_the_real_engine(make_engine) -> None:
    engine = make_engine()

    async def main():
        c, aeng = client_for(engine, api_keys=["secret"])
        auth = {"Authorization": "Bearer secret"}
        async with c:
            r401 = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS})
            r404 = await c.post("/v1/chat/completions", json={"model": "x", "messages": MSGS}, headers=auth)
            r400 = await c.post("/v1/chat/completions", headers=auth,
                                json={"model": MODEL, "messages": MSGS, "max_tokens": SESSION_LEN})
            rbad = await c.post("/v1/completions", headers=auth, json={"prompt": [10**9]})
        await aeng.close()
        return r401, r404, r400, rbad

    r401, r404, r400, rbad = asyncio.run(main())
    assert r401.status_code == 401 and r401.json()["error"]["code"] == "invalid_api_key"
    assert r404.status_code == 404 and r404.json()["error"]["code"] == "model_not_found"
    assert r400.status_code == 400 and r400.json()["error"]["code"] == "context_length_exceeded"
    assert rbad.status_code == 400 and "vocabulary" in rbad.json()["error"]["message"]
    assert_engine_idle(engine)


def test_abort_request_frees_everything(make_engine) -> None:
    engine = make_engine()

    async def main():
        c, aeng = client_for(engine)
        async with c:
            body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "n": 2}
            task = asyncio.create_task(c.post("/v1/completions", json=body))
            server = c._transport.app.state.server  # type: ignore[attr-defined]
            while not server.inflight or not engine.scheduler.running:
                await asyncio.sleep(0.01)
            rid = next(iter(server.inflight))
            ok = (await c.post("/abort_request", json={"request_id": rid})).json()
            r = (await task).json()
            idle = await aeng.run(lambda e: (len(e.scheduler.running), len(e.scheduler.waiting),
                                             e.block_manager.num_free_blocks))
        await aeng.close()
        return ok, r, idle

    ok, r, idle = asyncio.run(main())
    assert ok == {"success": True}
    assert [ch["finish_reason"] for ch in r["choices"]] == ["abort", "abort"]
    assert idle == (0, 0, engine.block_manager.num_blocks)


def test_dropped_stream_client_frees_everything(make_engine, live_server) -> None:
    engine = make_engine()
    aeng = AsyncEngine(engine)
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 200, "ignore_eos": True, "n": 2, "stream": True}
    with live_server(build_app(aeng, MODEL)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for n, _ in enumerate(r.iter_lines()):
                if n > 6:
                    break
        deadline = time.monotonic() + 10
        m = ""
        while time.monotonic() < deadline:
            m = c.get("/metrics").text
            if "lmkiln_kv_cache_used_blocks 0.0" in m and "lmkiln_num_requests_running 0.0" in m:
                break
            time.sleep(0.05)
    assert "lmkiln_kv_cache_used_blocks 0.0" in m and "lmkiln_num_requests_waiting 0.0" in m
    assert "lmkiln_num_requests_running 0.0" in m
    assert_engine_idle(engine)


def test_session_turns_reuse_the_cache(make_engine) -> None:
    engine = make_engine()

    async def main():
        c, aeng = client_for(engine)
        async with c:
            body = {"model": MODEL, "temperature": 0, "max_tokens": 4, "session_id": "s"}
            r1 = (await c.post("/v1/chat/completions", json={**body, "messages": MSGS})).json()
            r2 = (await c.post("/v1/chat/completions", json={
                **body, "messages": [{"role": "user", "content": "And of Spain?"}]})).json()
            history = engine.scheduler.sessions.history("s")
            ended = (await c.post("/abort_request", json={"session_id": "s", "end_session": True})).json()
        await aeng.close()
        return r1, r2, history, ended

    r1, r2, history, ended = asyncio.run(main())
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r1["usage"]["total_tokens"] - 1
    assert r2["usage"]["prompt_tokens"] < r1["usage"]["prompt_tokens"]  # no system prompt again
    text = engine.tokenizer.decode(history)
    assert text.count("<|im_start|>system") == 1 and "And of Spain?" in text
    assert ended == {"success": True}
    assert_engine_idle(engine)


def test_openai_client(make_engine, live_server) -> None:
    openai = pytest.importorskip("openai")
    engine = make_engine()
    with live_server(build_app(AsyncEngine(engine), MODEL, api_keys=["k"])) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == [MODEL]
        full = client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6)
        parts, reasons = [], []
        for chunk in client.chat.completions.create(model=MODEL, messages=MSGS, temperature=0, max_tokens=6,
                                                    stream=True):
            for ch in chunk.choices:
                parts.append(ch.delta.content or "")
                reasons.append(ch.finish_reason)
        assert "".join(parts) == full.choices[0].message.content
        assert [x for x in reasons if x] == [full.choices[0].finish_reason]
        comp = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0)
        assert comp.choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=MSGS)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=MSGS, temperature=5)
    assert_engine_idle(engine)
