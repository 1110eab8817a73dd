"""``lmkiln bench kernels --tune`` bookkeeping on the CPU: candidates, compile keys, merged tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmkiln.bench.kernels import (
    _compile_key,
    candidate_configs,
    candidates_against,
    merge_entries,
    mma_t_candidates,
    write_tuned,
)
from lmkiln.errors import QuantConfigError

REPORT = {"torch": "t", "triton": "tr"}


def _entry(n: int, m_max: int, kind: str, us: float) -> dict:
    return {"n": n, "k": 4096, "group_size": 128, "dtype": "float16", "m_max": m_max, "us": us,
            "config": {"kind": kind, "block_m": 16, "block_n": 64}}


def test_mma_t_candidates_fit_the_shape_and_m() -> None:
    for m, n, k in ((16, 4096, 4096), (64, 22016, 4096), (256, 12288, 4096), (5, 4096, 11008)):
        cands = mma_t_candidates(m, n, k)
        assert cands and all(c.kind == "mma_t" for c in cands)
        assert all(n % c.block_n == 0 and 1 <= c.split_k <= k // 128 for c in cands)
        assert all(c.block_m >= 16 and c.block_m & (c.block_m - 1) == 0 for c in cands)
        if m <= 32:  # small M: one row tile, every weight read once
            assert {c.block_m for c in cands} == {max(16, 1 << (m - 1).bit_length())}
    # 22016 = 86 x 256: every column tile fits; 4096 / 256 too, 12288 / 256 too
    assert {c.block_n for c in mma_t_candidates(64, 22016, 4096)} == {64, 128, 256}
    assert any(c.kind == "mma_t" for c in candidate_configs(64, 4096, 4096))
    assert not any(c.kind == "mma_t" for c in candidate_configs(1, 4096, 4096))


def test_candidates_against_put_the_current_choice_first_once() -> None:
    m, n, k = 4, 4096, 4096  # fma and mma_t both offered
    cands = mma_t_candidates(m, n, k)
    current = cands[3]
    got = candidates_against(current, m, n, k, ["mma_t"])
    assert got[0] == current and got.count(current) == 1
    assert sorted(map(str, got)) == sorted(map(str, cands))  # the current choice was one of them
    fma = candidates_against(current, m, n, k, ["fma"])
    assert fma[0] == current and {c.kind for c in fma[1:]} == {"fma"}


def test_compile_key_ignores_split_k_only_where_the_kernel_does() -> None:
    from lmkiln.kernels.w4a16 import KernelConfig

    t = KernelConfig(kind="mma_t", block_m=16, block_n=128, split_k=3)
    assert _compile_key(t) == _compile_key(KernelConfig(kind="mma_t", block_m=16, block_n=128, split_k=8))
    assert _compile_key(t) != _compile_key(KernelConfig(kind="mma_t", block_m=32, block_n=128, split_k=3))
    f = KernelConfig(kind="fma", block_m=1, block_n=64, split_k=5)
    assert _compile_key(f) == _compile_key(KernelConfig(kind="fma", block_m=1, block_n=64, split_k=8))
    assert _compile_key(f) != _compile_key(KernelConfig(kind="fma", block_m=1, block_n=64, split_k=9))


def test_merge_replaces_only_what_was_timed() -> None:
    old = [_entry(4096, 16, "mma", 18.0), _entry(4096, 64, "mma", 28.0), _entry(12288, 16, "mma", 30.0)]
    new = [_entry(4096, 64, "mma_t", 20.0)]
    got = merge_entries(old, new)
    assert [(e["n"], e["m_max"], e["config"]["kind"]) for e in got] == [
        (4096, 16, "mma"), (4096, 64, "mma_t"), (12288, 16, "mma")
    ]


def test_write_tuned_merges_into_the_devices_table(tmp_path: Path) -> None:
    path = tmp_path / "gpu.json"
    write_tuned(path, "GPU A", [_entry(4096, 16, "mma", 18.0), _entry(4096, 64, "mma", 28.0)], REPORT)
    write_tuned(path, "GPU A", [_entry(4096, 64, "mma_t", 20.0)], REPORT)
    data = json.loads(path.read_text())
    assert [(e["m_max"], e["config"]["kind"]) for e in data["entries"]] == [(16, "mma"), (64, "mma_t")]
    # another device's table is replaced, not merged
    write_tuned(path, "GPU B", [_entry(4096, 32, "mma_t", 19.0)], REPORT)
    data = json.loads(path.read_text())
    assert data["device"] == "GPU B" and [e["m_max"] for e in data["entries"]] == [32]
    path.write_text("{not json")
    with pytest.raises(QuantConfigError, match="unreadable"):
        write_tuned(path, "GPU B", [], REPORT)
    assert path.read_text() == "{not json"  # a broken table is left for the user to look at
