"""Sampler: greedy, penalties, top-k / top-p / min-p masks, seeded reproducibility, logprobs."""

from __future__ import annotations

import pytest
import torch

from lmkiln.engine.errors import RequestError
from lmkiln.engine.sampler import Sampler, apply_filters, apply_penalties
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.engine.sequence import Sequence


def _seq(i: int, params: SamplingParams, prompt=(1, 2), output=(), eos=()) -> Sequence:
    s = Sequence(i, f"r{i}", list(prompt), params, tuple(eos))
    for t in output:
        s.append_token(t)
    return s


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(i, SamplingParams(temperature=0)) for i in range(3)]
    assert torch.equal(Sampler()(logits, seqs).token_ids, logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_plain_greedy_takes_the_first_maximum_in_the_logits_dtype(dtype: torch.dtype) -> None:
    # the fast path skips the float32 copy: same token, ties to the first maximum as the full path breaks them
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[1, 7] = logits[1, 250] = logits[1].max() + 1  # a tie
    before = logits.clone()
    seqs = [_seq(i, SamplingParams(temperature=0)) for i in range(4)]
    out = Sampler()(logits, seqs)
    assert out.token_ids.tolist() == logits.float().argmax(-1).tolist()
    assert out.token_ids[1].item() == 7 and out.token_ids.dtype == torch.long
    assert out.logprobs == [None] * 4 and torch.equal(logits, before)


def test_greedy_with_logprobs_or_min_tokens_takes_the_full_path() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    lp = Sampler()(logits, [_seq(0, SamplingParams(temperature=0, logprobs=1))])
    assert lp.token_ids.tolist() == [0] and lp.logprobs[0] is not None
    held = _seq(0, SamplingParams(temperature=0, min_tokens=2), eos=(0,))
    assert Sampler()(logits, [held]).token_ids.tolist() == [1]  # the stop token 0 is masked


def test_repetition_penalty_uses_prompt_and_output_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    s = _seq(0, SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1])
    out = apply_penalties(logits.clone(), [s])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_use_output_counts() -> None:
    logits = torch.zeros(1, 4)
    s = _seq(0, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=[3], output=[1, 1, 2])
    out = apply_penalties(logits, [s])
    assert out.tolist() == [[0.0, -1.0, -0.75, 0.0]]  # the prompt token 3 is not penalized


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    s = _seq(0, SamplingParams(temperature=0, frequency_penalty=1.0), output=[0])
    assert Sampler()(logits, [s]).token_ids.tolist() == [1]


def test_filters_mask_as_documented() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p, m: torch.isfinite(  # noqa: E731
        apply_filters(logits, torch.tensor([k]), torch.tensor([p]), torch.tensor([m]))
    )[0].tolist()
    assert kept(2, 1.0, 0.0) == [True, True, False, False]
    assert kept(0, 0.7, 0.0) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(0, 0.5, 0.0) == [True, False, False, False]
    assert kept(0, 0.01, 0.0) == [True, False, False, False]  # the top token always stays
    assert kept(0, 1.0, 0.2) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert kept(3, 0.9, 0.5) == [True, True, False, False]


def test_sampling_respects_the_masks() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(200, 1)
    seqs = [_seq(i, SamplingParams(temperature=1.0, top_k=2)) for i in range(200)]
    toks = Sampler(seed=1)(logits, seqs).token_ids
    assert set(toks.tolist()) == {0, 1}


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    seqs = [_seq(i, SamplingParams(temperature=1.0)) for i in range(4000)]
    toks = Sampler(seed=0)(logits, seqs).token_ids
    freq = torch.bincount(toks, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_seeded_requests_do_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=gen)
    p = SamplingParams(temperature=1.0, seed=1234)

    def run(batch_rows: list[int], steps: int = 5) -> list[int]:
        sampler = Sampler(seed=99)
        seqs = [_seq(i, p if i == 0 else SamplingParams(temperature=1.0)) for i in batch_rows]
        out = []
        for _ in range(steps):
            out.append(sampler(logits[batch_rows], seqs).token_ids[0].item())
        return out

    alone, in_batch = run([0]), run([0, 1, 2, 3])
    assert alone == in_batch
    assert len(set(alone)) > 1  # it is sampling, not greedy


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)
    seqs = [_seq(i, SamplingParams(temperature=0.25)) for i in range(2000)]
    share = (Sampler(seed=0)(logits, seqs).token_ids == 0).float().mean().item()
    assert share > 0.95  # softmax([4, 0]) = 0.982


def test_min_tokens_blocks_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    s = _seq(0, SamplingParams(temperature=0, min_tokens=2), eos=[1])
    assert Sampler()(logits, [s]).token_ids.tolist() == [2]
    s.append_token(2)
    s.append_token(2)
    assert Sampler()(logits, [s]).token_ids.tolist() == [1]


def test_logprobs_are_the_raw_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    seqs = [
        _seq(0, SamplingParams(temperature=0, logprobs=2, presence_penalty=2.0), output=[2]),
        _seq(1, SamplingParams(temperature=0)),
    ]
    out = Sampler()(logits, seqs)
    raw = logits[0].log_softmax(-1)
    lp = out.logprobs[0]
    assert lp is not None and lp.token_id == out.token_ids[0].item() == 1  # the penalty moved the choice
    assert lp.logprob == pytest.approx(raw[1].item())
    assert list(lp.top) == [2, 1] and lp.top[2] == pytest.approx(raw[2].item())
    assert out.logprobs[1] is None


@pytest.mark.parametrize(
    "kw",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -1},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"logprobs": 50},
        {"stop": [""]},
    ],
)
def test_bad_sampling_params_are_refused(kw) -> None:
    with pytest.raises(RequestError, match="invalid sampling parameter"):
        SamplingParams(**kw)
