"""Tensor parallelism for the Llama-family :class:`~lmkiln.models.llama.CausalLM`: shard a model in place.

Megatron-style, as LMDeploy and nano-vllm do it: q/k/v and gate/up are *column*-parallel (each rank keeps
whole attention heads and a slice of the MLP), o and down are *row*-parallel (each rank multiplies its slice
of the input features) followed by one all-reduce, and the embedding and lm_head are split along the
vocabulary (masked lookup + all-reduce; local logits + all-gather). Norms and rotary tables are replicated.

KV heads are split with their query heads; when there are fewer KV heads than ranks, each KV head is
replicated on the ``tp / num_kv_heads`` ranks whose query heads use it. Fused linears (``qkv_proj``,
``gate_up_proj``) are split part by part. Packed int4 linears (:class:`~lmkiln.layers.Int4Linear`) are
sliced on the layout's 32-column blocks and 128-row chunks when the cut falls on them, else unpacked, sliced
and repacked (exact either way); a row cut must fall on a quantization group boundary.

Everything here is pure slicing: ``shard_model(model, cfg, comm)`` needs no process group, only the rank and
world size in ``comm`` (the collectives run later, in the forward pass).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.errors import ModelError
from lmkiln.layers.linear import Int4Linear
from lmkiln.models.config import ModelConfig
from lmkiln.quant.pack import PACK_K, PACK_N, pack_codes, words_to_codes


class TensorParallelError(ModelError):
    """A model that cannot be split ``tp`` ways (head counts, int4 group boundaries, shapes)."""


class Comm(Protocol):
    """The collectives a sharded model calls in its forward pass."""

    rank: int
    world: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TPGroup:
    """Rank ``rank`` of ``world`` over a ``torch.distributed`` process group (None: the default group).

    ``all_reduce`` sums in place; ``all_gather`` concatenates every rank's ``[..., n]`` along the last dim.
    Both are single NCCL calls, so they can be captured in CUDA graphs.
    """

    rank: int
    world: int
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist

        lead, n = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        out = torch.empty((self.world * flat.shape[0], n), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.view(self.world, flat.shape[0], n).transpose(0, 1).reshape(*lead, self.world * n)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class HeadShard:
    """The query heads ``[q_start, q_end)`` and KV heads ``[kv_start, kv_end)`` one rank keeps."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start


def valid_tp_sizes(num_heads: int, num_kv_heads: int, limit: int = 64) -> list[int]:
    """Every ``tp`` (up to ``limit``) that splits these heads: it divides the query heads, and divides the
    KV heads or is a multiple of them (then KV heads are replicated)."""
    return [
        t
        for t in range(1, min(limit, num_heads) + 1)
        if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)
    ]


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise :class:`TensorParallelError` unless ``cfg``'s attention heads split ``tp`` ways."""
    if tp < 1:
        raise TensorParallelError(f"tp must be >= 1, got {tp}")
    h, kv = cfg.num_heads, cfg.num_kv_heads
    if tp == 1:
        return
    ok = valid_tp_sizes(h, kv)
    if h % tp:
        raise TensorParallelError(
            f"--tp {tp} gives every GPU the same number of attention heads, but this model has {h} "
            f"attention heads, not a multiple of {tp}; use --tp {' or '.join(map(str, ok))}"
        )
    if kv % tp and tp % kv:
        raise TensorParallelError(
            f"--tp {tp} cannot split this model's {kv} KV heads: {tp} neither divides {kv} nor is a "
            f"multiple of it (then each KV head would be replicated); use --tp {' or '.join(map(str, ok))}"
        )


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world: int) -> HeadShard:
    """Rank ``rank``'s contiguous query heads and the KV heads they read (replicated when kv < world)."""
    hq = num_heads // world
    if num_kv_heads >= world:
        hk = num_kv_heads // world
        return HeadShard(rank * hq, (rank + 1) * hq, rank * hk, (rank + 1) * hk)
    kv = rank // (world // num_kv_heads)
    return HeadShard(rank * hq, (rank + 1) * hq, kv, kv + 1)


