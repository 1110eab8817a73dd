"""The OpenAI-compatible HTTP server: a thin async shell around an engine (:func:`build_app`).

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/abort_request``, ``/health``,
``/metrics``, ``/docs``. Streaming answers are server-sent events (``data: {json}``, ending with
``data: [DONE]``); leaving a stream (a dropped client included) aborts its engine requests, which
frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from lmkiln.engine import RequestOutput, SamplingParams
from lmkiln.engine.errors import RequestError
from lmkiln.server import protocol as P
from lmkiln.server.engine_client import EngineClient, as_client
from lmkiln.server.errors import (
    APIError,
    bad_request,
    context_length_exceeded,
    install_error_handlers,
    internal,
    model_not_found,
    overloaded,
    unauthorized,
)
from lmkiln.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
OPEN_PATHS = frozenset({"/health"})


def _stream_error(e: Exception, kind: str, rid: str) -> str:
    """The SSE error event for a stream that failed after its headers were sent (logged with traceback)."""
    log.exception("%s stream %s failed", kind, rid)
    if isinstance(e, APIError):
        return e.sse()
    return (bad_request(str(e)) if isinstance(e, RequestError) else internal(e)).sse()


# ------------------------------------------------------------------------------------------- admission


class Admission:
    """At most ``max_concurrent`` requests generate at once; up to ``max_queued`` more wait (a full queue
    is a 429), and one that waits longer than ``queue_timeout_s`` gets a 503. Both carry Retry-After."""

    def __init__(self, max_concurrent: int | None, max_queued: int | None, queue_timeout_s: float) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued if max_queued is not None else (max_concurrent or 0)
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self.queued = 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self) -> None:
        if self.max_concurrent is None:
            self.active += 1
            return
        if self._cond is None:
            self._cond = asyncio.Condition()
        if self.active < self.max_concurrent and self.queued == 0:
            self.active += 1
            return
        if self.active >= self.max_concurrent and self.queued >= self.max_queued:
            raise overloaded(429, 1, f"{self.active} requests running and {self.queued} queued")
        self.queued += 1
        try:
            async with self._cond:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self.active < self.max_concurrent),  # type: ignore[operator]
                    self.queue_timeout_s,
                )
                self.active += 1
        except TimeoutError:
            raise overloaded(503, max(1, round(self.queue_timeout_s)),
                             f"waited {self.queue_timeout_s:.0f} s in the queue") from None
        finally:
            self.queued -= 1

    async def release(self) -> None:
        self.active -= 1
        if self._cond is not None:
            async with self._cond:
                self._cond.notify()


# --------------------------------------------------------------------------------------------- the runs


@dataclass
class _Choice:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    started: float
    last: float | None = None
    logprobs_sent: int = 0
    final: RequestOutput | None = None


@dataclass
class _Run:
    """The engine requests of one HTTP request (n choices x prompts), merged into one stream of outputs."""

    client: EngineClient
    choices: list[_Choice]
    session_id: str | None
    metrics: ServerMetrics
    on_close: Callable[[], Awaitable[None]]
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task] = field(default_factory=list)
    remaining: int = 0
    closed: bool = False

    def start(self) -> None:
        self.remaining = len(self.choices)
        for c in self.choices:
            self.tasks.append(asyncio.create_task(self._pump(c), name=f"lmkiln-{c.request_id}"))

    async def _pump(self, c: _Choice) -> None:
        try:
            async for out in self.client.generate(c.prompt_ids, c.params, c.request_id, self.session_id):
                self.queue.put_nowait((c.index, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which answers with an error
            self.queue.put_nowait((c.index, e))

    async def next(self) -> tuple[_Choice, RequestOutput] | None:
        """The next output of any choice; None once every choice finished."""
        if self.remaining == 0:
            return None
        idx, out = await self.queue.get()
        if isinstance(out, BaseException):
            raise out
        c = self.choices[idx]
        now = time.perf_counter()
        if out.delta_token_ids:
            (self.metrics.ttft if c.last is None else self.metrics.itl).observe(now - (c.last or c.started))
            c.last = now
            self.metrics.generation_tokens.inc(len(out.delta_token_ids))
        if out.finished:
            c.final = out
            self.remaining -= 1
            self.metrics.e2e.observe(now - c.started)
            self.metrics.requests.labels(out.finish_reason or "unknown").inc()
        return c, out

    async def aclose(self) -> None:
        """Abort what still runs (freeing its KV blocks) and give back the admission slot; idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            await self.on_close()


