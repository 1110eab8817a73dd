"""AWQ, RTN and calibration on small checkpoints written by transformers."""

from __future__ import annotations

import json

import pytest
import torch

from lmkiln.artifact import read_manifest
from lmkiln.errors import ArtifactError, QuantConfigError
from lmkiln.models import CausalLM, Checkpoint
from lmkiln.quant.awq import (
    AWQConfig,
    _Group,
    awq_quantize,
    group_grams,
    rtn_quantize,
    search_clip,
    search_scales,
    search_scales_gram,
)
from lmkiln.quant.calibrate import calibrate, load_act_stats
from lmkiln.quant.rtn import QuantSpec, fake_quantize

SPEC = QuantSpec(4, 64)


def _tokens(seed=0, n=6, t=64):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def stats(tmp_path_factory, tiny_llama_dir):
    path = tmp_path_factory.mktemp("calib") / "act_stats.safetensors"
    calibrate(tiny_llama_dir, _tokens(), path, {"dataset": "random", "seed": 0}, device="cpu")
    return path


def test_calibration_stats(stats, tiny_llama_dir):
    tensors, header = load_act_stats(stats)
    assert header["samples"] == 6 and header["seqlen"] == 64 and header["tokens"] == 384
    assert header["model_hash"] == Checkpoint(tiny_llama_dir).source_hash()
    # 2 layers x 7 linears x (absmean, absmax)
    assert len(tensors) == 28
    mean, mx = tensors["model.layers.1.mlp.down_proj.absmean"], tensors["model.layers.1.mlp.down_proj.absmax"]
    assert mean.shape == (256,) and mean.dtype == torch.float32
    assert bool((mx >= mean).all()) and bool((mean > 0).all())


