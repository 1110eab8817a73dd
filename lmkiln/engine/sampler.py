"""Turns the logits of one step into next tokens: penalties, filters, greedy or seeded sampling, logprobs.

All rows are processed as one batch. Greedy rows take the argmax of the (penalized) logits. Sampled rows
divide by their temperature, apply top-k, then top-p, then min-p, and draw with the exponential-race trick
(``argmax(p / E)``, ``E ~ Exp(1)``), which needs one random vector per row: a row with a ``seed`` draws it
from its own ``torch.Generator``, so its tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from lmkiln.engine.outputs import Logprobs
from lmkiln.engine.sequence import Sequence
from lmkiln.engine.transfer import to_device


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    logprobs: list[Logprobs | None]


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties, in place."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    sub = logits[rows]
    counts = torch.zeros_like(sub)
    seen = torch.zeros(sub.shape, dtype=torch.bool, device=device)
    for r, i in enumerate(rows):
        out = torch.tensor(seqs[i].output_token_ids, dtype=torch.long, device=device)
        out = out[out < vocab]
        counts[r].index_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
        allt = torch.tensor(seqs[i].token_ids, dtype=torch.long, device=device)
        seen[r, allt[allt < vocab]] = True
    p = [seqs[i].params for i in rows]
    rep = torch.tensor([x.repetition_penalty for x in p], dtype=sub.dtype, device=device)[:, None]
    pres = torch.tensor([x.presence_penalty for x in p], dtype=sub.dtype, device=device)[:, None]
    freq = torch.tensor([x.frequency_penalty for x in p], dtype=sub.dtype, device=device)[:, None]
    penalized = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalized, sub)
    sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    logits[rows] = sub
    return logits


def apply_filters(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then outside the top-p nucleus, then below ``min_p * p_max``.

    ``top_k [B]`` (0: off), ``top_p [B]`` (1: off), ``min_p [B]`` (0: off); the likeliest token always stays.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = rank >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    drop |= (before >= top_p[:, None]) & (rank > 0)  # the smallest set reaching top_p stays
    drop |= (probs < min_p[:, None] * probs[:, :1]) & (rank > 0)
    mask = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def _masks_stops(seq: Sequence) -> bool:
    """Whether the sequence's stop tokens are masked this step (``min_tokens`` not reached yet)."""
    p = seq.params
    return bool(p.min_tokens and seq.num_output_tokens < p.min_tokens and seq.stop_ids)


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing to apply to the logits first and no logprobs to report."""
    p = seq.params
    return p.greedy and not p.has_penalties and p.logprobs is None and not _masks_stops(seq)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its own stream (seeded requests)

    def forget(self, seq_ids: Iterable[int]) -> None:
        """Drop the random streams of sequences that left the engine."""
        for i in seq_ids:
            self._generators.pop(i, None)

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.params.seed is None:
            g = self._shared.get(device)
            if g is None:
                g = self._shared[device] = torch.Generator(device).manual_seed(self.seed)
            return g
        g = self._generators.get(seq.seq_id)
        if g is None:
            g = self._generators[seq.seq_id] = torch.Generator(device).manual_seed(seq.params.seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SamplerOutput:
        if all(_plain_greedy(s) for s in seqs):
            # the argmax of the logits as they are: converting them to float32 first (exact) picks the same
            # token, and a batch decode step spares two launches
            return SamplerOutput(logits.argmax(dim=-1), [None] * len(seqs))
        logits = logits.float()
        device = logits.device
        want_lp = [s.params.logprobs for s in seqs]
        raw_lp = logits.log_softmax(dim=-1) if any(n is not None for n in want_lp) else None
        logits = logits.clone()
        for i, s in enumerate(seqs):  # no stop token before min_tokens
            if _masks_stops(s):
                ids = [t for t in s.stop_ids if t < logits.shape[-1]]
                logits[i, ids] = float("-inf")
        logits = apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:  # (list indices on CUDA tensors would copy them from pageable memory: a host sync)
            every = len(sampled) == len(seqs)
            at = None if every else to_device(sampled, torch.long, device)
            sub = logits if every else logits.index_select(0, at)
            temp = to_device([seqs[i].params.temperature for i in sampled], None, device)
            sub = sub / temp[:, None]
            if any(seqs[i].params.has_filters for i in sampled):
                top_k = to_device([seqs[i].params.top_k for i in sampled], None, device)
                top_p = to_device([seqs[i].params.top_p for i in sampled], None, device)
                min_p = to_device([seqs[i].params.min_p for i in sampled], None, device)
                sub = apply_filters(sub, top_k, top_p, min_p)
            probs = sub.softmax(dim=-1)
            noise = torch.empty_like(probs)
            shared = [r for r, i in enumerate(sampled) if seqs[i].params.seed is None]
            if shared:  # one draw for every row without a seed
                g = self._generator(seqs[sampled[shared[0]]], device)
                drawn = torch.empty((len(shared), probs.shape[1]), device=device).exponential_(generator=g)
                if len(shared) == len(sampled):
                    noise = drawn
                else:
                    noise.index_copy_(0, to_device(shared, torch.long, device), drawn)
            for r, i in enumerate(sampled):
                if seqs[i].params.seed is not None:
                    noise[r].exponential_(generator=self._generator(seqs[i], device))
            picked = (probs / noise).argmax(dim=-1)
            tokens = picked if every else tokens.index_copy_(0, at, picked)
        logprobs: list[Logprobs | None] = [None] * len(seqs)
        if raw_lp is not None:
            chosen = raw_lp.gather(1, tokens[:, None])[:, 0].tolist()
            tok_list = tokens.tolist()
            for i, n in enumerate(want_lp):
                if n is None:
                    continue
                top = {}
                if n:
                    vals, ids = raw_lp[i].topk(n)
                    top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
                logprobs[i] = Logprobs(tok_list[i], chosen[i], top)
        return SamplerOutput(tokens, logprobs)
