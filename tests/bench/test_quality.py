"""``lmkiln bench quality``: next-token agreement with the reference and model sizes, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from lmkiln.bench.quality import agreement, describe_device, disk_bytes, main, run, tensor_bytes


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama_dir):
    """An RTN int4 artifact of the tiny model in the AWQ format (g64), and its packed layout."""
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.pack import pack_checkpoint
    from lmkiln.quant.rtn import QuantSpec

    root = tmp_path_factory.mktemp("quality")
    awq = rtn_quantize(tiny_llama_dir, root / "awq", QuantSpec(4, 64))
    packed = pack_checkpoint(awq, root / "packed")
    return tiny_llama_dir, awq, packed


def _windows(n: int, length: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_agreement_of_a_model_with_itself_and_with_another(make_tiny_model, tmp_path, tiny_llama_dir):
    from lmkiln.engine.loader import load_model

    ref = load_model(tiny_llama_dir, "cpu").model
    other = load_model(make_tiny_model(tmp_path / "other", seed=1), "cpu").model
    w = _windows(3, 33)
    same = agreement(ref, ref, w, batch_size=2)
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6 and same["positions"] == 3 * 32
    diff = agreement(ref, other, w, batch_size=2)
    assert diff["top1"] < 0.5 and diff["kl"] > 0.01


def test_run_compares_rtn_awq_and_packed(artifacts):
    model, awq, packed = artifacts
    report = run(model, awq, packed, {"a": _windows(4, 64), "b": _windows(2, 64, seed=1)}, batch_size=3)
    assert report["device_type"] == "cpu" and "CPU" in report["device"]
    assert report["protocol"] == {"a": {"windows": 4, "window_len": 64},
                                  "b": {"windows": 2, "window_len": 64}}
    for text in ("a", "b"):
        r = report["agreement"][text]
        assert set(r) == {"rtn", "awq", "packed"}
        # the artifact *is* RTN of the reference: all three are the same int4 weights
        assert 0.5 < r["awq"]["top1"] < 1.0 and r["awq"]["kl"] > 0
        assert r["rtn"]["top1"] == pytest.approx(r["awq"]["top1"], abs=0.02)
        assert r["packed"]["top1"] == pytest.approx(r["awq"]["top1"], abs=0.01)
        assert r["packed"]["kl"] == pytest.approx(r["awq"]["kl"], rel=1e-3)
    sizes = report["sizes"]
    assert sizes["fp16"]["disk_bytes"] == disk_bytes(model)
    # int4 weights take far less disk than the fp32 checkpoint; on the CPU both load as fp32 tensors
    assert sizes["packed"]["disk_bytes"] < sizes["fp16"]["disk_bytes"] / 2
    assert sizes["awq"]["memory_bytes"] == sizes["fp16"]["memory_bytes"] > 0


def test_tensor_bytes_counts_tied_weights_once() -> None:
    lin = torch.nn.Linear(8, 4, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.Linear(8, 4, bias=False))
    model[1].weight = lin.weight
    assert tensor_bytes(model) == 8 * 4 * 4


def test_cli_writes_json_and_refuses_bad_input(artifacts, tmp_path, capsys) -> None:
    model, awq, _ = artifacts
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "words.txt").write_text(" ".join(f"w{i % 97}" for i in range(3000)))
    out = tmp_path / "q.json"
    args = [str(model), "--awq", str(awq), "--texts", str(text_dir / "words.txt"), "--tokens", "256",
            "--window", "128", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["device"] == describe_device("cpu")
    assert set(report["agreement"][str(text_dir / "words.txt")]) == {"rtn", "awq"}
    assert "top-1" in capsys.readouterr().out
    assert main([*args[:-2], "--window", "4096", "--out", str(tmp_path / "x.json")]) == 2  # text too short
    assert not (tmp_path / "x.json").exists()
