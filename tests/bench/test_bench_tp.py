"""``lmkiln bench tp`` at toy scale on the CPU (gloo ranks): random int4 shards built by each rank."""

from __future__ import annotations

import json

import pytest

from lmkiln.bench.tp import SHAPES, weight_bytes
from lmkiln.cli import main


def test_bench_tp_runs_tp1_and_tp2_on_the_cpu(tmp_path, capsys, one_torch_thread) -> None:
    args = ["--out", str(tmp_path), "--device", "cpu", "--shape", "tiny", "--tp", "1", "2",
            "--weights", "int4", "--batch-sizes", "1", "2", "--prompt-len", "8", "--output-len", "4",
            "--num-requests", "4", "--throughput-prompt-len", "8", "--throughput-output-len", "4",
            "--max-num-seqs", "4"]
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "tp", *args])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "tp.json").read_text())
    rows = {r["tp"]: r for r in report["results"]}
    assert set(rows) == {1, 2} and report["nvls"] == "off"
    for r in rows.values():
        assert [d["batch"] for d in r["decode"]] == [1, 2] and all(d["decode_tok_s"] > 0 for d in r["decode"])
        assert r["throughput"]["num_requests"] == 4 and r["throughput"]["output_tok_s"] > 0
    assert rows[2]["speedup_vs_tp"] == 1 and set(rows[2]["decode_speedup"]) == {"1", "2"}
    assert rows[2]["weight_bytes_per_gpu"] < rows[1]["weight_bytes_per_gpu"]  # each rank: half the linears
    out = capsys.readouterr().out
    assert "| tiny | int4 | 2 |" in out and (tmp_path / "tp.md").is_file()


def test_weight_estimates_say_when_tp_is_needed() -> None:
    """Llama-2-70B in fp16 is ~129 GiB: too much for one or two 80 GB cards, a quarter fits; int4 fits one."""
    gib, fp16 = 2**30, "float16"
    assert weight_bytes(SHAPES["70b"], "float16", 1) / gib == pytest.approx(128.5, rel=0.02)
    assert weight_bytes(SHAPES["70b"], fp16, 2) > 0.8 * 80 * gib > weight_bytes(SHAPES["70b"], fp16, 4)
    assert weight_bytes(SHAPES["70b"], "int4", 1) < 0.8 * 80 * gib
    assert weight_bytes(SHAPES["7b"], "float16", 1) / gib == pytest.approx(12.55, rel=0.02)