# ------------------------------------------------------------------------------------------------ auth


class _APIKeyMiddleware:
    """401 (OpenAI envelope) without ``Authorization: Bearer <one of the keys>``, except on open paths."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = scheme.lower() == b"bearer" and any(secrets.compare_digest(token.strip(), k) for k in self.keys)
        if not ok:
            await unauthorized().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------- app


class _Server:
    def __init__(self, client: EngineClient, model_name: str, admission: Admission) -> None:
        self.client = client
        self.model_name = model_name
        self.admission = admission
        self.metrics = ServerMetrics(client.stats, lambda: admission.queued, lambda: admission.active)
        self.inflight: dict[str, list[str]] = {}  # response id -> engine request ids

    # ------------------------------------------------------------------------------------ helpers

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model, self.model_name)

    def sampling(self, req: P.ChatCompletionRequest | P.CompletionRequest, max_tokens: int, i: int
                 ) -> SamplingParams:
        seed = None if req.seed is None else req.seed + i  # n choices with one seed must still differ
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=max(req.top_k, 0), min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=seed,
                stop=tuple(req.stop_list), stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos, logprobs=req.num_logprobs,
                skip_special_tokens=req.skip_special_tokens,
            )
        except RequestError as e:
            raise bad_request(str(e), code="invalid_value") from e

    def max_tokens(self, req: P.ChatCompletionRequest | P.CompletionRequest, prompt_len: int) -> int:
        limit = self.client.session_len
        used = prompt_len + self.client.history_len(req.session_id)
        asked = req.max_new_tokens
        if asked is None:
            asked = limit - used
        if asked < 1 or used + asked > limit:
            raise context_length_exceeded(used, max(asked, 1), limit)
        return asked

    async def encode(self, prompt: Any, session_id: str | None) -> list[int]:
        try:
            return await self.client.encode(prompt, session_id)
        except RequestError as e:
            raise bad_request(str(e), param="prompt") from e

    async def start_run(self, prefix: str, jobs: list[tuple[list[int], SamplingParams]],
                        session_id: str | None) -> tuple[str, _Run]:
        if session_id is not None and len(jobs) > 1:
            raise bad_request("a session request must have n=1 and one prompt", param="n")
        try:
            await self.admission.acquire()
        except APIError as e:
            self.metrics.rejected.labels(str(e.status)).inc()
            raise
        rid = P.random_id(prefix)
        t0 = time.perf_counter()
        choices = [_Choice(i, f"{rid}-{i}", ids, sp, t0) for i, (ids, sp) in enumerate(jobs)]
        self.inflight[rid] = [c.request_id for c in choices]
        for ids in {id(j[0]): j[0] for j in jobs}.values():
            self.metrics.prompt_tokens.inc(len(ids))

        async def on_close() -> None:
            self.inflight.pop(rid, None)
            await self.admission.release()

        run = _Run(self.client, choices, session_id, self.metrics, on_close)
        run.start()
        return rid, run

    def usage(self, run: _Run, prompt_tokens: int) -> P.Usage:
        completion = sum(len(c.final.token_ids) for c in run.choices if c.final is not None)
        cached = sum(c.final.num_cached_tokens for c in run.choices[:1] if c.final is not None)
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion,
                       prompt_tokens_details={"cached_tokens": cached} if cached else None)

    def new_logprobs(self, c: _Choice, out: RequestOutput) -> list[Any]:
        lps = out.logprobs or []
        new = lps[c.logprobs_sent:]
        c.logprobs_sent = len(lps)
        return new

    def chat_logprobs(self, lps: list[Any]) -> P.ChatLogprobs:
        def top(tid: int, lp: float) -> P.TopLogprob:
            t = self.client.token_text(tid)
            return P.TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))

        return P.ChatLogprobs(content=[
            P.TokenLogprob(**top(x.token_id, x.logprob).model_dump(),
                           top_logprobs=[top(t, v) for t, v in x.top.items()])
            for x in lps
        ])

    def completion_logprobs(self, lps: list[Any], offset: int) -> P.CompletionLogprobs:
        res = P.CompletionLogprobs()
        for x in lps:
            t = self.client.token_text(x.token_id)
            res.tokens.append(t)
            res.token_logprobs.append(x.logprob)
            res.top_logprobs.append({self.client.token_text(k): v for k, v in x.top.items()})
            res.text_offset.append(offset)
            offset += len(t)
        return res

    async def collect(self, run: _Run, request: Request) -> None:
        """Run a non-streaming request to its end; a client that goes away aborts it."""
        async def consume() -> None:
            while await run.next() is not None:
                pass

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return
                if await request.is_disconnected():
                    log.info("client went away; aborting %s", [c.request_id for c in run.choices])
                    raise APIError(499, "client closed the request", "invalid_request_error")
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await run.aclose()

    async def first(self, run: _Run) -> tuple[_Choice, RequestOutput] | None:
        """Wait for the first output before answering a stream, so a refused request is a plain 400."""
        try:
            return await run.next()
        except BaseException as e:
            await run.aclose()
            if isinstance(e, RequestError):
                raise bad_request(str(e)) from e
            if isinstance(e, Exception):
                raise internal(e) from e
            raise

    def stream_response(self, body: AsyncIterator[str], run: _Run) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(run.aclose))

    # ------------------------------------------------------------------------------------- routes

    async def finals(self, run: Any, request: Request) -> list[tuple[int, Any]]:
        """Run a non-streaming request to the end: ``(choice index, final output)`` per choice."""
        try:
            await self.collect(run, request)
        except RequestError as e:
            raise bad_request(str(e)) from e
        out = []
        for c in run.choices:
            if c.final is None:
                raise internal(RuntimeError(f"choice {c.index} did not finish"))
            out.append((c.index, c.final))
        return out

    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        messages = [m.as_template_message() for m in req.messages]
        ids = await self.encode(messages, req.session_id)
        max_tokens = self.max_tokens(req, len(ids))
        jobs = [(ids, self.sampling(req, max_tokens, i)) for i in range(req.n)]
        rid, run = await self.start_run("chatcmpl", jobs, req.session_id)
        if not req.stream:
            choices = []
            for index, out in await self.finals(run, request):
                lp = self.chat_logprobs(out.logprobs or []) if req.logprobs else None
                choices.append(P.ChatChoice(index=index, message=P.AssistantMessage(content=out.text),
                                            logprobs=lp, finish_reason=out.finish_reason))
            return JSONResponse(P.ChatCompletionResponse(
                id=rid, model=self.model_name, choices=choices, usage=self.usage(run, len(ids))
            ).model_dump(exclude_none=False))
        first = await self.first(run)
        return self.stream_response(self._chat_stream(req, rid, run, first, len(ids)), run)

    async def _chat_stream(self, req: P.ChatCompletionRequest, rid: str, run: _Run,
                           item: tuple[_Choice, RequestOutput] | None, prompt_tokens: int
                           ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[P.ChatStreamChoice], usage: P.Usage | None = None) -> str:
            c = P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices,
                                      usage=usage)
            return f"data: {c.model_dump_json()}\n\n"

        try:
            for c in run.choices:
                yield chunk([P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(role="assistant",
                                                                                    content=""))])
            while item is not None:
                c, out = item
                lps = self.new_logprobs(c, out) if req.logprobs else []
                if out.delta_text or lps or out.finished:
                    yield chunk([P.ChatStreamChoice(
                        index=c.index, delta=P.DeltaMessage(content=out.delta_text or None),
                        logprobs=self.chat_logprobs(lps) if req.logprobs else None,
                        finish_reason=out.finish_reason if out.finished else None,
                    )])
                item = await run.next()
            if req.include_usage:
                yield chunk([], self.usage(run, prompt_tokens))
            yield DONE
        except Exception as e:
            yield _stream_error(e, "chat", rid)
            yield DONE
        finally:
            await run.aclose()

    async def completions(self, req: P.CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        prompts = req.prompts()
        if req.session_id is not None and (len(prompts) > 1 or req.n > 1):
            raise bad_request("a session request must have n=1 and one prompt", param="n")
        encoded = [await self.encode(p, req.session_id) for p in prompts]
        jobs = []
        for ids in encoded:
            max_tokens = self.max_tokens(req, len(ids))
            jobs += [(ids, self.sampling(req, max_tokens, i)) for i in range(req.n)]
        prompt_tokens = sum(len(ids) for ids in encoded)
        rid, run = await self.start_run("cmpl", jobs, req.session_id)
        if not req.stream:
            choices = []
            for index, out in await self.finals(run, request):
                lp = self.completion_logprobs(out.logprobs or [], 0) if req.logprobs is not None else None
                choices.append(P.CompletionChoice(index=index, text=out.text, logprobs=lp,
                                                  finish_reason=out.finish_reason))
            return JSONResponse(P.CompletionResponse(
                id=rid, model=self.model_name, choices=choices, usage=self.usage(run, prompt_tokens)
            ).model_dump())
        first = await self.first(run)
        return self.stream_response(self._completion_stream(req, rid, run, first, prompt_tokens), run)

    async def _completion_stream(self, req: P.CompletionRequest, rid: str, run: _Run,
                                 item: tuple[_Choice, RequestOutput] | None, prompt_tokens: int
                                 ) -> AsyncIterator[str]:
        created = int(time.time())
        offsets = [0] * len(run.choices)

        def chunk(choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> str:
            c = P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                     usage=usage)
            return f"data: {c.model_dump_json()}\n\n"

        try:
            while item is not None:
                c, out = item
                lps = self.new_logprobs(c, out) if req.logprobs is not None else []
                if out.delta_text or lps or out.finished:
                    lp = self.completion_logprobs(lps, offsets[c.index]) if req.logprobs is not None else None
                    offsets[c.index] += len(out.delta_text)
                    reason = out.finish_reason if out.finished else None
                    yield chunk([P.CompletionChoice(index=c.index, text=out.delta_text, logprobs=lp,
                                                    finish_reason=reason)])
                item = await run.next()
            if req.include_usage:
                yield chunk([], self.usage(run, prompt_tokens))
            yield DONE
        except Exception as e:
            yield _stream_error(e, "completion", rid)
            yield DONE
        finally:
            await run.aclose()

    async def abort(self, req: P.AbortRequest) -> dict[str, Any]:
        done = False
        if req.request_id is not None:
            for engine_id in self.inflight.get(req.request_id, [req.request_id]):
                done = await self.client.abort(engine_id) or done
        if req.session_id is not None:
            if req.end_session:
                done = await self.client.end_session(req.session_id) or done
            else:
                raise bad_request("to stop a session's turn, pass its request_id; to drop the session, "
                                  "pass end_session=true", param="session_id")
        return {"success": done}


def build_app(
    engine: Any,
    model_name: str,
    api_keys: Iterable[str] | None = None,
    max_concurrent_requests: int | None = None,
    max_queued_requests: int | None = None,
    queue_timeout_s: float = 30.0,
    close_engine: bool = True,
) -> FastAPI:
    """The server app for ``engine`` (an :class:`~lmkiln.engine.AsyncEngine`, an ``LLMEngine``, or any
    :class:`~lmkiln.server.engine_client.EngineClient`, such as a test fake).

    ``api_keys``: if given, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    ``max_concurrent_requests``: HTTP requests generating at once (None: no limit); up to
    ``max_queued_requests`` (default: as many) wait, more are refused with 429; one waiting longer than
    ``queue_timeout_s`` gets 503. ``close_engine``: abort everything and stop the engine on shutdown.
    """
    client = as_client(engine)
    server = _Server(client, model_name, Admission(max_concurrent_requests, max_queued_requests,
                                                   queue_timeout_s))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("serving %r (context %d tokens)", model_name, client.session_len)
        yield
        if close_engine:
            await client.close()

    app = FastAPI(title="lmkiln", summary="OpenAI-compatible API of the lmkiln engine", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    keys = [k for k in (api_keys or []) if k]
    if keys:
        app.add_middleware(_APIKeyMiddleware, keys=keys)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(req, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: P.CompletionRequest, request: Request) -> Response:
        return await server.completions(req, request)

    @app.get("/v1/models")
    async def models() -> P.ModelList:
        card = P.ModelCard(id=model_name, root=model_name, max_model_len=client.session_len)
        return P.ModelList(data=[card])

    @app.post("/abort_request")
    async def abort_request(req: P.AbortRequest) -> dict[str, Any]:
        return await server.abort(req)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
