"""Incremental detokenization and stop strings for one request.

Text is decoded a few tokens at a time (the usual prefix/read offset scheme), so the cost per token does
not grow with the output, and a token that ends inside a multi-byte character waits for the next one.
Stop strings are matched on the text, so they may span several tokens; the matched text (and anything
after it) is cut. While a request runs, the last ``max_stop_len - 1`` characters are held back from the
stream, since they may turn out to begin a stop string.
"""

from __future__ import annotations

from typing import Any

from lmkiln.engine.sampling_params import SamplingParams

CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so the first word's spacing comes out right


def fast_decoder(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer when ``tokenizer.decode`` would return exactly
    what it returns (no clean-up pass), else None.

    ``tokenizer.decode`` first converts its input with ``to_py_obj``, which walks every id through a chain
    of type checks: at batch 64 that was 3.5 ms of every engine step (CPU profile); the backend's own
    ``decode`` skips it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not callable(getattr(backend, "decode", None)):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # transformers skips the clean-up for BPE models unless forced (tokenization_utils_tokenizers)
        forced = getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
        )
        if type(backend.model).__name__ != "BPE" or forced:
            return None
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self._backend = fast_decoder(tokenizer) if tokenizer is not None else None
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""  # output text so far (cut at a stop string once one matched)
        self.stop_matched: str | None = None
        self._emitted = 0  # characters of ``text`` already returned by :meth:`delta`

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int]) -> bool:
        """Decode new output tokens; True if a stop string matched (the text is then final)."""
        if self.stop_matched is not None or self.tokenizer is None:
            return self.stop_matched is not None
        self.token_ids.extend(new_token_ids)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete character (or nothing printable yet): wait for more tokens
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._check_stop(start)

    def flush(self) -> None:
        """At the end: decode tokens still held back for an incomplete character."""
        if self.stop_matched is not None or self.tokenizer is None or self.read_offset >= len(self.token_ids):
            return
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.read_offset = len(self.token_ids)
        self._check_stop(start)

    def _check_stop(self, new_from: int) -> bool:
        stops = self.params.stop
        if not stops:
            return False
        lo = max(new_from - self.params.max_stop_len + 1, 0)
        best: tuple[int, str] | None = None
        for s in stops:
            i = self.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.stop_matched = s
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        return True

    def delta(self, finished: bool) -> str:
        """Text not yet returned; holds back a possible stop-string start unless ``finished``."""
        end = len(self.text)
        if not finished and self.stop_matched is None and self.params.stop:
            end = max(end - self.params.max_stop_len + 1, self._emitted)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
