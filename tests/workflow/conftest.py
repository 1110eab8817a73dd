"""Helpers of the workflow tests: run the repo's Snakefile in a temp dir on a tiny config.

The long builds run in the background. A test marked ``@pytest.mark.prebuild(build=fn)`` has ``fn`` (a
function of its module: the snakemake runs, no assertions) started in a thread when the first workflow test
runs; the test reads what ``fn`` returned through the ``prebuilt`` fixture (waiting for it if needed) and
asserts on it. ``fn``'s parameters are fixtures, resolved when it starts (``workdir``: a fresh directory of
its own); a fixture that skips skips the test.

Why: a build's jobs each keep about one core busy (python, torch and transformers start-up, small models),
the SLURM build mostly waits for the plugin's status checks, and most other tests use one core too; on the
2-core CI machine the builds fill the idle core. So that they overlap the whole session, the other workflow
tests run first (the first of them starts the builds) and the tests reading a build run last. A build's
commands run niced, with one OpenMP thread, so that the tests running meanwhile keep their speed.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
START_SLURM = REPO / "scripts" / "slurm" / "start-single-node.sh"

_RUNNING: set[subprocess.Popen] = set()  # snakemake processes not finished yet (stopped at session end)
_RUNNING_LOCK = threading.Lock()
_SESSION_ENDS = threading.Event()  # a build still running then starts no further command
_IN_BUILD = threading.local()  # .active: this thread runs a background build
BUILD_NICENESS = 19  # a background build yields the CPU to the tests running meanwhile


def run_snakemake(workdir: Path, *args: str, env: dict[str, str | None] | None = None,
                  timeout: float = 1200) -> subprocess.CompletedProcess:
    """``snakemake -s REPO/Snakefile -d WORKDIR --configfile WORKDIR/config.yaml ARGS`` (venv on PATH).

    ``env`` adds variables to the environment (``None`` removes one). Like ``subprocess.run`` (output
    captured); in a build's thread the command runs niced with one OpenMP thread (its jobs too), and is
    stopped if the session ends first.
    """
    full_env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    cmd = [sys.executable, "-m", "snakemake", "--configfile", str(workdir / "config.yaml"),  # (nargs=+)
           "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    if getattr(_IN_BUILD, "active", False):
        if _SESSION_ENDS.is_set():
            raise RuntimeError("the test session ended before this build")
        full_env["OMP_NUM_THREADS"] = "1"  # no OpenMP threads spinning while the other processes run
        if shutil.which("nice"):
            cmd = ["nice", "-n", str(BUILD_NICENESS), *cmd]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=full_env) as proc:
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (snakemake then stops its jobs, and cancels its SLURM jobs), SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# Session-scoped (they are plain functions) so that builds can ask for them too.
@pytest.fixture(scope="session")
def snakemake() -> Callable[..., subprocess.CompletedProcess]:
    return run_snakemake


@pytest.fixture(scope="session")
def workflow_config() -> Callable[..., dict]:
    return write_config


@pytest.fixture(scope="session")
def jobs_of() -> Callable[[subprocess.CompletedProcess], dict[str, int]]:
    return planned_jobs


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skips unless a SLURM cluster answers here (``make test`` starts a single-node one, as root)."""
    import importlib.util

    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')")
    check = (subprocess.run([str(START_SLURM), "--check"], capture_output=True)
             if shutil.which("sbatch") else None)
    if check is None or check.returncode:
        pytest.skip("no SLURM cluster answers here; start one with `sudo scripts/slurm/start-single-node.sh` "
                    "(make test does, as root)")


@pytest.fixture(scope="session")
def tiny_b_dir(tmp_path_factory: pytest.TempPathFactory, make_tiny_model) -> Path:
    """A second tiny Llama (another seed) for the grid tests, named tiny-b."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-b", seed=1)


# --- builds in the background ---------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "prebuild(build=fn): run fn(**fixtures) in the background from the first workflow test "
        "on; the test reads its result through the prebuilt fixture")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where a build is to run: the other workflow tests run first (the first of them starts the builds,
    which then overlap every other test of the session) and the tests reading a build run last."""
    readers = [item for item in items if item.get_closest_marker("prebuild") is not None]
    if not readers:
        return
    here = Path(__file__).parent
    first = [item for item in items if here in item.path.parents and item not in readers]
    middle = [item for item in items if here not in item.path.parents]
    items[:] = first + middle + readers


class Prebuild:
    """``build(**fixtures)`` in a daemon thread; :meth:`result` waits and returns (or raises) its outcome."""

    def __init__(self, build: Callable[..., Any], request: pytest.FixtureRequest) -> None:
        self.name = build.__name__
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        try:
            kwargs = {name: self._fixture(name, request) for name in inspect.signature(build).parameters}
        except (Exception, pytest.skip.Exception) as e:  # raised in the test (a skip: it skips)
            self._error = e
            return
        self._thread = threading.Thread(target=self._run, args=(build, kwargs), name=self.name, daemon=True)
        self._thread.start()

    def _fixture(self, name: str, request: pytest.FixtureRequest) -> Any:
        if name == "workdir":
            return request.getfixturevalue("tmp_path_factory").mktemp(self.name.strip("_"))
        return request.getfixturevalue(name)

    def _run(self, build: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        _IN_BUILD.active = True
        try:
            self._value = build(**kwargs)
        except BaseException as e:  # raised again in the test that reads the result
            self._error = e

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


@pytest.fixture(scope="session", autouse=True)
def _prebuilds(request: pytest.FixtureRequest):
    """Starts the build of every selected test marked ``prebuild`` (at the first workflow test).

    Not in a pytest-xdist worker (it collects every test but runs only some): there, ``prebuilt`` starts
    the build of its test."""
    builds: dict[str, Prebuild] = {}
    if not hasattr(request.config, "workerinput"):
        for item in request.session.items:
            marker = item.get_closest_marker("prebuild")
            if marker is not None:
                builds[item.nodeid] = Prebuild(marker.kwargs["build"], request)
    yield builds
    # A build whose test did not read it (-x, an interrupt): stop its snakemake processes.
    if any(b.running() for b in builds.values()):
        _SESSION_ENDS.set()
        with _RUNNING_LOCK:
            running = list(_RUNNING)
        for proc in running:
            _stop(proc)
        for b in builds.values():
            b.join(timeout=60)


@pytest.fixture()
def prebuilt(request: pytest.FixtureRequest, _prebuilds: dict[str, Prebuild]) -> Any:
    """What this test's ``@pytest.mark.prebuild(build=fn)`` build returned (waits for it to finish)."""
    build = _prebuilds.get(request.node.nodeid)
    if build is None:  # not started ahead
        marker = request.node.get_closest_marker("prebuild")
        if marker is None:
            raise RuntimeError(f"{request.node.nodeid} has no @pytest.mark.prebuild(build=...) marker")
        build = Prebuild(marker.kwargs["build"], request)
    return build.result()
