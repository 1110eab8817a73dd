"""The decode-step profile on the CPU: every step's wall time splits into the forward+sampling span and the
host gap."""

from __future__ import annotations

import json
from pathlib import Path

from lmkiln.bench.step_profile import _GcPauses, main


def test_step_profile_cpu_tiny(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "sp"
    assert main([str(tiny_llama_dir), "--out", str(out), "--device", "cpu", "--batch-sizes", "1", "3",
                 "--prompt-len", "8", "--steps", "5", "--max-num-seqs", "4", "--session-len", "40"]) == 0
    report = json.loads((out / "step_profile.json").read_text())
    assert report["session_len"] == 40 and report["max_num_seqs"] == 4
    rows = report["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["steps"] == 5 and 0 < r["gpu_span_ms"] <= r["wall_ms"]
        assert abs(r["wall_ms"] - r["gpu_span_ms"] - r["host_gap_ms"]) < 1e-9 and 0 < r["gpu_busy_frac"] <= 1
        assert r["wall_ms"] <= r["wall_p90_ms"] <= r["wall_p99_ms"] <= r["wall_max_ms"]
        assert r["wall_mean_ms"] <= r["wall_max_ms"] and r["gc_pause_ms"] >= 0
        assert set(r["gc_collections"]) == {"gen0", "gen1", "gen2"} and r["pinned_allocs"] is None  # CPU
        assert all(0 <= i < 5 and w > 2 * r["wall_ms"] for i, w, _ in r["slow_steps"])


def test_gc_pauses_counts_a_full_collection() -> None:
    import gc

    with _GcPauses() as pauses:
        gc.collect()
    assert pauses.count[2] == 1 and pauses.ms[2] > 0
    assert pauses._cb not in gc.callbacks
