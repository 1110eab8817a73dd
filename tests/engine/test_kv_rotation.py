"""The int4 KV cache's Hadamard rotation: exact in math, and it cuts the quantization error of K with
outlier channels (the reason it exists)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmkiln.engine.attention import AttentionMetadata, TorchAttentionBackend
from lmkiln.engine.errors import EngineConfigError
from lmkiln.engine.kv_cache import KVCache, hadamard_matrix


def test_hadamard_is_orthonormal_and_symmetric() -> None:
    for n in (1, 2, 16, 64, 128):
        h = hadamard_matrix(n, torch.float64)
        assert torch.allclose(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(h, h.T)
    with pytest.raises(EngineConfigError, match="power-of-two"):
        hadamard_matrix(48)


def test_only_the_int4_cache_is_rotated() -> None:
    caches = {q: KVCache(2, 4, 8, 2, 32, torch.float32, "cpu", quant_policy=q) for q in (0, 8, 4)}
    assert caches[0][0].rotation is None and caches[8][0].rotation is None
    assert torch.equal(caches[4][0].rotation, hadamard_matrix(32))
    # head_dim not a power of two: no rotation (and still a working cache)
    assert KVCache(1, 4, 8, 2, 48, torch.float32, "cpu", quant_policy=4)[0].rotation is None


def _prefill(cache, q, k, v) -> torch.Tensor:
    """One sequence of ``len(q)`` tokens prefilled from scratch into blocks 0.. of ``cache``."""
    t, bs = q.shape[0], cache.k.shape[1]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t),
        block_tables=torch.arange(-(-t // bs), dtype=torch.int32)[None],
        query_start_loc=torch.tensor([0, t], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        max_query_len=t,
        max_seq_len=t,
    )
    return TorchAttentionBackend().forward(q, k, v, cache, meta, q.shape[-1] ** -0.5)


def _qkv(t: int = 96, hq: int = 4, hk: int = 2, d: int = 64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hk, hk))
    k[..., :3] += 12.0 * torch.randn(1, hk, 3, generator=gen)  # a few large channels, as real keys have
    return q, k, v


def test_rotation_is_exact_without_quantization() -> None:
    q, k, v = _qkv()
    plain = KVCache(1, 4, 32, 2, 64, torch.float64, "cpu")[0]
    rotated = dataclasses.replace(
        KVCache(1, 4, 32, 2, 64, torch.float64, "cpu")[0], rotation=hadamard_matrix(64, torch.float64)
    )
    q, k, v = q.double(), k.double(), v.double()
    torch.testing.assert_close(
        _prefill(rotated, q, k, v), _prefill(plain, q, k, v), rtol=1e-4, atol=1e-5
    )  # the reference attends in fp32


def test_rotation_cuts_int4_error_on_outlier_keys() -> None:
    q, k, v = _qkv()
    exact = _prefill(KVCache(1, 4, 32, 2, 64, torch.float32, "cpu")[0], q, k, v)
    with_rot = KVCache(1, 4, 32, 2, 64, torch.float32, "cpu", quant_policy=4)[0]
    without = dataclasses.replace(
        KVCache(1, 4, 32, 2, 64, torch.float32, "cpu", quant_policy=4)[0], rotation=None
    )
    err_rot = (_prefill(with_rot, q, k, v) - exact).norm() / exact.norm()
    err_plain = (_prefill(without, q, k, v) - exact).norm() / exact.norm()
    assert err_rot < 0.6 * err_plain, (err_rot, err_plain)
