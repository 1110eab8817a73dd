"""The model × recipe build grid of ``config.yaml`` and its comparison table (``results/grid/``).

A *build* is one model quantized with one recipe; its name is the ``{model}`` wildcard of the workflow
(``results/<build>/awq``, ``.../eval/ppl.json``, ``.../packed``). Calibration statistics belong to the
source model (``results/<model>/calib``) and are shared by all of its recipes. The primary build
(``model:`` with ``quant:``) is named after the model directory, as it always was, so ``snakemake
quantize`` keeps its paths; the grid (``models:`` × ``recipes:``) names its builds ``<model>-<recipe>``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkiln.artifact import read_manifest, write_json_atomic, write_text_atomic
from lmkiln.errors import ArtifactError, LmkilnError, ModelError, QuantConfigError
from lmkiln.report import rule_times

log = logging.getLogger(__name__)

RESERVED = frozenset({"grid"})  # results/grid/ holds the comparison table
SUMMARY_FORMAT = 1


@dataclass(frozen=True)
class Build:
    """One model quantized with one recipe."""

    name: str
    model: str  # source model name: results/<model>/calib, benchmarks/<model>/calibrate.tsv
    model_dir: str
    recipe: str  # "" for a build with the plain quant: section
    quant: Mapping[str, Any] = field(hash=False)


@dataclass(frozen=True)
class BuildPlan:
    sources: dict[str, str]  # model name -> HF checkpoint directory
    builds: dict[str, Build]  # build name -> build
    primary: str  # the build of `model:` + `quant:` (snakemake quantize / serve)
    grid: tuple[str, ...]  # the builds of `models:` × `recipes:` (snakemake grid)
    grid_error: LmkilnError | None = None  # why the grid cannot be built (then it is left out)

    def require_grid(self) -> tuple[str, ...]:
        """The grid's builds; raises the grid's configuration error, if any."""
        if self.grid_error is not None:
            raise self.grid_error
        return self.grid


def _same_dir(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def plan_builds(config: Mapping[str, Any]) -> BuildPlan:
    """Builds of a validated config: the primary one and the grid (``models`` × ``recipes``).

    Without ``models:`` the grid uses ``model:``; without ``recipes:`` it uses ``quant:`` as is (builds
    named after their models). A recipe overrides keys of ``quant:``. A grid whose names clash is left
    out with its error (raised by :meth:`BuildPlan.require_grid`), so that it never blocks the primary
    build, e.g. ``snakemake quantize --config model=/elsewhere/SmolLM2-135M-Instruct``.
    """
    primary_dir = str(config["model"])
    primary = Path(primary_dir).name
    quant = dict(config["quant"])
    sources: dict[str, str] = {primary: primary_dir}
    builds: dict[str, Build] = {primary: Build(primary, primary, primary_dir, "", quant)}
    try:
        grid = _plan_grid(config, quant, sources, builds)
    except (ModelError, QuantConfigError) as e:
        return BuildPlan({primary: primary_dir}, {primary: builds[primary]}, primary, (), e)
    return BuildPlan(sources, builds, primary, grid)


def _plan_grid(config: Mapping[str, Any], quant: dict[str, Any], sources: dict[str, str],
               builds: dict[str, Build]) -> tuple[str, ...]:
    """Add the grid's models and builds to ``sources`` / ``builds``; raise on a name clash."""
    primary = next(iter(builds))
    models = config.get("models") or {primary: sources[primary]}
    for name, model_dir in models.items():
        if name in sources and not _same_dir(sources[name], model_dir):
            raise ModelError(
                f"model name {name!r} stands for both {sources[name]} and {model_dir}; give the entry "
                "under models: another name (names are result directories)"
            )
        sources.setdefault(name, str(model_dir))

    grid = []
    for model, model_dir in models.items():
        for recipe, overrides in (config.get("recipes") or {"": {}}).items():
            name = f"{model}-{recipe}" if recipe else model
            build = Build(name, model, str(model_dir), recipe, {**quant, **overrides})
            old = builds.get(name)
            if old is not None and (old.model != build.model or dict(old.quant) != dict(build.quant)):
                raise QuantConfigError(
                    f"build name {name!r} stands for two different builds ({old.model} {dict(old.quant)} "
                    f"and {build.model} {dict(build.quant)}); rename the model or the recipe"
                )
            builds[name] = build
            grid.append(name)

    for name, build in builds.items():
        if name in sources and build.model != name:
            raise QuantConfigError(
                f"build {name!r} ({build.model} with recipe {build.recipe!r}) has the name of the model "
                f"{name!r}; rename that model or the recipe (both use results/{name}/)"
            )
    for name in (*sources, *builds):
        if name in RESERVED:
            raise QuantConfigError(f"{name!r} is reserved (results/{name}/); rename that model or recipe")
    return tuple(grid)


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _nan_to_none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def summarize_build(build: str, model: str, recipe: str, results: Path, benchmarks: Path) -> dict[str, Any]:
    """One row of the comparison table, read from the build's artifacts (manifests verified)."""
    root = results / build
    awq = read_manifest(root / "awq", kind="awq", verify=True)
    read_manifest(root / "packed", kind="packed", verify=True)
    ppl_path = root / "eval" / "ppl.json"
    try:
        ppl = json.loads(ppl_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{ppl_path} is missing or not JSON ({e}); rerun the evaluate rule") from e
    times = {rule: s for rule, (s, _) in rule_times(benchmarks / build).items()}
    rss = [r for _, r in rule_times(benchmarks / build).values()]
    calib = rule_times(benchmarks / model).get("calibrate")
    if calib is not None:
        times["calibrate"] = calib[0]
        rss.append(calib[1])
    rss = [r for r in rss if not math.isnan(r)]
    return {
        "build": build,
        "model": model,
        "recipe": recipe,
        "bits": awq["bits"],
        "group_size": awq["group_size"],
        "search_scale": awq["awq"]["search_scale"],
        "source_hash": awq["source"]["model_hash"],
        "ppl": {text: {k: _nan_to_none(v) for k, v in r.items()} for text, r in ppl["results"].items()},
        "gate_passed": ppl["gate"]["passed"],
        "awq_mib": round(_dir_mib(root / "awq"), 3),
        "packed_mib": round(_dir_mib(root / "packed"), 3),
        "time_s": {k: round(v, 2) for k, v in sorted(times.items())},
        "peak_rss_mib": round(max(rss), 1) if rss else None,
    }


def format_markdown(summary: Mapping[str, Any]) -> str:
    """The comparison table as Markdown: one row per build, AWQ perplexity per held-out text."""
    rows = summary["builds"]
    texts = sorted({t for r in rows for t in r["ppl"]})
    head = ["build", "model", "recipe", "bits", "group", "search",
            *(f"ppl {t} (ref / rtn / awq)" for t in texts), "gate", "awq MiB", "packed MiB", "time s",
            "peak RSS MiB"]
    lines = ["# lmkiln build grid", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = []
        for t in texts:
            p = r["ppl"].get(t)
            ppl.append(f"{p['reference']:.3f} / {p['rtn']:.3f} / **{p['awq']:.3f}**" if p else "-")
        cells = [r["build"], r["model"], r["recipe"] or "-", str(r["bits"]), str(r["group_size"]),
                 "yes" if r["search_scale"] else "no", *ppl, "passed" if r["gate_passed"] else "FAILED",
                 f"{r['awq_mib']:.1f}", f"{r['packed_mib']:.1f}", f"{sum(r['time_s'].values()):.1f}",
                 "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "time s: calibrate (shared by a model's recipes) + awq + evaluate + pack, from the "
              "Snakemake benchmark files; every artifact's manifest was verified (sha256 of each file)."]
    return "\n".join(lines) + "\n"


def write_grid_summary(builds: Sequence[tuple[str, str, str]], results: Path, benchmarks: Path,
                       out_dir: Path) -> dict[str, Any]:
    """``summary.json`` and ``summary.md`` in ``out_dir`` from ``(build, model, recipe)`` triples."""
    if not builds:
        raise QuantConfigError("the grid has no builds; list models: and/or recipes: in config.yaml")
    summary = {
        "format": SUMMARY_FORMAT,
        "builds": [summarize_build(b, m, r, Path(results), Path(benchmarks)) for b, m, r in builds],
    }
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "summary.json", summary)
    write_text_atomic(out_dir / "summary.md", format_markdown(summary))
    log.info("grid summary of %d builds in %s", len(builds), out_dir)
    return summary


def parse_build_spec(spec: str) -> tuple[str, str, str]:
    """``BUILD:MODEL:RECIPE`` (RECIPE may be empty) -> a triple."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise QuantConfigError(f"bad build spec {spec!r}: expected BUILD:MODEL:RECIPE (recipe may be empty)")
    return parts[0], parts[1], parts[2]
