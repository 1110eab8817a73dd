"""Asyncio front of the engine: one streaming generator per request, abort, sessions.

A single background task owns the :class:`LLMEngine`: between two steps it applies queued additions, aborts
and session ends, then runs ``engine.step()`` in a worker thread (so the event loop stays responsive) and
hands each request's outputs to that request's queue. The engine is never touched from two threads at once.
Leaving a ``generate`` loop early (``break``, cancellation, a dropped client) aborts the request, which
frees all its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from lmkiln.engine.errors import RequestError
from lmkiln.engine.llm_engine import LLMEngine, Prompt
from lmkiln.engine.request_output import RequestOutput
from lmkiln.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the engine must be rebuilt."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._ops: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> AsyncEngine:
        return cls(LLMEngine.from_pretrained(model_dir, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------------------------------------- loop

    def _ensure_loop(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed earlier ({self._error!r}); restart the engine")
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lmkiln-engine-loop")

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine between two steps; return its result (or raise its error) here."""
        self._ensure_loop()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self._wake.set()  # type: ignore[union-attr]
        return await fut

    def _apply_ops(self) -> None:
        while self._ops:
            fn, fut = self._ops.popleft()
            try:
                result = fn()
            except Exception as e:  # a refused request: the caller gets the error
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

    async def _run(self) -> None:
        wake = self._wake
        try:
            while True:
                self._apply_ops()
                if not self.engine.has_unfinished_requests():
                    wake.clear()  # type: ignore[union-attr]
                    if not self._ops:
                        await wake.wait()  # type: ignore[union-attr]
                    continue
                outputs = await asyncio.to_thread(self.engine.step)
                for out in outputs:
                    q = self._queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("the engine loop failed")
            self._error = e
            for q in self._queues.values():
                q.put_nowait(e)
            while self._ops:
                _, fut = self._ops.popleft()
                if not fut.done():
                    fut.set_exception(EngineDeadError(f"the engine loop failed: {e!r}"))

    # ---------------------------------------------------------------------------------------- requests

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each carries ``delta_text`` / ``delta_token_ids``); the last one
        has ``finished=True``. Stopping the iteration early aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise RequestError(f"request id {request_id!r} is already streaming; pick a unique id")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            await self._call(lambda: self.engine.add_request(prompt, params, request_id, session_id))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop failed: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._error is None and self._task is not None and not self._task.done():
                self._ops.append((lambda: self.engine.abort_request(request_id), _done_future()))
                self._wake.set()  # type: ignore[union-attr]

    async def abort(self, request_id: str) -> bool:
        """Abort a request; when this returns, all its KV blocks are free."""
        q = self._queues.get(request_id)
        aborted = await self._call(lambda: self.engine.abort_request(request_id))
        if aborted and q is not None:
            q.put_nowait(RequestOutput(request_id, [], finished=True, finish_reason="abort"))
        return aborted

    async def end_session(self, session_id: str) -> bool:
        """End a session: abort its running turn (its stream ends with ``abort``) and free its blocks."""
        s = self.engine.scheduler.sessions.get(session_id)
        active = s.active_request if s is not None else None
        ended = await self._call(lambda: self.engine.end_session(session_id))
        if active is not None and active in self._queues:
            self._queues[active].put_nowait(RequestOutput(active, [], finished=True, finish_reason="abort"))
        return ended

    async def run(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` between two steps (for inspection: statistics, tests)."""
        return await self._call(lambda: fn(self.engine))

    async def close(self) -> None:
        """Abort everything and stop the background task."""
        if self._task is None:
            return
        with contextlib.suppress(EngineDeadError):
            await self._call(
                lambda: [self.engine.abort_request(r) for r in list(self.engine.scheduler.requests)]
            )
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


def _done_future() -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
    return fut
