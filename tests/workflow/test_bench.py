"""`snakemake bench` on a tiny model on the CPU: every CPU measurement runs, the GPU-only rules are left
out with a message, and `--report` bundles the results into one HTML file whose summary names the device."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREPARED = REPO / "resources" / "text"


def _snakemake(snakemake: Callable[..., subprocess.CompletedProcess], workdir: Path,
               *args: str) -> subprocess.CompletedProcess:
    """``snakemake`` (the fixture) on 2 cores, with every GPU of the machine visible."""
    return snakemake(workdir, "--cores", "2", *args, env={"CUDA_VISIBLE_DEVICES": None})


def _write_config(workdir: Path, model: Path, **bench) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["model"] = str(model)
    config["device"] = "cpu"
    config["calib"].update(samples=4, seqlen=128)
    config["quant"].update(search_tokens=256, stat_tokens=512, w_group_size=64)
    config["eval"].update(tokens=1024, window=256, max_ppl_increase=1.0)
    b = config["bench"]
    b["quality"].update(tokens=512, window=256)
    b["engine"]["cpu"].update(batch_sizes=[1, 2], prompt_len=8, output_len=4, num_requests=4,
                              throughput_prompt_len=8, throughput_output_len=4, session_turns=2)
    b["serve"].update(num_requests=8, concurrency=4, max_tokens=4, endpoint="completions")  # no chat template
    for grid_key in ("models", "recipes"):  # no grid builds: only this model
        if grid_key in config:
            config[grid_key] = {}
    b.update(bench)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def _use_prepared_texts(workdir: Path) -> None:
    """Reuse resources/text when this checkout has it (prepare_texts then has nothing to do)."""
    if (PREPARED / "texts.json").is_file():
        shutil.copytree(PREPARED, workdir / "resources" / "text")


def test_dry_run_leaves_gpu_rules_out_without_a_gpu(tmp_path, tiny_llama_dir, snakemake, jobs_of) -> None:
    _write_config(tmp_path, tiny_llama_dir)
    r = _snakemake(snakemake, tmp_path, "-n", "bench")
    assert r.returncode == 0, r.stderr
    jobs = set(jobs_of(r))
    assert {"bench_quality", "bench_kv_ppl", "bench_engine", "bench_serve", "bench_summary"} <= jobs
    assert "bench_kernels" not in jobs and "bench_plot_bandwidth" not in jobs
    assert "not measuring W4A16 kernels" in r.stderr
    # bench.gpu: true plans the GPU rules (e.g. for GPU nodes of a cluster), with a GPU resource each
    _write_config(tmp_path, tiny_llama_dir, gpu=True)
    r = _snakemake(snakemake, tmp_path, "-n", "bench")
    assert r.returncode == 0, r.stderr
    assert {"bench_kernels", "bench_plot_bandwidth", "bench_summary"} <= set(jobs_of(r))
    # `snakemake quantize` does not probe for a GPU or mention the bench
    r = _snakemake(snakemake, tmp_path, "-n", "quantize")
    assert r.returncode == 0 and "not measuring" not in r.stdout + r.stderr
    assert not any(j.startswith("bench") for j in set(jobs_of(r)))


def _bench_on_the_cpu(workdir, tiny_llama_dir, snakemake) -> dict:
    """About 1.5 min on 2 cores (in the background): the tiny model's artifacts, then every CPU
    measurement; then the report."""
    _write_config(workdir, tiny_llama_dir)
    _use_prepared_texts(workdir)
    runs = {"workdir": workdir, "build": _snakemake(snakemake, workdir, "bench")}
    if runs["build"].returncode == 0:
        report = workdir / "results" / tiny_llama_dir.name / "report.html"
        runs["report"] = _snakemake(snakemake, workdir, "bench", "--report", str(report))
    return runs


@pytest.mark.slow
@pytest.mark.prebuild(build=_bench_on_the_cpu)
def test_bench_on_the_cpu_produces_the_report(prebuilt, tiny_llama_dir) -> None:
    tmp_path, r = prebuilt["workdir"], prebuilt["build"]
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    model = tiny_llama_dir.name
    summary = (tmp_path / "results" / model / "summary.md").read_text()
    assert "# lmkiln bench: " + model in summary and "(CPU, " in summary  # names the device
    assert "Not measuring W4A16 kernels".lower() in out.lower() and "Not measured: W4A16 kernels" in summary
    for section in ("## Quality", "## Engine", "## Serving"):
        assert section in summary
    assert "lmkiln bench: " + model in out  # printed at the end of the run
    bench = tmp_path / "results" / model / "bench"
    for png in ("ppl.png", "agreement.png", "tokps.png", "latency_cdf.png"):
        assert (bench / png).read_bytes()[:4] == b"\x89PNG", png

    report = tmp_path / "results" / model / "report.html"
    r = prebuilt["report"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    html = report.read_text()
    for item in ("summary.html", "ppl.png", "tokps.png", "latency_cdf.png", "quality.json", "Quality",
                 "Serving", "Engine"):
        assert item in html, item
    assert "kernels_roofline.png" not in html
