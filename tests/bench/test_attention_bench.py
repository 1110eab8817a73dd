"""The attention benchmark's CPU-side pieces: byte accounting, the table, the no-GPU error."""

from __future__ import annotations

import pytest
import torch

from lmkiln.bench.attention import format_table, kv_bytes, run
from lmkiln.engine.kv_cache import KVCache
from lmkiln.errors import LmkilnError


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_kv_bytes_match_the_cache_allocation(bits) -> None:
    """Bytes a decode step reads = what the KV cache allocates for those tokens (one layer)."""
    page = 64
    per_block = KVCache.bytes_per_block(1, page, 32, 128, torch.float16, bits)
    assert kv_bytes(3, 5 * page, 32, 128, bits) == 3 * 5 * per_block


def test_format_table() -> None:
    report = {
        "device": "GPU",
        "copy_bw_GBps": 3000.0,
        "decode": [
            {"bits": 4, "batch": 256, "ctx": 8192, "skipped": "cache does not fit in free GPU memory"},
            {
                "bits": 8,
                "batch": 16,
                "ctx": 2048,
                "splits": 1,
                "triton_us": 52.5,
                "triton_GBps": 2650.0,
                "sdpa_contiguous_fp16_us": 80.0,
                "ref_us": None,
            },
        ],
        "prefill": [{"seqs": 1, "cached": 0, "new": 2048, "triton_us": 900.0, "TFLOPs": 150.0}],
    }
    lines = format_table(report).splitlines()
    assert "skipped" in lines[2] and lines[3].split()[:6] == ["8", "16", "2048", "1", "52.5", "2650"]
    assert lines[3].split()[-2:] == ["-", "-"] and "150.0 TFLOP/s" in lines[4]


def test_run_needs_a_gpu(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LmkilnError, match="CUDA"):
        run(tmp_path, [1], [512], [0], 64, 10, 1.0)
