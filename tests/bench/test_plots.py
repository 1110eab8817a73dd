"""The figures and the results table of ``snakemake bench``: each names its device, reads the reports the
measurements write, and refuses a report it cannot plot with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmkiln.bench.plots import (
    decode_series,
    main,
    plot_agreement,
    plot_kernel_bandwidth,
    plot_latency_cdf,
    plot_ppl,
    plot_tokps,
    ppl_table,
)
from lmkiln.bench.serve import LoadConfig, RequestResult
from lmkiln.bench.serve import report as serve_report
from lmkiln.errors import DataError
from lmkiln.report import bench_summary, to_html, to_markdown

DEVICE = "Test CPU 9000 (CPU, 2 cores)"
PPL = {"protocol": {"wiki": {"windows": 4, "window_len": 256}, "austen": {"windows": 4, "window_len": 256}},
       "group_size": 64,
       "results": {"wiki": {"reference": 20.0, "rtn": 23.0, "awq": 21.0, "gap_closed": 0.667},
                   "austen": {"reference": 10.0, "rtn": 11.0, "awq": 10.5, "gap_closed": 0.5}},
       "gate": {"max_ppl_increase": 0.25, "passed": True, "failures": []}}
KV = {"device": DEVICE,
      "results": {"wiki": {"kv8": 21.02, "kv4": 21.6}, "austen": {"kv8": 10.51, "kv4": 10.8}}}
QUALITY = {"device": DEVICE, "device_type": "cpu", "dtype": "float32",
           "agreement": {"wiki": {"rtn": {"top1": 0.81, "kl": 0.12}, "awq": {"top1": 0.9, "kl": 0.05},
                                  "packed": {"top1": 0.9, "kl": 0.05}}},
           "sizes": {"fp16": {"disk_bytes": 270 << 20, "memory_bytes": 540 << 20, "dtype": "float32"},
                     "packed": {"disk_bytes": 90 << 20, "memory_bytes": 540 << 20, "dtype": "float32"}}}
ENGINE = {  # the shape `lmkiln bench engine` writes
    "device": DEVICE, "settings": {"prompt_len": 32, "output_len": 16},
    "decode": {"ours-int4": [{"batch": 1, "decode_tok_s": 30.0}, {"batch": 4, "decode_tok_s": 100.0}],
               "hf-float32": [{"batch": 1, "decode_tok_s": 20.0, "cache": "dynamic"},
                              {"batch": 4, "decode_tok_s": 50.0, "cache": "dynamic"}]},
    "ratios": {"ours-int4/hf-float32": {"1": 1.5, "4": 2.0}},
    "throughput": {"kv0": {"num_requests": 8, "prompt_len": 64, "output_len": 16, "requests_per_s": 2.5,
                           "output_tok_s": 40.0, "ttft_ms": {"p50": 50.0, "p99": 200.0},
                           "tpot_ms": {"p50": 20.0, "p99": 30.0}, "kv_cache_gib": 0.25}},
    "variants": {"ours-int4": {"weight_gib": 0.5, "dtype": "torch.float32", "int4": False}},
    "session": {"turns": [{}, {}, {}], "ttft_first_ms": 40.0, "ttft_last_ms": 12.5},
}


def _serve() -> dict:
    """A real load-test report (``lmkiln.bench.serve.report``) of 12 requests, 3 of them aborted."""
    results = []
    for i in range(12):
        r = RequestResult(i, abort=i % 4 == 0, status=200, start=0.0)
        r.chunk_times = [0.01 * (i + 1) + 0.005 * k for k in range(2 if r.abort else 8)]
        r.aborted, r.finished = r.abort, not r.abort
        r.finish_reason = None if r.abort else "length"
        r.output_tokens, r.end = len(r.chunk_times), r.chunk_times[-1]
        results.append(r)
    rep = serve_report(results, 1.0, {"kv_cache_used_blocks": 0.0, "num_requests_running": 0.0},
                       LoadConfig(num_requests=12, concurrency=4), "http://x")
    return rep | {"device": DEVICE}


def _svg_text(path: Path) -> str:
    text = path.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return text


def test_ppl_table_merges_the_kv_perplexities() -> None:
    table = ppl_table(PPL, KV)
    assert table["wiki"] == {"fp16": 20.0, "RTN int4": 23.0, "AWQ int4": 21.0, "AWQ + KV int8": 21.02,
                             "AWQ + KV int4": 21.6}
    assert set(ppl_table(PPL)["austen"]) == {"fp16", "RTN int4", "AWQ int4"}


def test_every_figure_names_its_device(tmp_path) -> None:
    plot_ppl(PPL, tmp_path / "ppl.svg", DEVICE, KV)
    text = _svg_text(tmp_path / "ppl.svg")
    assert DEVICE in text and "AWQ + KV int4" in text and "+5.0%" in text  # 21 vs 20
    plot_agreement(QUALITY, tmp_path / "agreement.svg")
    assert DEVICE in _svg_text(tmp_path / "agreement.svg")
    plot_tokps(ENGINE, tmp_path / "tokps.svg")
    text = _svg_text(tmp_path / "tokps.svg")
    assert DEVICE in text and "hf-float32" in text and "prompt 32 / output 16" in text
    plot_latency_cdf(_serve(), tmp_path / "latency.svg")
    text = _svg_text(tmp_path / "latency.svg")
    assert DEVICE in text and "12 requests" in text and "3 aborted" in text and "(n=12)" in text


def test_png_output(tmp_path) -> None:
    plot_ppl(PPL, tmp_path / "ppl.png", DEVICE)
    data = (tmp_path / "ppl.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["ppl.png"]  # written atomically, no temporary left


def test_decode_series() -> None:
    assert decode_series(ENGINE) == {"ours-int4": [(1, 30.0), (4, 100.0)],
                                     "hf-float32": [(1, 20.0), (4, 50.0)]}
    nan_row = {"decode": {"hf": [{"batch": 2, "decode_tok_s": float("nan")}],
                          "ours": [{"batch": 2, "decode_tok_s": 3}]}}
    assert decode_series(nan_row) == {"ours": [(2, 3.0)]}
    with pytest.raises(DataError, match="no decode rows"):
        plot_tokps({"device": DEVICE, "decode": {}}, Path("unused.png"))


def test_kernel_bandwidth_plot(tmp_path) -> None:
    rows = [{"shape": s, "m": m, "bytes_ours": 2e7 + m * 1e4, "ours_us": 10.0 + m / 10, "bytes_fp16": 8e7,
             "fp16_us": 40.0 + m / 20, "tinygemm_us": 20.0 + m}
            for s in ("qkv", "down") for m in (1, 16, 256)]
    kernels = {"device": "NVIDIA H100 80GB HBM3", "copy_bw_GBps": 3000.0, "group_size": 128, "results": rows}
    plot_kernel_bandwidth(kernels, tmp_path / "bw.svg")
    text = _svg_text(tmp_path / "bw.svg")
    assert "NVIDIA H100 80GB HBM3" in text and "floor: copy 3000 GB/s" in text and "tinygemm qkv" in text


def test_cli(tmp_path, capsys) -> None:
    (tmp_path / "serve.json").write_text(json.dumps(_serve()))
    assert main(["latency", "--serve", str(tmp_path / "serve.json"), "--out", str(tmp_path / "l.png")]) == 0
    assert (tmp_path / "l.png").stat().st_size > 10_000
    assert main(["tokps", "--out", str(tmp_path / "t.png")]) == 2
    assert "needs --engine" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["ppl", "--ppl", str(tmp_path / "bad.json"), "--out", str(tmp_path / "p.png")]) == 2
    assert "cannot read the report" in capsys.readouterr().err
    no_samples = {k: v for k, v in _serve().items() if k != "samples"}
    (tmp_path / "old.json").write_text(json.dumps(no_samples))
    assert main(["latency", "--serve", str(tmp_path / "old.json"), "--out", str(tmp_path / "o.png")]) == 2
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "o.png").exists()


def test_summary_table(tmp_path) -> None:
    res = tmp_path / "results" / "m"
    (res / "eval").mkdir(parents=True)
    (res / "bench" / "engine").mkdir(parents=True)
    (res / "eval" / "ppl.json").write_text(json.dumps(PPL))
    (res / "bench" / "kv_ppl.json").write_text(json.dumps(KV))
    (res / "bench" / "quality.json").write_text(json.dumps(QUALITY))
    (res / "bench" / "engine" / "engine.json").write_text(json.dumps(ENGINE))
    (res / "bench" / "serve.json").write_text(json.dumps(_serve()))
    bench = tmp_path / "benchmarks" / "m"
    bench.mkdir(parents=True)
    (bench / "bench_quality.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t800.1\n")
    (bench / "awq.tsv").write_text("s\th:m:s\tmax_rss\n99\t0:01:39\t900\n")
    sections = bench_summary("m", res, bench, {"W4A16 kernels": "no CUDA GPU"})
    md = to_markdown(sections)
    assert md.startswith("# lmkiln bench: m\n")
    assert f"Devices: {DEVICE}." in md and "Not measured: W4A16 kernels: no CUDA GPU." in md
    assert "| wiki | 20.00 | 23.00 (+15.0%) | 21.00 (+5.0%) | 21.02 (+5.1%) | 21.60 (+8.0%) |" in md
    assert "| wiki | 81.00% / 0.1200 | 90.00% / 0.0500 | 90.00% / 0.0500 |" in md
    assert "| packed | 90.0 MiB | 540.0 MiB | float32 |" in md
    assert "| 4 | 100.0 | 50.0 |" in md and "| 4 | 2.00x |" in md
    assert "| kv0 | 2.50 | 40.0 | 50.0 / 200.0 | 20.0 / 30.0 | 256 | – |" in md
    assert "TTFT of turn 3 12.5 ms vs turn 1 40.0 ms" in md and "ours-int4 512 MiB (float32)" in md
    assert "| TTFT p50 / p99 (ms) | 70.0 / 120.0 |" in md
    assert "hf-* are HF transformers generate (dynamic cache)" in md  # the cache the baseline really used
    assert "| bench_quality | 12.5 | 800 |" in md and "awq" not in md.split("## Quality")[0]
    assert "## Kernels" not in md
    html = to_html(sections)
    assert "<th>AWQ + KV int4</th>" in html and "<td>21.60 (+8.0%)</td>" in html and DEVICE in html


def test_kernels_section_lists_m_in_numeric_order() -> None:
    from lmkiln.report import _kernels_section

    row = {"ours_ms": 1.0, "fp16_ms": 2.0, "tinygemm_ms": 3.0, "floor_ms": 0.5}
    kernels = {"device": "GPU", "copy_bw_GBps": 3000.0, "timing": "cuda-graph replays", "group_size": 64,
               "sum_7b_ms": {m: row for m in ("1", "16", "2048", "256", "64")}}
    section = _kernels_section(kernels)
    assert [r[0] for r in section.tables[0][1]] == ["1", "16", "64", "256", "2048"]
