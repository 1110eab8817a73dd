"""Helpers of the workflow tests: run the repo's Snakefile in a temp dir on a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_snakemake(workdir: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 1200) -> subprocess.CompletedProcess:
    """``snakemake -s REPO/Snakefile -d WORKDIR --configfile WORKDIR/config.yaml ARGS`` (venv on PATH)."""
    full_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "snakemake", "--configfile", str(workdir / "config.yaml"),  # (nargs=+)
           "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def write_config(workdir: Path, model: Path | str, **sections: dict) -> dict:
    """config.yaml of the repo with ``model`` and small calibration / search / evaluation settings.

    ``sections`` replace top-level keys (``models={...}``, ``recipes={...}``, ``device="cuda"``...).
    """
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["model"] = str(model)
    config["models"], config["recipes"] = {}, {}
    config["calib"].update(samples=4, seqlen=128)
    config["quant"].update(search_tokens=256, stat_tokens=512)
    config["eval"].update(tokens=1024, window=256, max_ppl_increase=1.0)
    config.update(sections)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def planned_jobs(run: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> count from the job-stats table a (dry) run prints."""
    jobs, in_table = {}, False
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
        elif in_table and line.strip() and not line.startswith("-"):
            name, *rest = line.split()
            if name == "total":
                break
            jobs[name] = int(rest[0])
    return jobs


@pytest.fixture()
def snakemake() -> Callable[..., subprocess.CompletedProcess]:
    return run_snakemake


@pytest.fixture()
def workflow_config() -> Callable[..., dict]:
    return write_config


@pytest.fixture()
def jobs_of() -> Callable[[subprocess.CompletedProcess], dict[str, int]]:
    return planned_jobs
