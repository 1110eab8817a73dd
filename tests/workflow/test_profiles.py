"""The cluster profiles plan the workflow (dry runs, no cluster needed): resources, GPU placement, storage."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

PROFILES = Path(__file__).resolve().parents[2] / "workflow" / "profiles"
SLURM, KUBERNETES = str(PROFILES / "slurm"), str(PROFILES / "kubernetes")


def _resources(run, rule: str) -> dict[str, str]:
    """``resources:`` of the first job of ``rule`` in a dry run's output."""
    out = run.stdout + run.stderr
    block = out[out.index(f"rule {rule}:"):]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    return dict(kv.split("=", 1) for kv in re.split(r",\s*", line.split("resources:", 1)[1].strip()))


def test_slurm_profile_places_jobs(tmp_path, tiny_llama_dir, snakemake, workflow_config, jobs_of) -> None:
    pytest.importorskip("snakemake_executor_plugin_slurm")
    workflow_config(tmp_path, tiny_llama_dir)
    r = snakemake(tmp_path, "-n", "--workflow-profile", SLURM, "quantize")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Using workflow specific profile {SLURM}" in r.stdout + r.stderr
    assert jobs_of(r) == {"prepare_texts": 1, "calibrate": 1, "awq": 1, "evaluate": 1, "pack": 1,
                          "quantize": 1}
    for rule, runtime in (("calibrate", "60"), ("awq", "240"), ("evaluate", "240"), ("pack", "30")):
        res = _resources(r, rule)
        # mem_mb follows the inputs' size: known once they exist (test_slurm checks the sbatch --mem).
        assert res["runtime"] == runtime and (res["mem_mb"] == "<TBD>" or int(res["mem_mb"]) >= 1500), res
        # device "" asks for no GPU
        assert res.get("gpu", "0") == "0" and "slurm_partition" not in res, (rule, res)

    # device cuda: calibrate and awq ask for a GPU in the GPU partition; evaluate stays on the CPU.
    workflow_config(tmp_path, tiny_llama_dir, device="cuda", cluster={"gpu_partition": "a100"})
    r = snakemake(tmp_path, "-n", "--workflow-profile", SLURM, "quantize")
    assert r.returncode == 0, r.stderr[-3000:]
    for rule in ("calibrate", "awq"):
        res = _resources(r, rule)
        assert res["gpu"] == "1" and res["slurm_partition"] == "a100", (rule, res)
    assert _resources(r, "evaluate").get("gpu", "0") == "0"
    workflow_config(tmp_path, tiny_llama_dir, device="cuda", cluster={"gpu_partition": ""})
    r = snakemake(tmp_path, "-n", "--workflow-profile", SLURM, "quantize")
    assert r.returncode == 0 and "slurm_partition" not in _resources(r, "awq")


def test_kubernetes_profile_dry_run(tmp_path, tiny_llama_dir, snakemake, workflow_config, jobs_of) -> None:
    """Pods share no filesystem: every path of a command comes from the storage plugin's local copies."""
    pytest.importorskip("snakemake_executor_plugin_kubernetes")
    pytest.importorskip("snakemake_storage_plugin_fs")
    store, work = tmp_path / "store", tmp_path / "work"
    shutil.copytree(tiny_llama_dir, store / "resources" / "models" / "tiny-llama")
    workflow_config(work, "resources/models/tiny-llama", device="cuda",
                    models={"tiny-llama": "resources/models/tiny-llama"},
                    recipes={"w4g128": {"w_group_size": 128}})
    env = {"LMKILN_IMAGE": "registry.example.org/lmkiln:test", "LMKILN_PVC": "lmkiln-work",
           "LMKILN_STORE": str(store)}
    r = snakemake(work, "-n", "-p", "--workflow-profile", KUBERNETES, "grid", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert jobs_of(r) == {"prepare_texts": 1, "calibrate": 1, "awq": 2, "evaluate": 2, "pack": 2,
                          "grid_summary": 1, "grid": 1}
    local = f".snakemake/storage/fs/{str(store).lstrip('/')}"
    assert f"{store}/resources/models/tiny-llama/model.safetensors (retrieve from storage)" in out
    assert f"lmkiln lite calibrate {local}/resources/models/tiny-llama " in out
    assert f"--text-dir {local}/resources/text --out {local}/results/tiny-llama/calib/" in out
    assert f"lmkiln data prepare-texts {local}/resources/text " in out
    assert f"--results {local}/results --benchmarks {local}/benchmarks --out-dir {local}/results/grid" in out
    res = _resources(r, "awq")
    assert res["gpu"] == "1" and res["gpu_manufacturer"] == "nvidia"
