"""One-screen summaries of what a build produced (printed at the end of ``snakemake quantize`` and
``snakemake bench``; the bench summary is also written as markdown and HTML)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


# ----------------------------------------------------------------------------------------------------------
# `snakemake bench`: one results table over every measurement (markdown beside the report, HTML inside it)
# ----------------------------------------------------------------------------------------------------------

Table = tuple[list[str], list[list[str]]]  # header, rows


@dataclass
class Section:
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.1f}"


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _quality_section(ppl: dict | None, kv: dict | None, quality: dict | None) -> Section | None:
    if ppl is None and quality is None:
        return None
    from lmkiln.bench.plots import ppl_table

    s = Section("Quality")
    if ppl is not None:
        table = ppl_table(ppl, kv)
        labels = [lb for lb in ("fp16", "RTN int4", "AWQ int4", "AWQ + KV int8", "AWQ + KV int4")
                  if any(lb in r for r in table.values())]
        rows = [[text] + [_fmt(r.get(lb)) + ("" if lb == "fp16" or lb not in r else
                                             f" ({100 * (r[lb] / r['fp16'] - 1):+.1f}%)") for lb in labels]
                for text, r in table.items()]
        s.tables.append((["perplexity (held out)", *labels], rows))
        protocol = ", ".join(f"{t}: {p['windows']} x {p['window_len']} tokens"
                             for t, p in ppl["protocol"].items())
        s.notes.append(f"Perplexity: group size {ppl['group_size']}; {protocol}; quality gate "
                       f"{'passed' if ppl['gate']['passed'] else 'FAILED'} (evaluate rule, fp32).")
        if kv is not None:
            checks = kv.get("checks") or {}
            diffs = ", ".join(f"{t} {100 * c['rel_diff_vs_eval']:+.2f}%" for t, c in checks.items()
                              if isinstance(c, dict) and "rel_diff_vs_eval" in c)
            note = (f"KV int8 / int4: perplexity through the engine (paged KV cache) of the "
                    f"{kv.get('kind', '?')} artifact on {kv.get('device', '?')}")
            if diffs:
                note += f"; with the KV cache in fp it differs from the AWQ column by {diffs}"
            note += f"; tolerance checks {'passed' if checks.get('passed', True) else 'FAILED: '}"
            s.notes.append(note + "; ".join(checks.get("failures") or []) + ".")
    if quality is not None:
        names = [n for n in ("rtn", "awq", "packed") if any(n in r for r in quality["agreement"].values())]
        rows = [[text] + [f"{100 * r[n]['top1']:.2f}% / {r[n]['kl']:.4f}" for n in names]
                for text, r in quality["agreement"].items()]
        s.tables.append((["next-token agreement with fp16 (top-1 / KL)", *names], rows))
        order = ["fp16", "awq", "packed"]
        sizes = sorted(quality["sizes"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
        rows = [[name, _mib(v["disk_bytes"]), _mib(v["memory_bytes"]), v["dtype"]] for name, v in sizes]
        s.tables.append((["model", "on disk", f"in memory ({quality['device_type']})", "loaded as"], rows))
        s.notes.append(f"Agreement and sizes measured on {quality['device']} ({quality['dtype']}).")
    return s


def _engine_section(engine: dict | None) -> Section | None:
    if engine is None:
        return None
    from lmkiln.bench.plots import decode_series

    cfg = engine.get("settings", {})
    caches = sorted({r["cache"] for name, rows in engine.get("decode", {}).items() if name.startswith("hf")
                     for r in rows if r.get("cache")})
    s = Section("Engine", [f"`lmkiln bench engine` on {engine.get('device', '?')}: decode of prompt "
                           f"{cfg.get('prompt_len', '?')} / output {cfg.get('output_len', '?')} tokens; "
                           f"hf-* are HF transformers generate ({' / '.join(caches) or 'default'} cache), "
                           "measured in the same run."])
    series = decode_series(engine)
    if series:
        batches = sorted({b for pts in series.values() for b, _ in pts})
        rows = [[str(b)] + [_fmt(dict(pts).get(b), ",.1f") for pts in series.values()] for b in batches]
        s.tables.append((["batch", *[f"{k} tok/s" for k in series]], rows))
    ratios = {k: v for k, v in (engine.get("ratios") or {}).items() if v}
    if ratios:
        batches = sorted({int(b) for v in ratios.values() for b in v})
        rows = [[str(b)] + [_fmt(v.get(str(b)), ".2f") + "x" for v in ratios.values()] for b in batches]
        s.tables.append((["batch", *[f"{k} speed-up" for k in ratios]], rows))
    tp = engine.get("throughput") or {}
    if tp:
        rows = [[q, _fmt(t.get("requests_per_s")), _fmt(t.get("output_tok_s"), ",.1f"),
                 f"{_fmt(t['ttft_ms']['p50'], '.1f')} / {_fmt(t['ttft_ms']['p99'], '.1f')}",
                 f"{_fmt(t['tpot_ms']['p50'], '.1f')} / {_fmt(t['tpot_ms']['p99'], '.1f')}",
                 _fmt(t.get("kv_cache_gib", math.nan) * 1024, ",.0f"),
                 _fmt(t.get("peak_gpu_mem_gib", math.nan) * 1024, ",.0f")] for q, t in tp.items()]
        first = next(iter(tp.values()))
        s.tables.append(([f"throughput ({first.get('num_requests')} requests, {first.get('prompt_len')} in / "
                          f"{first.get('output_len')} out)", "req/s", "out tok/s", "TTFT p50 / p99 (ms)",
                          "TPOT p50 / p99 (ms)", "KV cache (MiB)", "peak GPU mem (MiB)"], rows))
    variants = engine.get("variants") or {}
    if variants:
        s.notes.append("Weights in memory: " + ", ".join(
            f"{k} {v['weight_gib'] * 1024:,.0f} MiB ({v['dtype'].removeprefix('torch.')}"
            f"{', int4 linears' if v.get('int4') else ''})" for k, v in variants.items()) + ".")
    sess = engine.get("session")
    if sess:
        s.notes.append(f"Interactive session: TTFT of turn {len(sess['turns'])} "
                       f"{sess['ttft_last_ms']:.1f} ms vs turn 1 {sess['ttft_first_ms']:.1f} ms "
                       "(the KV cache of earlier turns is reused).")
    if engine.get("hf_skipped"):
        s.notes.append(f"HF baseline not run: {engine['hf_skipped']}.")
    return s


def _serve_section(serve: dict | None) -> Section | None:
    if serve is None:
        return None
    s = Section("Serving", [f"Loopback load test of the api_server on {serve.get('device', '?')}: "
                            f"{serve['requests']} streaming requests, concurrency "
                            f"{serve['config']['concurrency']}, {serve['aborted']} left mid-stream."])
    rows = [
        ["completed / aborted / 5xx",
         f"{serve['completed']} / {serve['aborted']} / {serve['server_errors']}"],
        ["requests/s", _fmt(serve.get("request_throughput"))],
        ["output tokens/s", _fmt(serve.get("output_token_throughput"), ",.1f")],
        ["TTFT p50 / p99 (ms)", f"{_ms(serve['ttft_s']['p50'])} / {_ms(serve['ttft_s']['p99'])}"],
        ["TPOT p50 / p99 (ms)", f"{_ms(serve['tpot_s']['p50'])} / {_ms(serve['tpot_s']['p99'])}"],
        ["checks (no 5xx, all complete, no leaked KV block)", "passed" if serve["passed"] else "FAILED"],
    ]
    s.tables.append((["serving", "value"], rows))
    return s


def _kernels_section(kernels: dict | None) -> Section | None:
    if kernels is None:
        return None
    s = Section("Kernels", [f"W4A16 GEMMs of the Llama-2-7B linears on {kernels['device']} (copy bandwidth "
                            f"{kernels['copy_bw_GBps']:.0f} GB/s), {kernels.get('timing', '')}, group size "
                            f"{kernels['group_size']}: ms per forward pass over the 32 x 4 linears."])
    rows = [[m] + [_fmt(v.get(k), ".3f") for k in ("ours_ms", "fp16_ms", "tinygemm_ms", "floor_ms")]
            for m, v in sorted(kernels.get("sum_7b_ms", {}).items(), key=lambda kv: int(kv[0]))]
    s.tables.append((["M", "ours", "fp16 cuBLAS", "tinygemm", "HBM floor"], rows))
    return s


def bench_summary(model: str, results_dir: Path, bench_dir: Path | None = None,
                  skipped: dict[str, str] | None = None) -> list[Section]:
    """Every measurement found under ``results_dir`` (``eval/ppl.json`` and ``bench/*``) as sections."""
    b = results_dir / "bench"
    kv = _load(b / "kv_ppl.json")
    sections = [
        _quality_section(_load(results_dir / "eval" / "ppl.json"), kv, _load(b / "quality.json")),
        _engine_section(_load(b / "engine" / "engine.json")),
        _serve_section(_load(b / "serve.json")),
        _kernels_section(_load(b / "kernels" / "kernels.json")),
    ]
    out = [s for s in sections if s is not None]
    head = Section(f"lmkiln bench: {model}")
    reports = [_load(p) or {} for p in (b / "quality.json", b / "kv_ppl.json", b / "engine" / "engine.json",
                                        b / "serve.json", b / "kernels" / "kernels.json")]
    devices = sorted({r["device"] for r in reports if r.get("device")})
    head.notes.append(f"Devices: {'; '.join(devices) or 'none recorded'}.")
    for what, why in (skipped or {}).items():
        head.notes.append(f"Not measured: {what}: {why}.")
    times = rule_times(bench_dir, recursive=True) if bench_dir is not None and bench_dir.is_dir() else {}
    times = {k: v for k, v in times.items() if k.startswith("bench_")}
    if times:
        out.append(Section("Rule times", ["From the rules' Snakemake benchmark files."],
                           [(["rule", "time (s)", "peak RSS (MiB)"],
                             [[k, f"{t:.1f}", _fmt(rss, ".0f")] for k, (t, rss) in times.items()])]))
    return [head, *out]


def to_markdown(sections: list[Section]) -> str:
    lines: list[str] = []
    for i, s in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {s.title}", ""]
        lines += [*s.notes, ""] if s.notes else []
        for header, rows in s.tables:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" if j == 0 else "---:" for j in range(len(header))) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def to_html(sections: list[Section]) -> str:
    from html import escape

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
             "body{font-family:sans-serif;font-size:14px;margin:1em}"
             "table{border-collapse:collapse;margin:.5em 0 1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px}td+td,th+th{text-align:right}th{background:#f3f3f3}"
             "</style></head><body>"]
    for i, s in enumerate(sections):
        parts.append(f"<h{1 if i == 0 else 2}>{escape(s.title)}</h{1 if i == 0 else 2}>")
        parts += [f"<p>{escape(n)}</p>" for n in s.notes]
        for header, rows in s.tables:
            parts.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_main(argv: Sequence[str] | None = None) -> int:
    """``lmkiln bench summary``: write the results table as markdown (and HTML for the report)."""
    import argparse

    from lmkiln.artifact import write_text_atomic

    p = argparse.ArgumentParser(prog="lmkiln bench summary", description=summary_main.__doc__)
    p.add_argument("results_dir", type=Path, help="results/<model>")
    p.add_argument("--benchmarks", type=Path, default=None, help="benchmarks/<model> (rule times)")
    p.add_argument("--skipped", action="append", default=[], metavar="WHAT=WHY",
                   help="a measurement left out, and why (repeatable)")
    p.add_argument("--md", type=Path, required=True, help="markdown summary")
    p.add_argument("--html", type=Path, default=None, help="the same as an HTML page")
    a = p.parse_args(argv)
    skipped = dict(s.split("=", 1) if "=" in s else (s, "not run") for s in a.skipped)
    sections = bench_summary(a.results_dir.name, a.results_dir, a.benchmarks, skipped)
    text = to_markdown(sections)
    write_text_atomic(a.md, text)
    if a.html is not None:
        write_text_atomic(a.html, to_html(sections))
    print(text)
    return 0
