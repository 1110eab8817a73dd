"""What the server needs from an engine (:class:`EngineClient`) and its implementation over
:class:`~lmkiln.engine.AsyncEngine`. Tests drive the server with a scripted fake of the same shape."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lmkiln.engine import AsyncEngine, LLMEngine, RequestOutput, SamplingParams
from lmkiln.engine.errors import RequestError

log = logging.getLogger(__name__)

# a made-up earlier exchange: rendering it with and without the new turn gives the new turn's text alone
_PLACEHOLDER = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    used_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_hits: int = 0


@runtime_checkable
class EngineClient(Protocol):
    session_len: int

    async def encode(self, prompt: str | list[int] | list[dict[str, str]], session_id: str | None = None
                     ) -> list[int]: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 session_id: str | None = None) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> bool: ...

    async def end_session(self, session_id: str) -> bool: ...

    def history_len(self, session_id: str | None) -> int: ...

    def token_text(self, token_id: int) -> str: ...

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


def turn_text(tokenizer: Any, messages: list[dict[str, str]], continuation: bool) -> str:
    """The chat template's text for ``messages``; with ``continuation``, only the part a new turn adds to
    an existing conversation (no system prompt or BOS again), so it can be appended to a session."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False, add_generation_prompt=True)
    if not continuation:
        return full
    before = render(_PLACEHOLDER, tokenize=False, add_generation_prompt=False)
    both = render(_PLACEHOLDER + messages, tokenize=False, add_generation_prompt=True)
    if both.startswith(before):
        # the session's history ends with the eos token the model generated; what the template puts after
        # it (ChatML: a newline) is not in the history, so it leads the new turn
        after_reply = before[before.rfind("y") + 1:]
        eos = getattr(tokenizer, "eos_token", None) or ""
        lead = after_reply[len(eos):] if eos and after_reply.startswith(eos) else ""
        return lead + both[len(before):]
    log.warning("the chat template renders turns inconsistently; sending the new turn rendered alone")
    return full


def encode_turn(engine: LLMEngine, prompt: str | list[int] | list[dict[str, str]],
                session_id: str | None) -> list[int]:
    """Token ids of a request's prompt; chat messages go through the chat template (as a continuation when
    the session already has turns)."""
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        return engine.encode(prompt)
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise RequestError("this model has no chat template: use /v1/completions with a text prompt")
    continuation = bool(session_id and engine.scheduler.sessions.history(session_id))
    text = turn_text(tok, prompt, continuation)  # type: ignore[arg-type]
    return list(tok(text, add_special_tokens=False)["input_ids"])


class AsyncEngineClient:
    """:class:`EngineClient` over an :class:`AsyncEngine`. Tokenizer calls that could race the engine's
    detokenizer (which runs in the step thread) run between two steps."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.session_len = engine.engine.session_len

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def encode(self, prompt: str | list[int] | list[dict[str, str]], session_id: str | None = None
                     ) -> list[int]:
        return await self.engine.run(lambda e: encode_turn(e, prompt, session_id))

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 session_id: str | None = None) -> AsyncIterator[RequestOutput]:
        return self.engine.generate(prompt_ids, params, request_id=request_id, session_id=session_id)

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    async def end_session(self, session_id: str) -> bool:
        return await self.engine.end_session(session_id)

    def history_len(self, session_id: str | None) -> int:
        if session_id is None:
            return 0
        s = self.engine.engine.scheduler.sessions.get(session_id)
        return len(s.token_ids) if s is not None else 0

    def token_text(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return str(token_id)
        return tok.decode([token_id])

    def stats(self) -> EngineStats:
        e = self.engine.engine
        bm, sch = e.block_manager, e.scheduler
        return EngineStats(
            running=len(sch.running), waiting=len(sch.waiting), kv_cache_usage=bm.usage,
            used_blocks=bm.num_blocks - bm.num_free_blocks, num_blocks=bm.num_blocks,
            num_preemptions=sch.num_preemptions, prefix_cache_hits=bm.num_prefix_hits,
        )

    async def close(self) -> None:
        await self.engine.close()


def as_client(engine: Any) -> EngineClient:
    """Wrap an :class:`AsyncEngine` (or an :class:`LLMEngine`); pass anything else (a fake) unchanged."""
    if isinstance(engine, LLMEngine):
        engine = AsyncEngine(engine)
    if isinstance(engine, AsyncEngine):
        return AsyncEngineClient(engine)
    return engine
