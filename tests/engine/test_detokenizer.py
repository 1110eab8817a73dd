"""Incremental detokenization equals a full decode; stop strings (multi-token) are cut and held back."""

from __future__ import annotations

import pytest

from lmkiln.engine.detokenizer import IncrementalDetokenizer
from lmkiln.engine.sampling_params import SamplingParams

TEXT = "Hello, world! Ünïcödé → 日本語のテキスト 🙂🙂 and    spaces.\nNew line: `code` END of text"


def _stream(tok, ids, params, prompt=None):
    d = IncrementalDetokenizer(tok, prompt or tok("Say:")["input_ids"], params)
    pieces, stopped = [], False
    for i, t in enumerate(ids):
        stopped = d.add_tokens([t])
        last = stopped or i == len(ids) - 1
        if last:
            d.flush()
        pieces.append(d.delta(finished=last))
        if stopped:
            break
    return d, "".join(pieces), stopped


def test_incremental_equals_full_decode(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    d, streamed, stopped = _stream(tok, ids, SamplingParams())
    assert not stopped
    assert d.text == streamed == tok.decode(ids)


@pytest.mark.parametrize("include", [False, True])
def test_multi_token_stop_string_is_cut(smollm2_tokenizer, include) -> None:
    tok = smollm2_tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    stop = "テキスト 🙂"
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) > 1
    d, streamed, stopped = _stream(
        tok, ids, SamplingParams(stop=["never", stop], include_stop_str_in_output=include)
    )
    assert stopped and d.stop_matched == stop
    head = TEXT[: TEXT.index(stop)]
    assert d.text == streamed == (head + stop if include else head)


def test_stream_never_shows_a_stop_string_prefix(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("one two three four", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, [1], SamplingParams(stop=["three four five"]))
    shown = ""
    for t in ids:
        assert not d.add_tokens([t])
        shown += d.delta(finished=False)
        assert "three" not in shown  # could still become the stop string
    shown += d.delta(finished=True)
    assert shown == "one two three four"


def test_special_tokens_are_skipped(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("Hi there", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    _, streamed, _ = _stream(tok, ids, SamplingParams())
    assert streamed == "Hi there"
    _, streamed, _ = _stream(tok, ids, SamplingParams(skip_special_tokens=False))
    assert streamed == "Hi there<|im_end|>"


def test_fast_decoder_equals_tokenizer_decode(smollm2_tokenizer) -> None:
    from lmkiln.engine.detokenizer import fast_decoder

    backend = fast_decoder(smollm2_tokenizer)
    assert backend is not None, "SmolLM2's fast BPE tokenizer should take the direct path"
    text = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Héllo, wörld! 1+1=2 ... ok?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(i in smollm2_tokenizer.all_special_ids for i in ids)
    for skip in (True, False):
        for cut in (1, 3, len(ids) // 2, len(ids)):
            assert backend.decode(ids[:cut], skip_special_tokens=skip) == smollm2_tokenizer.decode(
                ids[:cut], skip_special_tokens=skip
            )


def test_fast_decoder_is_off_when_decode_would_clean_up() -> None:
    from types import SimpleNamespace

    from lmkiln.engine.detokenizer import fast_decoder

    wordpiece = SimpleNamespace(model=SimpleNamespace(), decode=lambda ids, **kw: "")
    tok = SimpleNamespace(backend_tokenizer=wordpiece, clean_up_tokenization_spaces=True)
    assert fast_decoder(tok) is None
    assert fast_decoder(SimpleNamespace()) is None  # a slow tokenizer: the plain decode
