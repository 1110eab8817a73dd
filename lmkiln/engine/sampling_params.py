"""Per-request generation settings (one home for their defaults and their validation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmkiln.engine.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature == 0`` is greedy decoding. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` disable those
    filters. Penalties follow the usual conventions: ``repetition_penalty`` (HF/CTRL style, > 1 discourages)
    applies to every token of the prompt and the output; ``presence_penalty`` / ``frequency_penalty``
    (OpenAI style) apply to output tokens only. ``seed`` gives a request its own random stream, so its
    samples do not depend on what else is in the batch. ``logprobs = n`` returns the chosen token's log
    probability and the ``n`` most likely tokens' (``0``: only the chosen one), computed from the raw model
    distribution (before penalties, temperature and filters). ``stop`` strings may span several tokens;
    the matched text is cut from the output (unless ``include_stop_str_in_output``).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # accept lists (JSON) and a single string for convenience; store tuples (hashable, immutable)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(what: str) -> RequestError:
            return RequestError(f"invalid sampling parameter: {what}")

        if self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise bad("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def has_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    @classmethod
    def greedy_params(cls, max_tokens: int = 256, stop: Sequence[str] = (), **kw) -> SamplingParams:
        return cls(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop), **kw)
