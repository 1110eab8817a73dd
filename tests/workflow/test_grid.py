"""The model × recipe grid: build naming, fan-out into independent jobs, and the comparison table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmkiln.errors import ArtifactError, ModelError, QuantConfigError
from lmkiln.grid import plan_builds, write_grid_summary

REPO = Path(__file__).resolve().parents[2]
QUANT = {"w_bits": 4, "w_group_size": 64, "search_scale": True, "search_tokens": 256, "stat_tokens": 512}


def _config(**kw) -> dict:
    return {"model": "resources/models/SmolLM2-135M-Instruct", "quant": dict(QUANT), **kw}


def test_default_config_keeps_the_single_build_and_its_paths() -> None:
    plan = plan_builds(_config())
    assert plan.primary == "SmolLM2-135M-Instruct" and plan.grid == ("SmolLM2-135M-Instruct",)
    assert list(plan.builds) == ["SmolLM2-135M-Instruct"]
    assert plan.sources == {"SmolLM2-135M-Instruct": "resources/models/SmolLM2-135M-Instruct"}

    # The repo's config.yaml: the primary build is still named after the model directory.
    repo = yaml.safe_load((REPO / "config.yaml").read_text())
    plan = plan_builds(repo)
    assert plan.primary == "SmolLM2-135M-Instruct"
    assert plan.builds["SmolLM2-135M-Instruct"].quant == repo["quant"]
    assert set(plan.grid) == {f"SmolLM2-135M-Instruct-{r}" for r in repo["recipes"]}


def test_models_times_recipes_share_calibration_per_model() -> None:
    plan = plan_builds(_config(
        models={"SmolLM2-135M-Instruct": "resources/models/SmolLM2-135M-Instruct", "qwen": "/m/qwen"},
        recipes={"w4g32": {"w_group_size": 32}, "fast": {"search_tokens": 128}},
    ))
    assert plan.grid == ("SmolLM2-135M-Instruct-w4g32", "SmolLM2-135M-Instruct-fast", "qwen-w4g32",
                         "qwen-fast")
    b = plan.builds["qwen-fast"]
    assert (b.model, b.model_dir, b.recipe) == ("qwen", "/m/qwen", "fast")
    assert b.quant == {**QUANT, "search_tokens": 128}  # a recipe overrides keys of quant:
    assert plan.builds["qwen-w4g32"].quant["w_group_size"] == 32
    assert set(plan.sources) == {"SmolLM2-135M-Instruct", "qwen"}


def test_conflicting_names_are_refused_for_the_grid_only() -> None:
    plan = plan_builds(_config(models={"SmolLM2-135M-Instruct": "/elsewhere/SmolLM2-135M-Instruct"}))
    with pytest.raises(ModelError, match="stands for both"):
        plan.require_grid()
    # The primary build is still planned (snakemake quantize --config model=... must keep working).
    assert plan.primary == "SmolLM2-135M-Instruct" and list(plan.builds) == [plan.primary]
    assert plan.sources == {plan.primary: "resources/models/SmolLM2-135M-Instruct"}

    for kw, err, match in (
        (dict(models={"a": "/m/a", "a-b": "/m/ab"}, recipes={"b-c": {}, "c": {}}), QuantConfigError,
         "two different builds"),  # a-b-c from (a, b-c) and from (a-b, c)
        (dict(models={"a": "/m/a", "a-x": "/m/ax"}, recipes={"x": {"w_group_size": 32}}), QuantConfigError,
         "name of the model"),
        (dict(models={"grid": "/m/grid"}), QuantConfigError, "reserved"),
    ):
        with pytest.raises(err, match=match):
            plan_builds(_config(**kw)).require_grid()
    assert plan_builds(_config(models={"a": "/m/a"})).require_grid() == ("a",)


def test_grid_dry_run_fans_out(tmp_path, tiny_llama_dir, tiny_b_dir, snakemake, workflow_config,
                               jobs_of) -> None:
    other = tiny_b_dir
    workflow_config(tmp_path, tiny_llama_dir,
                    models={"tiny-llama": str(tiny_llama_dir), "tiny-b": str(other)},
                    recipes={"w4g128": {"w_group_size": 128}, "w4g32": {"w_group_size": 32}})
    r = snakemake(tmp_path, "-n", "-p", "grid", "--cores", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    # 1 primary + 2 models x 2 recipes builds; calibration once per model.
    assert jobs_of(r) == {"prepare_texts": 1, "calibrate": 2, "awq": 5, "evaluate": 5, "pack": 5,
                          "grid_summary": 1, "grid": 1}
    out = r.stdout + r.stderr
    assert "--calib-stats results/tiny-llama/calib/act_stats.safetensors --w-bits 4 --w-group-size 32" in out
    assert f"lmkiln lite awq {other} --calib-stats results/tiny-b/calib/" in out

    # A grid whose names clash fails `snakemake grid`, with the reason, but not `snakemake quantize`.
    workflow_config(tmp_path, tiny_llama_dir, models={"tiny-llama": str(other)})
    r = snakemake(tmp_path, "-n", "grid", "--cores", "2")
    assert r.returncode != 0 and "model name 'tiny-llama' stands for both" in r.stdout + r.stderr
    assert snakemake(tmp_path, "-n", "quantize", "--cores", "2").returncode == 0

    # Invalid recipes are caught by the schema.
    workflow_config(tmp_path, tiny_llama_dir, recipes={"w3": {"w_bits": 3}})
    r = snakemake(tmp_path, "-n", "grid", "--cores", "2")
    assert r.returncode != 0 and "w_bits" in r.stdout + r.stderr


def _grid(workdir, tiny_llama_dir, tiny_b_dir, snakemake, workflow_config) -> dict:
    """`snakemake grid` (in the background), then its report."""
    work = workdir / "work"
    workflow_config(work, tiny_llama_dir,
                    models={"tiny-llama": str(tiny_llama_dir), "tiny-b": str(tiny_b_dir)},
                    recipes={"w4g128": {"w_group_size": 128}})
    runs = {"workdir": workdir, "build": snakemake(work, "grid", "--cores", "2")}
    if runs["build"].returncode == 0:
        runs["report"] = snakemake(work, "grid", "--cores", "2", "--report", str(work / "report.html"))
    return runs


@pytest.mark.slow
@pytest.mark.prebuild(build=_grid)
def test_grid_builds_and_compares(prebuilt, jobs_of) -> None:
    tmp_path, r = prebuilt["workdir"], prebuilt["build"]
    work = tmp_path / "work"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert jobs_of(r)["calibrate"] == 2 and jobs_of(r)["awq"] == 3

    summary = json.loads((work / "results" / "grid" / "summary.json").read_text())
    rows = {row["build"]: row for row in summary["builds"]}
    assert list(rows) == ["tiny-llama", "tiny-llama-w4g128", "tiny-b-w4g128"]  # the primary build first
    assert [rows[b]["group_size"] for b in rows] == [64, 128, 128]
    assert rows["tiny-b-w4g128"]["model"] == "tiny-b" and rows["tiny-b-w4g128"]["recipe"] == "w4g128"
    assert rows["tiny-llama"]["source_hash"] != rows["tiny-b-w4g128"]["source_hash"]
    for b, row in rows.items():
        ppl = json.loads((work / "results" / b / "eval" / "ppl.json").read_text())
        assert row["ppl"]["wiki_sample"]["awq"] == ppl["results"]["wiki_sample"]["awq"]
        assert row["gate_passed"] and row["awq_mib"] > 0 and row["packed_mib"] > 0
        assert set(row["time_s"]) == {"calibrate", "awq", "evaluate", "pack"}
        assert all(t > 0 for t in row["time_s"].values())
    # The table: one row per build, the AWQ perplexity of each text.
    md = (work / "results" / "grid" / "summary.md").read_text()
    assert md.count("\n| tiny-") == 3
    assert f"**{rows['tiny-b-w4g128']['ppl']['pride_and_prejudice']['awq']:.3f}**" in md

    # The report carries the table.
    r = prebuilt["report"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "summary.md" in (work / "report.html").read_text()

    # The table is written from verified artifacts: a changed file is refused, with the rule's command.
    weights = next((work / "results" / "tiny-b-w4g128" / "packed").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        write_grid_summary([("tiny-b-w4g128", "tiny-b", "w4g128")], work / "results", work / "benchmarks",
                           tmp_path / "out")
    cli = subprocess.run([sys.executable, "-m", "lmkiln.cli", "report", "grid", "tiny-b-w4g128:tiny-b:w4g128",
                          "--results", str(work / "results"), "--benchmarks", str(work / "benchmarks"),
                          "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 2 and "sha256" in cli.stderr and not (tmp_path / "out" / "summary.md").exists()
