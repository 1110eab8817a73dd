"""``lmkiln bench engine`` and ``lmkiln eval ppl-engine`` at tiny scale on the CPU, and the synthetic
checkpoint builder (random fp16 HF dir + its RTN int4 packed artifact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmkiln.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_engine_cpu_tiny(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "bench"
    args = ["bench", "engine", str(tiny_llama_dir), "--out", str(out), "--device", "cpu",
            "--batch-sizes", "1", "4", "--prompt-len", "16", "--output-len", "8",
            "--num-requests", "6", "--throughput-prompt-len", "16", "--throughput-output-len", "8",
            "--quant-policy", "0", "8", "--session-turns", "3", "--session-turn-len", "8",
            "--session-output-len", "4", "--decode-quant-policy", "0", "4"]
    with pytest.raises(SystemExit) as exit_:
        cli(args)
    assert exit_.value.code == 0
    report = json.loads((out / "engine.json").read_text())
    assert (out / "engine.png").stat().st_size > 1000
    ours = report["decode"]["ours-fp"]
    assert [r["batch"] for r in ours] == [1, 4] and all(r["decode_tok_s"] > 0 for r in ours)
    for r in ours:  # 7 decode steps after the first token: their times, one by one
        assert 0 < r["step_ms_p50"] <= r["step_ms_p99"] <= r["step_ms_max"]
    assert [r["batch"] for r in report["decode"]["hf-float32"]] == [1, 4]
    kv4 = report["decode"]["ours-fp-kv4"]  # the same sweep over an int4 KV cache
    assert [r["batch"] for r in kv4] == [1, 4] and all(r["decode_tok_s"] > 0 for r in kv4)
    assert set(report["ratios"]) == {"ours-fp/hf-float32", "ours-fp-kv4/hf-float32"}
    for q in ("kv0", "kv8"):
        t = report["throughput"][q]
        assert t["num_requests"] == 6 and t["output_tok_s"] > 0 and t["ttft_ms"]["p99"] >= t["ttft_ms"]["p50"]
    turns = report["session"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["cached_tokens"] == 0 and turns[2]["cached_tokens"] >= 2 * (8 + 4) - 1  # KV kept


def test_synthetic_builder_is_rtn_of_the_hf_weights(tmp_path: Path) -> None:
    from lmkiln.bench.engine import build_synthetic
    from lmkiln.engine import load_model
    from lmkiln.models.checkpoint import Checkpoint
    from lmkiln.quant.rtn import QuantSpec, fake_quantize

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    hf, packed = build_synthetic(tmp_path, shape, group_size=64)
    assert build_synthetic(tmp_path, shape, group_size=64) == (hf, packed)  # reused
    off = load_model(packed, int4="off", verify=True)
    ckpt = Checkpoint(hf)
    for name in ("self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"):
        w = ckpt.get(f"model.layers.1.{name}.weight", torch.float32)
        got = off.model.get_submodule(f"model.layers.1.{name}").weight
        # the packed zero term m = fp16(-z * s) rounds by ~1e-5; one code off would be ~s ~ 5e-3
        torch.testing.assert_close(got, fake_quantize(w, QuantSpec(4, 64)), atol=1e-4, rtol=0)
    on = load_model(packed, int4="on")
    ids = torch.tensor([[5, 9, 200, 3, 17]])
    with torch.no_grad():
        torch.testing.assert_close(on.model(ids), off.model(ids), atol=1e-4, rtol=1e-4)


def test_eval_ppl_engine_cli(tmp_path: Path, tiny_llama_dir: Path) -> None:
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{(i * 7) % 300}" for i in range(400)))
    ref = tmp_path / "ppl.json"
    ref.write_text(json.dumps({"results": {str(text): {"reference": 1.0}}}))
    out = tmp_path / "engine_ppl.json"
    args = ["eval", "ppl-engine", str(tiny_llama_dir), "--texts", str(text), "--tokens", "192",
            "--window", "64", "--quant-policy", "0", "8", "--chunk", "32", "--device", "cpu",
            "--out", str(out),
            "--reference", str(ref)]
    assert cli(args) == 0  # not --strict: the failed check is reported, not fatal
    report = json.loads(out.read_text())
    r = report["results"][str(text)]
    assert set(r) == {"kv0", "kv8"} and r["kv0"] > 1.0
    assert report["protocol"][str(text)] == {"windows": 3, "window_len": 64}
    assert not report["checks"]["passed"]
    assert cli([*args, "--strict"]) == 2
