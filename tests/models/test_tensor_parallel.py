"""Sharding a model for tensor parallelism: the split plan, exact linear / int4 slices, and whole sharded
models run rank by rank in threads (an in-process all-reduce) against the unsharded model."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import threading

import pytest
import torch
from torch import nn

from lmkiln.layers import Int4Linear
from lmkiln.models import CausalLM, Checkpoint
from lmkiln.models.tensor_parallel import (
    HeadShard,
    RowParallel,
    TensorParallelError,
    balanced_split,
    check_tp,
    head_shard,
    select_in_features,
    select_out_features,
    shard_model,
    valid_tp_sizes,
    vocab_range,
)
from lmkiln.quant.pack import dequantize_packed


class ThreadComm:
    """``world`` ranks as threads of this process: collectives meet at a barrier (tests only)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def rank(self, r: int) -> _RankComm:
        return _RankComm(self, r)


class _RankComm:
    def __init__(self, shared: ThreadComm, rank: int) -> None:
        self.shared, self.rank, self.world = shared, rank, shared.world

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared.slots[self.rank] = x.clone()
        self.shared.barrier.wait()
        parts = list(self.shared.slots)
        self.shared.barrier.wait()
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x.copy_(torch.stack(self._exchange(x)).sum(0))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=-1)


def run_ranks(world: int, fn) -> list:
    """``fn(rank_comm)`` on ``world`` threads at once; their results in rank order."""
    comm, results, errors = ThreadComm(world), [None] * world, []

    def target(r: int) -> None:
        try:
            results[r] = fn(comm.rank(r))
        except BaseException as e:  # surface a rank's failure in the test
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ------------------------------------------------------------------------------------------------ plan


