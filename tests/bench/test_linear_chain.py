"""The decode-chain benchmark's CPU-side behaviour: a clear error without a GPU, and its table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmkiln.bench.linear_chain import format_table, main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--m", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "linear_chain.json").exists()


def test_format_table_lists_every_m_and_marks_missing_baselines() -> None:
    report = {"device": "X", "layers": 32, "rows": [
        {"m": 1, "ours": 2.093, "fp16": 5.025, "tinygemm": 1.998, "floor_ms": 1.148},
        {"m": 4, "ours": 2.911, "floor_ms": 1.152},
    ]}
    lines = format_table(report).splitlines()
    assert lines[-2] == "| 1 | 2.093 | 5.025 | 1.998 | 1.148 |"
    assert lines[-1] == "| 4 | 2.911 | - | - | 1.152 |"
