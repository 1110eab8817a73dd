"""A terminal chat (``lmkiln chat DIR``): the model's chat template, streamed replies, multi-turn through
one engine session (earlier turns' KV cache is reused). ``exit`` or Ctrl-D ends; Ctrl-C stops the current
reply only; ``reset`` starts a new conversation."""

from __future__ import annotations

import logging
import signal
import uuid
from collections.abc import Callable
from typing import Any, TextIO

from lmkiln.engine import LLMEngine, SamplingParams
from lmkiln.engine.errors import RequestError
from lmkiln.server.engine_client import encode_turn

log = logging.getLogger(__name__)

EXIT_WORDS = frozenset({"exit", "quit"})


class _StopFlag:
    """SIGINT sets the flag (checked between engine steps) instead of raising in the middle of a step."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        self.set = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (tests): no signal handling
            self._old = None
        return self

    def _handle(self, *_: object) -> None:
        self.set = True

    def __exit__(self, *_: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class ChatSession:
    """One conversation on a :class:`LLMEngine`; :meth:`reply` streams one turn."""

    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.session_id = uuid.uuid4().hex
        self.turns = 0

    def reset(self) -> None:
        self.engine.end_session(self.session_id)
        self.session_id = uuid.uuid4().hex
        self.turns = 0

    def reply(self, text: str, write: Callable[[str], None], stop: Callable[[], bool] = lambda: False
              ) -> str:
        """Stream the answer to ``text`` through ``write``; returns the finish reason (``abort`` when
        ``stop()`` turned true)."""
        messages = [{"role": "user", "content": text}]
        if self.turns == 0 and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        ids = encode_turn(self.engine, messages, self.session_id)
        rid = self.engine.add_request(ids, self.params, session_id=self.session_id)
        while True:
            if stop():
                self.engine.abort_request(rid)
                return "abort"
            for out in self.engine.step():
                if out.request_id != rid:
                    continue
                if out.delta_text:
                    write(out.delta_text)
                if out.finished:
                    self.turns += 1
                    return out.finish_reason or "stop"


def run_chat(
    engine: LLMEngine,
    params: SamplingParams,
    system: str | None = None,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> int:
    """The interactive loop (``read``: :func:`input`, ``out``: stdout); returns the turns that ended
    normally (not stopped, not cut at the token limit)."""
    import builtins
    import sys

    read = read or builtins.input
    out = out or sys.stdout
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise RequestError(f"{engine.config.model_dir} has no chat template; `lmkiln chat` needs one")
    chat = ChatSession(engine, params, system)

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    write("lmkiln chat: `exit` or Ctrl-D ends, Ctrl-C stops a reply, `reset` starts over\n")
    done = 0
    while True:
        try:
            line = read("\n>>> ")
        except EOFError:
            write("\n")
            break
        except KeyboardInterrupt:
            write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            break
        if text == "reset":
            chat.reset()
            write("(new conversation)\n")
            continue
        try:
            with _StopFlag() as flag:
                reason = chat.reply(text, write, lambda f=flag: f.set)
        except RequestError as e:
            write(f"\n(refused: {e}; type `reset` to start a new conversation)\n")
            continue
        if reason == "abort":
            write("\n(stopped)\n")
        elif reason == "length":
            write("\n(reply cut at the token limit)\n")
        else:
            write("\n")
            done += 1
    chat.reset()
    return done
