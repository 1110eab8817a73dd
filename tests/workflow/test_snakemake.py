"""`snakemake quantize` end to end on the real small model (tiny calibration and evaluation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CORES = ("--cores", "2")


def _write_config(workdir: Path, model: Path, **quant) -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["model"] = str(model)
    config["calib"].update(samples=4, seqlen=128)
    config["quant"].update(search_tokens=256, stat_tokens=512, **quant)
    config["eval"].update(tokens=1024, window=256, max_ppl_increase=1.0)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def test_config_is_validated(tmp_path, tiny_llama_dir, snakemake):
    _write_config(tmp_path, tiny_llama_dir)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["quant"]["w_bits"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = snakemake(tmp_path, *CORES, "-n", "quantize")
    assert r.returncode != 0 and "w_bits" in r.stderr + r.stdout


def test_dry_run_plans_the_pipeline(tmp_path, tiny_llama_dir, snakemake, jobs_of):
    _write_config(tmp_path, tiny_llama_dir)
    r = snakemake(tmp_path, *CORES, "-n", "quantize")
    assert r.returncode == 0, r.stderr
    assert set(jobs_of(r)) == {"prepare_texts", "calibrate", "awq", "evaluate", "pack", "quantize"}


def _quantize_smollm2(workdir, smollm2_dir, snakemake) -> dict:
    """The build of the end-to-end test (in the background), then its incremental runs."""
    _write_config(workdir, smollm2_dir, w_group_size=64)
    runs = {"workdir": workdir, "build": snakemake(workdir, *CORES, "quantize")}
    if runs["build"].returncode:
        return runs
    runs["unchanged"] = snakemake(workdir, *CORES, "-n", "quantize")
    _write_config(workdir, smollm2_dir, w_group_size=32)
    runs["changed"] = snakemake(workdir, *CORES, "-n", "quantize")
    _write_config(workdir, smollm2_dir, w_group_size=64)  # back to what was built
    # The AWQ artifact again, from the same inputs (its consumers are not needed to compare it).
    results = workdir / "results" / smollm2_dir.name
    shutil.copytree(results / "awq", results / "awq.first")
    awq = str(results.relative_to(workdir) / "awq")
    runs["rebuild"] = snakemake(workdir, *CORES, awq, "--forcerun", "awq")
    return runs


@pytest.mark.slow
@pytest.mark.prebuild(build=_quantize_smollm2)
def test_quantize_end_to_end_then_incremental(prebuilt, smollm2_dir, jobs_of):
    tmp_path, r = prebuilt["workdir"], prebuilt["build"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = tmp_path / "results" / smollm2_dir.name
    report = json.loads((results / "eval" / "ppl.json").read_text())
    for text in ("pride_and_prejudice", "wiki_sample"):
        res = report["results"][text]
        assert res["reference"] < res["awq"] < res["rtn"]
    manifest = json.loads((results / "awq.first" / "manifest.json").read_text())
    assert manifest["group_size"] == 64 and manifest["calibration"]["samples"] == 4
    packed = json.loads((results / "packed" / "manifest.json").read_text())
    assert packed["kind"] == "packed" and packed["group_size"] == 64
    for rule in ("calibrate", "awq", "evaluate", "pack"):
        assert (tmp_path / "logs" / smollm2_dir.name / f"{rule}.log").is_file()
        assert (tmp_path / "benchmarks" / smollm2_dir.name / f"{rule}.tsv").is_file()
    assert "quality gate: passed" in r.stdout + r.stderr  # the end-of-run summary

    # Nothing changed: nothing reruns.
    assert set(jobs_of(prebuilt["unchanged"])) == set()

    # A quantization setting changed: AWQ and the evaluation rerun, calibration does not (a dry run).
    assert set(jobs_of(prebuilt["changed"])) == {"awq", "evaluate", "pack", "quantize"}

    # A rebuild from the same inputs is byte-identical.
    r = prebuilt["rebuild"]
    assert r.returncode == 0, r.stderr[-3000:]
    first = results / "awq.first"
    for f in first.iterdir():
        assert f.read_bytes() == (results / "awq" / f.name).read_bytes(), f.name
    shutil.rmtree(first)


def test_snakemake_serve_dry_run(tmp_path, tiny_llama_dir, snakemake, jobs_of) -> None:
    """``snakemake -n serve`` plans the build up to the packed artifact and its quality gate, then the
    server with config.yaml's serve: settings (the dry run prints the shell command)."""
    _write_config(tmp_path, tiny_llama_dir)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["serve"].update(server_port=8123, session_len=128, quant_policy=8, cache_max_entry_count=64,
                           enable_prefix_caching=True, device="cpu")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = snakemake(tmp_path, *CORES, "-n", "-p", "serve")
    assert r.returncode == 0, r.stderr
    assert set(jobs_of(r)) == {"prepare_texts", "calibrate", "awq", "evaluate", "pack", "serve"}
    cmd = next(line for line in (r.stdout + r.stderr).splitlines() if "lmkiln serve api_server" in line)
    for flag in (f"results/{tiny_llama_dir.name}/packed", "--server-name 127.0.0.1", "--server-port 8123",
                 "--cache-max-entry-count 64", "--quant-policy 8", "--session-len 128",
                 "--enable-prefix-caching", "--device cpu", "--max-batch-size 256",
                 f"logs/{tiny_llama_dir.name}/serve.log"):
        assert flag in cmd, (flag, cmd)

    config["serve"]["quant_policy"] = 3  # validated by the schema
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = snakemake(tmp_path, *CORES, "-n", "serve")
    assert r.returncode != 0 and "quant_policy" in r.stdout + r.stderr
