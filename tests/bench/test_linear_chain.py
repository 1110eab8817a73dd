"""The decode-chain benchmark's CPU-side behaviour: a clear error without a GPU, and its table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmkiln.bench.linear_chain import format_sweep, format_table, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--m", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "linear_chain.json").exists()
    assert main(["--sweep", "--out", str(tmp_path), "--m", "1"]) == 2
    assert "--sweep needs a CUDA GPU" in capsys.readouterr().err


def test_format_table_lists_every_m_and_marks_missing_baselines() -> None:
    report = {"device": "X", "layers": 32, "rows": [
        {"m": 1, "ours": 2.093, "fp16": 5.025, "tinygemm": 1.998, "floor_ms": 1.148},
        {"m": 4, "ours": 2.911, "floor_ms": 1.152},
    ]}
    lines = format_table(report).splitlines()
    assert lines[-2] == "| 1 | 2.093 | 5.025 | 1.998 | 1.148 |"
    assert lines[-1] == "| 4 | 2.911 | - | - | 1.152 |"


def test_sweep_table_shows_best_current_and_baselines() -> None:
    cfg = {"kind": "fma", "block_n": 64, "num_warps": 2, "split_k": 16, "chunks": 2, "flush": 1}
    rows = [{"config": cfg, "us": 8.34}, {"config": dict(cfg, split_k=8), "us": 9.5, "current": True}]
    report = {"device": "X", "layers": 24, "shapes": {"o": {"1": {
        "floor_us": 2.98, "tinygemm_us": 7.11, "rows": rows}}}}
    last = format_sweep(report).splitlines()[-1]
    assert last == "| o | 1 | 8.34 | 9.50 | 7.11 | 2.98 | fma bn64 w2 s16 c2 f1 |"


def test_tune_candidates_include_the_chain_winners() -> None:
    """The M=1 configs that won in a whole-forward chain on the H100 are among ``--tune``'s candidates."""
    from lmkiln.bench.kernels import candidate_configs

    got = {(c.block_n, c.num_warps, c.chunks, c.flush, c.split_k) for c in candidate_configs(1, 4096, 4096)}
    assert (64, 2, 2, 1, 16) in got and (64, 2, 2, 1, 8) in got
    down = {(c.block_n, c.num_warps, c.chunks, c.split_k) for c in candidate_configs(1, 4096, 11008)}
    assert (64, 2, 2, 22) in down  # 86 chunks: 21 programs of four, one of two