def test_head_split_follows_gqa_groups_and_replicates_few_kv_heads() -> None:
    assert [head_shard(32, 8, r, 4) for r in (0, 3)] == [HeadShard(0, 8, 0, 2), HeadShard(24, 32, 6, 8)]
    # 2 KV heads over 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 KV head 1 (the ones their queries use)
    kv = [(s.kv_start, s.kv_end) for s in (head_shard(8, 2, r, 4) for r in range(4))]
    assert kv == [(0, 1), (0, 1), (1, 2), (1, 2)]
    for heads, kv_heads, tp in ((32, 8, 2), (32, 8, 8), (32, 4, 8), (9, 3, 3), (4, 1, 2)):
        group = heads // kv_heads
        for r in range(tp):
            s = head_shard(heads, kv_heads, r, tp)
            assert {h // group for h in range(s.q_start, s.q_end)} == set(range(s.kv_start, s.kv_end))
    assert valid_tp_sizes(9, 3) == [1, 3, 9]
    assert valid_tp_sizes(32, 8)[:6] == [1, 2, 4, 8, 16, 32]


def test_unsplittable_heads_are_refused_with_the_numbers(smollm2_dir) -> None:
    from lmkiln.models import ModelConfig

    cfg = ModelConfig.from_dir(smollm2_dir)  # 9 heads, 3 KV heads
    msg = r"9 attention heads, not a multiple of 2; use --tp 1 or 3 or 9"
    with pytest.raises(TensorParallelError, match=msg):
        check_tp(cfg, 2)
    check_tp(cfg, 3)
    with pytest.raises(TensorParallelError, match="cannot split this model's 3 KV heads"):
        check_tp(dataclasses.replace(cfg, num_heads=12), 4)


def test_balanced_split() -> None:
    assert balanced_split(8, 2) == [(0, 4), (4, 8)]
    # Llama-2-7B's intermediate size at tp 4 in whole 128-row int4 chunks: 22, 22, 21, 21 chunks
    assert balanced_split(11008, 4, 128) == [(0, 2816), (2816, 5632), (5632, 8320), (8320, 11008)]
    assert vocab_range(10, 2, 3) == (8, 10, 4)
    with pytest.raises(TensorParallelError, match="some GPU would get none"):
        balanced_split(256, 4, 128)
    with pytest.raises(TensorParallelError, match="whole units"):
        balanced_split(100, 2, 64)


# --------------------------------------------------------------------------------------------- linears


def test_float_linear_shards_recompose() -> None:
    torch.manual_seed(0)
    full = nn.Linear(24, 40, bias=True)
    x = torch.randn(5, 24)
    with torch.no_grad():
        cols = [select_out_features(full, [(0, 8), (20, 30)]), select_out_features(full, [(8, 20), (30, 40)])]
        a, b = cols[0](x), cols[1](x)
        torch.testing.assert_close(torch.cat([a[:, :8], b[:, :12], a[:, 8:], b[:, 12:]], -1), full(x))
        rows = [select_in_features(full, a, b, keep_bias=a == 0) for a, b in ((0, 10), (10, 24))]
        torch.testing.assert_close(rows[0](x[:, :10]) + rows[1](x[:, 10:]), full(x))
    assert rows[1].bias is None and cols[0].weight.data_ptr() != full.weight.data_ptr()


def _int4(make_packed, k: int, n: int, g: int, in_features: int | None = None, bias: bool = False):
    p = make_packed(k, n, g, seed=k + n)
    b = torch.randn(n) if bias else None
    return Int4Linear(p["qweight"], p["sz"], p["zeros"], b, in_features)


@pytest.mark.parametrize("ranges", [[(32, 96)], [(0, 64), (128, 192)], [(16, 48), (100, 132)]])
def test_int4_column_shards_are_exact(make_packed, ranges) -> None:
    full = _int4(make_packed, 256, 192, 64, bias=True)
    shard = select_out_features(full, ranges)
    cols = torch.cat([torch.arange(a, b) for a, b in ranges])
    w = dequantize_packed(full.qweight, full.sz)
    assert torch.equal(dequantize_packed(shard.qweight, shard.sz), w[:, cols])
    assert torch.equal(shard.zeros, full.zeros[:, cols]) and torch.equal(shard.bias, full.bias[cols])


@pytest.mark.parametrize(
    "in_features,cuts", [(256, [0, 128, 256]), (256, [0, 64, 256]), (200, [0, 128, 200]), (200, [0, 64, 200])]
)
def test_int4_row_shards_sum_to_the_full_product(make_packed, in_features, cuts) -> None:
    """Cuts on 128-row chunks slice the packed words; cuts on group boundaries repack; the packer's K
    padding goes with the last shard."""
    full = _int4(make_packed, 256, 64, 64, in_features=in_features)
    x = torch.randn(3, in_features)
    spans = list(itertools.pairwise(cuts))
    shards = [select_in_features(full, a, b) for a, b in spans]
    got = sum(s(x[:, a:b]) for s, (a, b) in zip(shards, spans, strict=True))
    torch.testing.assert_close(got, full(x), rtol=1e-5, atol=1e-4)
    w = dequantize_packed(full.qweight, full.sz)
    for s, (a, b) in zip(shards, spans, strict=True):
        assert s.in_features == b - a and s.packed_k % 128 == 0
        assert torch.equal(dequantize_packed(s.qweight, s.sz)[: b - a], w[a:b])


def test_int4_row_cut_inside_a_group_is_refused(make_packed) -> None:
    full = _int4(make_packed, 256, 64, 128)
    with pytest.raises(TensorParallelError, match="inside a quantization group of 128"):
        select_in_features(full, 64, 256)


# ------------------------------------------------------------------------------------------ whole model


def _sharded_logits(model: CausalLM, ids: torch.Tensor, world: int) -> list[torch.Tensor]:
    def rank(comm) -> torch.Tensor:
        local = copy.deepcopy(model)
        cfg = shard_model(local, model.config, comm)
        assert cfg.num_heads == model.config.num_heads // world
        with torch.no_grad():
            return local(ids)

    return run_ranks(world, rank)


@pytest.mark.parametrize(
    "family,overrides,world",
    [
        ("llama", {}, 2),  # 4 heads / 2 KV heads
        ("llama", {"num_key_value_heads": 1, "vocab_size": 321, "tie_word_embeddings": True}, 2),
        ("qwen2", {"num_key_value_heads": 2, "intermediate_size": 200}, 4),  # q/k/v biases, KV replicated
        ("llama", {"attention_bias": True, "mlp_bias": True}, 2),  # o/down biases: added once
    ],
)
def test_sharded_model_matches_unsharded(tmp_path, make_tiny_model, family, overrides, world) -> None:
    path = make_tiny_model(tmp_path / family, family, initializer_range=0.2, **overrides)
    model = CausalLM.from_checkpoint(Checkpoint(path))
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    for logits in _sharded_logits(model, ids, world):
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    local = copy.deepcopy(model)
    shard_model(local, model.config, ThreadComm(world).rank(1))
    assert isinstance(local.model.layers[0].mlp.down_proj, RowParallel)
    if overrides.get("tie_word_embeddings"):
        assert local.lm_head.weight is local.model.embed_tokens.weight


def test_sharded_fused_int4_model_matches_unsharded(tmp_path, make_tiny_model) -> None:
    """A packed artifact served as int4 (fused q/k/v and gate/up Int4Linear), split two ways; the MLP's
    384 features are three 128-row chunks, so the ranks get 256 and 128."""
    from lmkiln.engine import load_model
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.pack import pack_checkpoint
    from lmkiln.quant.rtn import QuantSpec

    src = make_tiny_model(tmp_path / "q", "qwen2", hidden_size=256, intermediate_size=384,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    awq = rtn_quantize(src, tmp_path / "awq", QuantSpec(4, 64), progress=False)
    loaded = load_model(pack_checkpoint(awq, tmp_path / "packed"), int4="on")
    model = loaded.model
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int4Linear)
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    for logits in _sharded_logits(model, ids, 2):
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    local = copy.deepcopy(model)
    shard_model(local, model.config, ThreadComm(2).rank(1))
    attn, mlp = local.model.layers[0].self_attn, local.model.layers[0].mlp
    assert attn.qkv_proj.out_features == 2 * 64 + 2 * 64 and attn.qkv_sizes == [128, 64, 64]
    assert mlp.gate_up_proj.out_features == 2 * 128 and mlp.down_proj.inner.in_features == 128