def test_stats_match_a_direct_computation(stats, tiny_llama_dir):
    """absmean of q_proj's input in layer 0 equals |rmsnorm(embed(x))| averaged over all tokens."""
    tensors, _ = load_act_stats(stats)
    model = CausalLM.from_checkpoint(Checkpoint(tiny_llama_dir))
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(_tokens()))
    expect = x.abs().reshape(-1, x.shape[-1]).mean(0)
    got = tensors["model.layers.0.self_attn.q_proj.absmean"]
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def _k_means(model: CausalLM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the mean of K after RoPE over ``tokens`` (positions 0..T-1), through ``model``."""
    from lmkiln.models.llama import apply_rotary

    cfg, out, hooks = model.config, [], []
    n, t = tokens.shape
    cos, sin = model.rotary(torch.arange(t)[None], torch.float32)

    def hook(mod, args, k):
        k = k.reshape(n, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        out.append(apply_rotary(k, cos, sin).mean(dim=(0, 2)))

    hooks = [layer.self_attn.k_proj.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return out


def test_kv_stats_are_the_served_models_k_means(tmp_path, tiny_llama_dir, stats):
    """kv_stats.safetensors: K means of the *quantized* model (as served from the AWQ dir) on the calibration
    windows; they differ from the fp model's. They travel on into the packed dir."""
    from lmkiln.engine.loader import load_model
    from lmkiln.quant.kv_stats import KV_STATS_FILE, load_kv_stats
    from lmkiln.quant.pack import pack_checkpoint

    cfg = AWQConfig(spec=SPEC, search_tokens=128, stat_tokens=256)
    awq = awq_quantize(tiny_llama_dir, stats, _tokens(), tmp_path / "awq", cfg, device="cpu", progress=False)
    means = load_kv_stats(awq, 2, 2, 32)
    assert means is not None and KV_STATS_FILE in read_manifest(awq, kind="awq")["files"]
    served = _k_means(load_model(awq, "cpu", "float32").model, _tokens())
    fp = _k_means(CausalLM.from_checkpoint(Checkpoint(tiny_llama_dir)), _tokens())
    for got, want, ref in zip(means, served, fp, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
        assert (got - ref).abs().max() > 10 * (got - want).abs().max()
    packed = pack_checkpoint(awq, tmp_path / "packed")
    assert KV_STATS_FILE in read_manifest(packed, kind="packed")["files"]


def test_search_beats_rtn_on_salient_channels():
    """A few large activation channels (as in LLMs): scaling their weights up cuts the output error."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(256, 128)
    x[:, [3, 70, 100]] *= 30
    ref = lin(x).detach()
    rtn_loss = (x @ fake_quantize(lin.weight.data, SPEC).t() - ref).pow(2).mean()
    g = _Group(prev=torch.nn.Identity(), linears=[lin], inspect=lin, key="")
    s, ratio = search_scales(g, x, x.abs().mean(0), AWQConfig(spec=SPEC))
    awq_loss = (x @ (fake_quantize(lin.weight.data * s, SPEC) / s).t() - ref).pow(2).mean()
    assert ratio > 0
    assert awq_loss < rtn_loss * 0.7
    # The Gram form of the same search picks the same scales.
    s2, ratio2 = search_scales_gram(lin, x.T @ x / x.shape[0], x.abs().mean(0), AWQConfig(spec=SPEC))
    assert ratio2 == ratio
    torch.testing.assert_close(s2, s)


def test_clip_search_reduces_output_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 3] *= 12  # one outlier per row widens every first group's range
    x = torch.randn(200, 128)
    mx = search_clip(w, group_grams(x, 64), AWQConfig(spec=SPEC))
    assert mx.shape == (32, 2) and bool((mx <= w.view(32, 2, 64).abs().amax(-1)).all())
    clipped = torch.maximum(torch.minimum(w.view(32, 2, 64), mx[..., None]), -mx[..., None]).view(32, 128)
    err = lambda ww: (x @ fake_quantize(ww, SPEC).t() - x @ w.t()).pow(2).mean()  # noqa: E731
    assert err(clipped) <= err(w)


def test_awq_artifact_is_autoawq_gemm_and_deterministic(tmp_path, tiny_llama_dir, stats):
    cfg = AWQConfig(spec=SPEC, search_tokens=128, stat_tokens=256)
    a = awq_quantize(tiny_llama_dir, stats, _tokens(), tmp_path / "a", cfg, device="cpu", progress=False)
    b = awq_quantize(tiny_llama_dir, stats, _tokens(), tmp_path / "b", cfg, device="cpu", progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    config = json.loads((a / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True,
        "modules_to_not_convert": None}
    manifest = read_manifest(a, kind="awq")
    assert manifest["format"] == "awq-gemm" and "model.safetensors" in manifest["files"]
    from safetensors.torch import load_file

    t = load_file(str(a / "model.safetensors"))
    assert t["model.layers.0.mlp.down_proj.qweight"].shape == (256, 128 // 8)
    assert t["model.layers.0.mlp.down_proj.qzeros"].shape == (256 // 64, 128 // 8)
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (4, 128)
    assert t["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    assert not any(k.endswith("_proj.weight") for k in t)


def test_awq_model_is_close_to_reference(tmp_path, tiny_llama_dir, stats):
    out = awq_quantize(tiny_llama_dir, stats, _tokens(), tmp_path / "awq", AWQConfig(spec=SPEC),
                       device="cpu", progress=False)
    rtn = rtn_quantize(tiny_llama_dir, tmp_path / "rtn", SPEC, progress=False)
    ids = _tokens(seed=5, n=4)
    with torch.no_grad():
        ref = CausalLM.from_checkpoint(Checkpoint(tiny_llama_dir))(ids).log_softmax(-1)
        kl = {}
        for name, d in (("awq", out), ("rtn", rtn)):
            q = CausalLM.from_checkpoint(Checkpoint(d))(ids).log_softmax(-1)
            kl[name] = (ref.exp() * (ref - q)).sum(-1).mean().item()
    assert 0 < kl["awq"] < 0.05 and 0 < kl["rtn"] < 0.05


def test_fast_path_without_search(tmp_path, tiny_llama_dir, stats):
    out = awq_quantize(tiny_llama_dir, stats, _tokens(), tmp_path / "fast",
                       AWQConfig(spec=SPEC, search_scale=False), device="cpu", progress=False)
    ratios = read_manifest(out)["scale_ratios"]
    assert set(ratios["0"].values()) == {0.5}


def test_group_size_must_divide_k(tmp_path, make_tiny_model, stats):
    model = make_tiny_model(tmp_path / "m", hidden_size=96, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(QuantConfigError, match="not divisible by group size 64"):
        awq_quantize(model, stats, _tokens(), tmp_path / "out", AWQConfig(spec=SPEC), device="cpu")
    assert not (tmp_path / "out").exists()


def test_stats_of_another_model_are_refused(tmp_path, make_tiny_model, stats):
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ArtifactError, match="another checkpoint"):
        awq_quantize(other, stats, _tokens(), tmp_path / "out", AWQConfig(spec=SPEC), device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits,group,match", [(3, 64, "--w-bits 3"), (8, 128, "--w-bits 8"),
                                              (4, 96, "--w-group-size 96")])
def test_bad_quant_spec(bits, group, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantSpec(bits, group)


def test_interrupted_write_leaves_previous_artifact(tmp_path, tiny_llama_dir, stats, monkeypatch):
    out = rtn_quantize(tiny_llama_dir, tmp_path / "rtn", SPEC, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import lmkiln.quant.awq as awq_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(awq_mod, "write_manifest", boom)
    with pytest.raises(Exception, match=r"No space left|out of disk space"):
        rtn_quantize(tiny_llama_dir, out, QuantSpec(4, 32), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
