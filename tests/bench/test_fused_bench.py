"""The fused-ops micro-benchmark's CPU-checkable parts: both implementations of a layer's small ops agree
(the fused ones through the Triton interpreter), the table renders, and ``run`` refuses without CUDA."""

from __future__ import annotations

import pytest
import torch

from lmkiln.bench.fused import LayerOps, _maxdiff, format_table, run
from lmkiln.errors import LmkilnError


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-interpreter test")
def test_layer_ops_agree_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    ops = LayerOps(2, 8, torch.float32, "cpu")
    qkv0 = ops.qkv.clone()
    want = ops.torch_layer()
    got = ops.fused_layer()
    assert not torch.equal(ops.qkv, qkv0)  # the fused rotary works in place on the qkv buffer
    assert _maxdiff(got, want) < 1e-4
    assert got[1][0].data_ptr() == ops.qkv.data_ptr()  # q is a view of qkv, not a copy


def test_format_table() -> None:
    row = {"tokens": 16, "max_abs_diff": 1e-3, "speedup_layer": 3.5,
           "per_step_32_layers_us": {"torch": 1600.0, "fused": 460.0},
           "kernels_per_layer": {"torch": 40, "fused": 4}}
    for part, (a, b) in {"norm": (10, 3), "rotary": (20, 4), "silu": (8, 4), "layer": (50, 14.4)}.items():
        row[f"torch_{part}_us"], row[f"fused_{part}_us"] = float(a), float(b)
    report = {"device": "X", "timing": "cuda-graph replays", "rows": [row],
              "shape": {"hidden": 4096, "num_q_heads": 32, "num_kv_heads": 8, "intermediate": 11008,
                        "dtype": "float16"}}
    text = format_table(report)
    assert "32/8 heads" in text and " 50.0/14.4" in text and "40/4" in text and "3.50" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_run_needs_a_gpu(tmp_path) -> None:
    with pytest.raises(LmkilnError, match="CUDA"):
        run(tmp_path, [1], 8, torch.float16, 10)
