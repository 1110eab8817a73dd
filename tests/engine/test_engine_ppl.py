"""Perplexity through the engine's paged forward equals lmkiln.eval.ppl on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from lmkiln.engine import LLMEngine, load_model
from lmkiln.engine.config import EngineConfig
from lmkiln.eval.engine_ppl import engine_perplexity, evaluate_engine
from lmkiln.eval.ppl import perplexity


@pytest.fixture()
def packed_qwen(tmp_path, make_tiny_model):
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.pack import pack_checkpoint
    from lmkiln.quant.rtn import QuantSpec

    tmp = tmp_path
    src = make_tiny_model(tmp / "qwen", "qwen2", seed=1)
    return pack_checkpoint(rtn_quantize(src, tmp / "awq", QuantSpec(4, 64), progress=False), tmp / "packed")


def _windows(n: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_engine_ppl_equals_eval_ppl(packed_qwen) -> None:
    loaded = load_model(packed_qwen, int4="off")  # the dequantized weights lmkiln.eval.ppl scores too
    windows = _windows(5, 40, loaded.config.vocab_size)
    want = perplexity(loaded.model, windows, progress=False)
    cfg = EngineConfig(packed_qwen, block_size=8, cache_max_entry_count=12)  # 2 windows at a time
    eng = LLMEngine(cfg, loaded=loaded)
    for chunk in (40, 16, 7):  # one chunk, and chunks attending over earlier ones in the paged cache
        assert engine_perplexity(eng, windows, chunk=chunk) == pytest.approx(want, rel=1e-3)
    assert eng.block_manager.num_free_blocks == 12
    on = load_model(packed_qwen, int4="on")  # the int4 linears score the same
    assert engine_perplexity(LLMEngine(cfg, loaded=on), windows, chunk=16) == pytest.approx(want, rel=1e-3)


def test_kv_quantization_cost_and_report(packed_qwen) -> None:
    loaded = load_model(packed_qwen, int4="off")
    windows = {"random": _windows(3, 64, loaded.config.vocab_size)}
    ref = {"results": {"random": {"awq": perplexity(loaded.model, windows["random"], progress=False)}}}
    report = evaluate_engine(packed_qwen, windows, (0, 8, 4), chunk=16, reference=ref, loaded=loaded)
    r = report["results"]["random"]
    assert r["kv0"] == pytest.approx(ref["results"]["random"]["awq"], rel=1e-3)
    assert r["kv8"] != r["kv0"] and r["kv4"] != r["kv8"]  # the quantized cache is what later chunks read
    assert abs(r["kv8"] / r["kv0"] - 1) < 0.005 and math.isfinite(r["kv4"])
    checks = report["checks"]
    assert checks["random"]["rel_diff_vs_eval"] == pytest.approx(0, abs=1e-3)
    assert checks["passed"] == (checks["random"]["kv4_increase"] <= 0.03)
    bad = evaluate_engine(packed_qwen, windows, (0,), chunk=16, loaded=loaded,
                          reference={"results": {"random": {"awq": r["kv0"] * 1.5}}})
    assert not bad["checks"]["passed"] and "eval/ppl.json" in bad["checks"]["failures"][0]
