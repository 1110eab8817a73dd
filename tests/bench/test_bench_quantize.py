"""The quantize benchmark runs end to end (at a tiny shape on the CPU; the real run is on the GPU)."""

from __future__ import annotations

from lmkiln.bench.quantize import bench_synthetic


# one_torch_thread (tests/conftest.py): with the workflow builds running in the background the AWQ search's
# many tiny ops, each waiting for a second thread, took 100x longer on a 2-core machine (16 s, not 0.2 s)
def test_synthetic_benchmark_reports_times(tmp_path, one_torch_thread):
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    r = bench_synthetic(samples=4, seqlen=64, group_size=64, workdir=tmp_path, shape=shape)
    assert r["shape"] == shape and r["calibrate_s"] > 0 and r["awq_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone
