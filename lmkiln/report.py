"""One-screen summaries of what a build produced (printed at the end of ``snakemake quantize``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def rule_times(bench_dir: Path, recursive: bool = False) -> dict[str, tuple[float, float]]:
    """rule -> (seconds, peak RSS MiB) from Snakemake ``benchmark:`` files."""
    out = {}
    for tsv in sorted(bench_dir.rglob("*.tsv") if recursive else bench_dir.glob("*.tsv")):
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            rss = rows[-1].get("max_rss", "NA")
            name = tsv.relative_to(bench_dir).with_suffix("").as_posix()
            out[name] = (float(rows[-1]["s"]), float(rss) if rss not in ("NA", "-", "") else float("nan"))
    return out


def quantize_summary(results_dir: Path, bench_dir: Path) -> str:
    lines = [f"lmkiln quantize: {results_dir}"]
    times = rule_times(bench_dir)
    if times:
        lines.append("  step          time (s)   peak RSS (MiB)")
        lines += [f"  {rule:<12} {s:>9.1f} {rss:>15.0f}" for rule, (s, rss) in times.items()]
        lines.append(f"  {'total':<12} {sum(s for s, _ in times.values()):>9.1f}")
    ppl_path = results_dir / "eval" / "ppl.json"
    if ppl_path.is_file():
        from lmkiln.eval.ppl import format_table

        report = json.loads(ppl_path.read_text())
        lines.append(f"  perplexity (group size {report['group_size']}):")
        lines += ["  " + row for row in format_table(report).splitlines()]
        lines.append(f"  quality gate: {'passed' if report['gate']['passed'] else 'FAILED'}")
    for name in ("awq", "packed"):
        d = results_dir / name
        if d.is_dir():
            lines.append(f"  {name:<7} {d}  {_dir_size(d) / 2**20:.1f} MiB")
    return "\n".join(lines)
