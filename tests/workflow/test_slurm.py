"""`snakemake quantize --executor slurm` end to end on a real SLURM cluster (the tiny model).

``make test`` starts a single-node cluster first (scripts/slurm/start-single-node.sh: Debian's slurm-wlm
and munge, as root); elsewhere these tests skip, saying how to start one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmkiln.artifact import read_manifest

REPO = Path(__file__).resolve().parents[2]
# The single-node cluster has no accounting database: job states come from squeue (MinJobAge=600 keeps
# finished jobs listed) and no account is needed. Status checks come after 4 s, then 10 s more each time
# nothing finished (the plugin's backoff), not after 40 s: a step of the tiny build takes 8-16 s.
LOCAL_CLUSTER_FLAGS = ("--slurm-status-command", "squeue", "--slurm-no-account",
                       "--slurm-init-seconds-before-status-checks", "4", "--slurm-keep-successful-logs")
SUBMITTED = r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/"


def _squeue(job_ids: list[str]) -> dict[str, dict[str, str]]:
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--jobs", ",".join(job_ids),
                          "--format=%i|%T|%P|%C|%m"], capture_output=True, text=True, check=True).stdout
    rows = (line.split("|") for line in out.split())
    return {jid: {"state": st, "partition": p, "cpus": c, "mem": m} for jid, st, p, c, m in rows}


def _quantize_on_slurm(workdir, slurm_cluster, tiny_llama_dir, snakemake, workflow_config) -> dict:
    """The SLURM build (in the background, mostly waiting for job status), its jobs' states, then a local
    rebuild of its AWQ and packed artifacts."""
    workflow_config(workdir, tiny_llama_dir)
    r = snakemake(workdir, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                  *LOCAL_CLUSTER_FLAGS, "quantize", timeout=600)
    runs = {"workdir": workdir, "build": r}
    if r.returncode:
        return runs
    job_ids = [jid for jid, _ in re.findall(SUBMITTED, r.stdout + r.stderr)]
    runs["squeue"] = _squeue(job_ids) if job_ids else {}  # now: squeue forgets jobs 600 s after they end
    runs["dry_run"] = snakemake(workdir, "-n", "--cores", "2", "quantize")
    results = workdir / "results" / tiny_llama_dir.name
    for name in ("awq", "packed"):
        shutil.copytree(results / name, workdir / f"slurm-{name}")
    targets = [str(results.relative_to(workdir) / name) for name in ("awq", "packed")]
    runs["rebuild"] = snakemake(workdir, "--cores", "2", *targets, "--forcerun", "awq")
    return runs


@pytest.mark.slow
@pytest.mark.prebuild(build=_quantize_on_slurm)
def test_quantize_on_slurm(slurm_cluster, prebuilt, tiny_llama_dir, jobs_of) -> None:
    tmp_path, r = prebuilt["workdir"], prebuilt["build"]
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]

    # Every step ran as its own SLURM job, with the resources its rule asks for.
    submitted = {rule: jid for jid, rule in re.findall(SUBMITTED, out)}
    assert set(submitted) == {"prepare_texts", "calibrate", "awq", "evaluate", "pack"}, out[-3000:]
    jobs = prebuilt["squeue"]
    for rule, jid in submitted.items():
        assert jobs[jid]["state"] == "COMPLETED" and jobs[jid]["partition"] == "cpu", (rule, jobs[jid])
        logs = list((tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{jid}.log"))
        assert logs, rule
        text = logs[0].read_text()  # the job ran the rule through the plugin's job step, inside SLURM
        assert "--executor slurm-jobstep" in text and f"rule {rule}:" in text, text[-2000:]
    for rule in ("calibrate", "awq", "evaluate"):
        assert jobs[submitted[rule]]["cpus"] == "2", (rule, jobs[submitted[rule]])
    assert jobs[submitted["pack"]]["mem"] == "2000M"
    assert int(jobs[submitted["evaluate"]]["mem"].rstrip("M")) >= 2500

    # The artifacts are complete and verified (sha256 of every file against its manifest) here, on the
    # submitting host; the build passed its quality gate.
    read_manifest(tmp_path / "slurm-awq", kind="awq", verify=True)
    read_manifest(tmp_path / "slurm-packed", kind="packed", verify=True)
    assert "quality gate: passed" in out
    assert jobs_of(prebuilt["dry_run"]) == {}  # nothing left to do

    # Reproducible across nodes: a local rebuild gives byte-identical AWQ and packed artifacts.
    results = tmp_path / "results" / tiny_llama_dir.name
    r = prebuilt["rebuild"]
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("awq", "packed"):
        slurm_files = sorted(p.relative_to(tmp_path / f"slurm-{name}")
                             for p in (tmp_path / f"slurm-{name}").rglob("*") if p.is_file())
        assert slurm_files
        for rel in slurm_files:
            assert (tmp_path / f"slurm-{name}" / rel).read_bytes() == (results / name / rel).read_bytes(), rel