def balanced_split(total: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """``world`` contiguous ``[start, end)`` ranges covering ``total`` in whole ``unit`` s, as even as
    possible (the first ranks take one unit more when they do not divide evenly)."""
    if total % unit:
        raise TensorParallelError(f"cannot split {total} features into whole units of {unit}")
    units = total // unit
    if units < world:
        raise TensorParallelError(
            f"cannot split {total} features {world} ways in units of {unit}: some GPU would get none; "
            "use a smaller --tp"
        )
    base, extra = divmod(units, world)
    out, start = [], 0
    for r in range(world):
        end = start + (base + (r < extra)) * unit
        out.append((start, end))
        start = end
    return out


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int, int]:
    """``(start, end, padded)``: rank's vocabulary rows; every rank's logits are padded to ``padded``."""
    padded = -(-vocab // world)
    start, end = min(rank * padded, vocab), min((rank + 1) * padded, vocab)
    if end <= start:
        raise TensorParallelError(f"a vocabulary of {vocab} tokens is too small to split {world} ways")
    return start, end, padded


# --------------------------------------------------------------------------------------- linear slicing


def select_out_features(layer: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    """The linear whose outputs are ``layer``'s output columns ``ranges`` (concatenated), new storage."""
    if isinstance(layer, Int4Linear):
        return _int4_columns(layer, ranges)
    if not isinstance(layer, nn.Linear):
        raise TensorParallelError(f"cannot shard a {type(layer).__name__}; expected nn.Linear or Int4Linear")
    weight = torch.cat([layer.weight[a:b] for a, b in ranges])
    bias = None if layer.bias is None else torch.cat([layer.bias[a:b] for a, b in ranges])
    return _linear(weight, bias)


def select_in_features(layer: nn.Module, start: int, end: int, keep_bias: bool = True) -> nn.Module:
    """The linear computing ``layer``'s partial product over input features ``[start, end)`` (the bias is
    kept only where ``keep_bias``: one rank adds it, before the all-reduce)."""
    if isinstance(layer, Int4Linear):
        return _int4_rows(layer, start, end, keep_bias)
    if not isinstance(layer, nn.Linear):
        raise TensorParallelError(f"cannot shard a {type(layer).__name__}; expected nn.Linear or Int4Linear")
    bias = layer.bias.detach().clone() if keep_bias and layer.bias is not None else None
    return _linear(layer.weight[:, start:end].clone(), bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _int4_columns(layer: Int4Linear, ranges: list[tuple[int, int]]) -> Int4Linear:
    if getattr(layer, "applies_silu", False):
        raise TensorParallelError(
            "this gate/up linear was interleaved for the SiLU epilogue (an engine already ran on the model); "
            "shard the model as loaded, before building an engine on it"
        )
    n = sum(b - a for a, b in ranges)
    if n % PACK_N:
        raise TensorParallelError(
            f"an int4 shard of {n} output features is not a multiple of the packed layout's {PACK_N}-column "
            "block; use another --tp"
        )
    bias = None if layer.bias is None else torch.cat([layer.bias[a:b] for a, b in ranges])
    if all(a % PACK_N == 0 and b % PACK_N == 0 for a, b in ranges):  # whole column blocks: plain slices
        qweight = torch.cat([layer.qweight[a // PACK_N : b // PACK_N] for a, b in ranges])
        sz = torch.cat([layer.sz[:, a:b] for a, b in ranges], dim=1)
        zeros = torch.cat([layer.zeros[:, a:b] for a, b in ranges], dim=1)
        return Int4Linear(qweight, sz, zeros, bias, layer.in_features)
    cols = torch.cat([torch.arange(a, b, device=layer.qweight.device) for a, b in ranges])
    codes = words_to_codes(layer.qweight)[:, cols]
    packed = pack_codes(codes, layer.zeros[:, cols], layer.sz[:, cols, 0])
    return Int4Linear(packed["qweight"], packed["sz"], packed["zeros"], bias, layer.in_features)


def _int4_rows(layer: Int4Linear, start: int, end: int, keep_bias: bool) -> Int4Linear:
    g = layer.group_size
    if start % g:
        raise TensorParallelError(
            f"an int4 linear's input features split at {start}, inside a quantization group of {g}; "
            f"the shards must start on a group boundary (use another --tp, or quantize with a group size "
            f"dividing {math.gcd(start, 128)})"
        )
    bias = layer.bias.clone() if keep_bias and layer.bias is not None else None
    # the packer padded K with zero weights up to packed_k: the last shard takes the padding along
    stop = layer.packed_k if end == layer.in_features else end
    if start % PACK_K == 0 and stop % PACK_K == 0:  # whole K chunks: plain slices
        qweight = layer.qweight[:, start // 8 : stop // 8].clone()
        sz = layer.sz[start // g : stop // g].clone()
        zeros = layer.zeros[start // g : stop // g].clone()
        return Int4Linear(qweight, sz, zeros, bias, end - start)
    codes = words_to_codes(layer.qweight)[start:end]
    k_pad = -(-(end - start) // PACK_K) * PACK_K
    codes = F.pad(codes, (0, 0, 0, k_pad - codes.shape[0]))  # padded rows meet zero activations
    g0, g1 = start // g, -(-end // g)
    zeros, s = layer.zeros[g0:g1], layer.sz[g0:g1, :, 0]
    extra = k_pad // g - zeros.shape[0]  # whole padding groups: s = z = 0, exactly zero weights
    zeros, s = F.pad(zeros, (0, 0, 0, extra)), F.pad(s, (0, 0, 0, extra))
    packed = pack_codes(codes, zeros, s)
    return Int4Linear(packed["qweight"], packed["sz"], packed["zeros"], bias, end - start)


# ----------------------------------------------------------------------------------- parallel modules


class RowParallel(nn.Module):
    """A row-parallel linear: this rank's partial product (``inner``), summed over ranks by one all-reduce."""

    def __init__(self, inner: nn.Module, comm: Comm) -> None:
        super().__init__()
        self.inner = inner
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, end)`` of the embedding; other ids look up zeros, and one all-reduce fills them in."""

    def __init__(self, weight: torch.Tensor, start: int, end: int, comm: Comm) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.end, self.comm = start, end, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        y = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        return self.comm.all_reduce(y * mine.unsqueeze(-1).to(y.dtype))


class ParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary rows, padded to ``padded`` and all-gathered into ``[..., vocab]``."""

    def __init__(self, weight: nn.Parameter, padded: int, vocab: int, comm: Comm) -> None:
        super().__init__()
        self.weight = weight  # may be the embedding's (tied)
        self.padded, self.vocab, self.comm = padded, vocab, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if logits.shape[-1] < self.padded:
            logits = F.pad(logits, (0, self.padded - logits.shape[-1]))
        full = self.comm.all_gather(logits)
        return full if full.shape[-1] == self.vocab else full[..., : self.vocab]


# ----------------------------------------------------------------------------------------- the model


def _group_size(layer: nn.Module) -> int | None:
    return layer.group_size if isinstance(layer, Int4Linear) else None


def mlp_ranges(cfg: ModelConfig, down: nn.Module, world: int) -> list[tuple[int, int]]:
    """How the intermediate features split: evenly for float weights; in whole 128-row chunks (else whole
    quantization groups) for an int4 ``down_proj``, unevenly if need be (Llama-2-7B's 11008 at tp 4)."""
    size = cfg.intermediate_size
    g = _group_size(down)
    if g is None:
        return balanced_split(size, world)
    unit = PACK_K if size % PACK_K == 0 else g
    return balanced_split(size, world, unit)


def shard_model(model: nn.Module, cfg: ModelConfig, comm: Comm) -> ModelConfig:
    """Keep rank ``comm.rank``'s shard of every weight of ``model`` (a ``CausalLM``), in place.

    Returns the rank's view of the config (its ``num_heads`` / ``num_kv_heads``), which sizes its KV cache.
    The dropped slices are freed once nothing else holds the full tensors.
    """
    rank, world = comm.rank, comm.world
    check_tp(cfg, world)
    if world == 1:
        return cfg
    if getattr(model, "tp_world", 1) != 1:
        raise TensorParallelError("this model is already sharded")
    hs = head_shard(cfg.num_heads, cfg.num_kv_heads, rank, world)
    d, qs, kvs = cfg.head_dim, cfg.q_size, cfg.kv_size
    q = (hs.q_start * d, hs.q_end * d)
    kv = (hs.kv_start * d, hs.kv_end * d)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "qkv_proj", None) is not None:
            parts = [q, (qs + kv[0], qs + kv[1]), (qs + kvs + kv[0], qs + kvs + kv[1])]
            attn.qkv_proj = select_out_features(attn.qkv_proj, parts)
        else:
            attn.q_proj = select_out_features(attn.q_proj, [q])
            attn.k_proj = select_out_features(attn.k_proj, [kv])
            attn.v_proj = select_out_features(attn.v_proj, [kv])
        try:
            attn.o_proj = RowParallel(select_in_features(attn.o_proj, *q, keep_bias=rank == 0), comm)
        except TensorParallelError as e:
            raise TensorParallelError(
                f"layer {i} o_proj: rank {rank} keeps heads {hs.q_start}..{hs.q_end - 1} "
                f"({hs.num_heads} x head_dim {d}): {e}"
            ) from None
        attn.num_heads, attn.num_kv_heads = hs.num_heads, hs.num_kv_heads
        if attn.k_mean is not None:
            attn.k_mean = attn.k_mean[hs.kv_start : hs.kv_end].contiguous()
        attn.qkv_sizes = [hs.num_heads * d, hs.num_kv_heads * d, hs.num_kv_heads * d]
        a, b = mlp_ranges(cfg, mlp.down_proj, world)[rank]
        if getattr(mlp, "gate_up_proj", None) is not None:
            size = cfg.intermediate_size
            mlp.gate_up_proj = select_out_features(mlp.gate_up_proj, [(a, b), (size + a, size + b)])
        else:
            mlp.gate_proj = select_out_features(mlp.gate_proj, [(a, b)])
            mlp.up_proj = select_out_features(mlp.up_proj, [(a, b)])
        mlp.down_proj = RowParallel(select_in_features(mlp.down_proj, a, b, keep_bias=rank == 0), comm)
    _shard_vocab(model, cfg, comm)
    local = dataclasses.replace(cfg, num_heads=hs.num_heads, num_kv_heads=hs.num_kv_heads)
    model.config = local
    model.tp_rank, model.tp_world = rank, world
    return local


def _shard_vocab(model: nn.Module, cfg: ModelConfig, comm: Comm) -> None:
    start, end, padded = vocab_range(cfg.vocab_size, comm.rank, comm.world)
    embed = model.model.embed_tokens
    head_w, embed_w = model.lm_head.weight, embed.weight
    same_storage = not head_w.is_meta and head_w.data_ptr() == embed_w.data_ptr()
    tied = cfg.tie_word_embeddings or head_w is embed_w or (same_storage and head_w.shape == embed_w.shape)
    shard = embed.weight[start:end].detach().clone()
    model.model.embed_tokens = VocabParallelEmbedding(shard, start, end, comm)
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TensorParallelError("an lm_head with a bias cannot be split by vocabulary yet")
    weight = (
        model.model.embed_tokens.weight
        if tied
        else nn.Parameter(head.weight[start:end].detach().clone(), requires_grad=False)
    )
    model.lm_head = ParallelLMHead(weight, padded, cfg.vocab_size, comm)
