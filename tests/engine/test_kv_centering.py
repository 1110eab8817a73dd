"""K centering of quantized KV caches: a calibrated per-channel K mean (``kv_stats.safetensors``) is
subtracted before quantizing. Exact for attention in math (each query's scores move by one constant), and
it cuts the quantization error of keys whose channels carry large means (the reason it exists)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lmkiln.kernels.attention_ref import quantize_kv_ref, write_kv_ref

from lmkiln.engine import LLMEngine, load_model
from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import EngineConfigError
from lmkiln.engine.kv_cache import KVCache, hadamard_matrix
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.errors import ArtifactError
from lmkiln.quant.kv_stats import KV_STATS_FILE, file_key, load_kv_stats, write_kv_stats

from .test_kv_rotation import _prefill


def _qkv(t: int = 96, hq: int = 4, hk: int = 2, d: int = 64):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hk, hk))
    mean = 4.0 * torch.randn(hk, d, generator=gen)  # keys with large per-channel means, as real keys have
    return q, k + mean, v, mean


def test_centering_cuts_the_quantization_error() -> None:
    q, k, v, mean = _qkv()
    exact = _prefill(KVCache(1, 4, 32, 2, 64, torch.float32, "cpu")[0], q, k, v)
    errs = {}
    for bits in (8, 4):
        plain = KVCache(1, 4, 32, 2, 64, torch.float32, "cpu", quant_policy=bits)
        centered = KVCache(1, 4, 32, 2, 64, torch.float32, "cpu", quant_policy=bits, k_offsets=[mean])
        for name, cache in (("plain", plain), ("centered", centered)):
            out = _prefill(cache[0], q, k, v)
            errs[bits, name] = ((out - exact).norm() / exact.norm()).item()
    assert errs[4, "centered"] < 0.6 * errs[4, "plain"], errs
    assert errs[8, "centered"] < 0.5 * errs[8, "plain"], errs


def test_offset_is_stored_in_the_cache_basis() -> None:
    mean = torch.randn(2, 32, dtype=torch.float64)
    caches = {q: KVCache(2, 4, 8, 2, 32, torch.float32, "cpu", q, k_offsets=[mean, -mean]) for q in (0, 8, 4)}
    assert caches[0][0].k_offset is None  # an unquantized cache has nothing to gain
    assert torch.equal(caches[8][1].k_offset, -mean.float())
    h = hadamard_matrix(32)
    torch.testing.assert_close(caches[4][0].k_offset, mean.float() @ h)  # rotated like K
    assert caches[4][0].k_offset.dtype == torch.float32 and caches[4][0].k_offset.is_contiguous()
    with pytest.raises(EngineConfigError, match="2 layers"):
        KVCache(1, 4, 8, 2, 32, torch.float32, "cpu", 8, k_offsets=[mean, mean])
    with pytest.raises(EngineConfigError, match="rebuild kv_stats"):
        KVCache(1, 4, 8, 2, 32, torch.float32, "cpu", 8, k_offsets=[mean[:1]])


def test_reference_write_subtracts_the_offset() -> None:
    _, k, v, mean = _qkv(t=5)
    cache = KVCache(1, 1, 8, 2, 64, torch.float32, "cpu", quant_policy=8)[0]
    write_kv_ref(k, v, cache.k, cache.v, torch.arange(5), cache.k_sz, cache.v_sz, 8, mean)
    codes, sz = quantize_kv_ref(k - mean, 8)
    assert torch.equal(cache.k[0, :5], codes) and torch.equal(cache.k_sz[0, :5], sz)
    plain = dataclasses.replace(KVCache(1, 1, 8, 2, 64, torch.float32, "cpu")[0])
    with pytest.raises(ValueError, match="quantized"):
        write_kv_ref(k, v, plain.k, plain.v, torch.arange(5), bits=0, k_offset=mean)


def test_kv_stats_file_round_trip_and_errors(tmp_path) -> None:
    means = [torch.randn(2, 16), torch.randn(2, 16)]
    write_kv_stats(tmp_path, {file_key(i): m for i, m in enumerate(means)}, {"tokens": 10})
    got = load_kv_stats(tmp_path, 2, 2, 16)
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, means, strict=True))
    assert load_kv_stats(tmp_path / "missing", 2, 2, 16) is None
    with pytest.raises(ArtifactError, match=r"k_mean is of shape \[2, 16\].*another model"):
        load_kv_stats(tmp_path, 2, 2, 32)
    with pytest.raises(ArtifactError, match=r"layers\.2\.self_attn\.k_mean is missing"):
        load_kv_stats(tmp_path, 3, 2, 16)
    (tmp_path / KV_STATS_FILE).write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_kv_stats(tmp_path, 2, 2, 16)


def test_engine_centers_quantized_caches_from_the_model_dir(tmp_path, make_tiny_model) -> None:
    src = make_tiny_model(tmp_path / "m", "llama", seed=3)
    loaded = load_model(src)
    cfg = loaded.config
    prompts = [[5, 9, 17, 3, 88, 41, 7, 7, 12], [100, 4, 6]]

    def greedy(loaded, policy):
        eng = LLMEngine(EngineConfig(src, block_size=8, cache_max_entry_count=16, quant_policy=policy),
                        loaded=loaded)
        outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
        return eng, [o.token_ids for o in outs]

    eng, plain = greedy(loaded, 8)
    assert eng.runner.kv_cache[0].k_offset is None
    # K means of the model's own keys (any values are exact in math; real ones come from calibration)
    means = [torch.randn(cfg.num_kv_heads, cfg.head_dim, generator=torch.Generator().manual_seed(i))
             for i in range(cfg.num_layers)]
    write_kv_stats(src, {file_key(i): m for i, m in enumerate(means)}, {})
    centered = load_model(src)
    assert torch.equal(centered.model.model.layers[1].self_attn.k_mean, means[1])
    eng, out = greedy(centered, 8)
    assert torch.equal(eng.runner.kv_cache[1].k_offset, means[1])
    assert out == plain  # int8 with or without the shift: same greedy tokens on a tiny model
    eng, _ = greedy(centered, 0)
    assert eng.runner.kv_cache[0].k_offset is None
