"""What the engine returns for a request after a step (and at its end)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkiln.engine.outputs import Logprobs


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far plus what this step added.

    ``token_ids`` / ``text``: all output so far (a stop token id is in ``token_ids`` but its text is not;
    a matched stop string is cut from ``text``). ``delta_*``: what is new since the previous output of this
    request (streaming). ``num_cached_tokens``: prompt tokens that were not prefilled because their KV was
    cached (prefix cache, or the session's previous turns). ``finish_reason``: ``stop`` (stop token or
    string), ``length`` (max_tokens or session_len) or ``abort``; ``stop_reason`` is the matched stop string
    or token id.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[Logprobs] | None = None
    num_cached_tokens: int = 0
    session_id: str | None = None
