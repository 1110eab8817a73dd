"""Plots of ``snakemake bench`` (matplotlib, Agg backend; PNG or SVG by the output's suffix).

Each function reads the JSON reports of the measurements and writes one figure whose title names the
device that produced the numbers: held-out perplexity per model (bars), next-token agreement, decode
tokens/s against batch size (ours and the baselines), latency CDFs of the serving load test, and the W4A16
kernels' achieved bandwidth against M with the copy-bandwidth floor. The kernels' roofline figure itself is
``lmkiln.bench.kernels.plot_roofline`` (written by ``lmkiln bench kernels``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmkiln.errors import DataError

PPL_MODELS = (  # key in the reports -> bar label
    ("reference", "fp16"),
    ("rtn", "RTN int4"),
    ("awq", "AWQ int4"),
    ("kv8", "AWQ + KV int8"),
    ("kv4", "AWQ + KV int4"),
)
COLORS = {"fp16": "tab:gray", "RTN int4": "tab:orange", "AWQ int4": "tab:red", "AWQ + KV int8": "tab:purple",
          "AWQ + KV int4": "tab:brown"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, e.g. the device name)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    from lmkiln.artifact import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    _pyplot().close(fig)


def ppl_table(ppl: dict[str, Any], kv: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """text -> {bar label: perplexity} from ``eval/ppl.json`` and, if given, the engine's KV-quantized
    perplexities (``kv``: ``{"results": {text: {"kv8": ppl, "kv4": ppl}}}``)."""
    table: dict[str, dict[str, float]] = {}
    for text, r in ppl["results"].items():
        row = {**r, **((kv or {}).get("results", {}).get(text, {}))}
        table[text] = {label: float(row[key]) for key, label in PPL_MODELS if key in row}
    return table


def plot_ppl(ppl: dict[str, Any], out: Path, device: str, kv: dict[str, Any] | None = None) -> None:
    """Grouped bars: perplexity of each model per held-out text, with its increase over fp16."""
    plt = _pyplot()
    table = ppl_table(ppl, kv)
    labels = [label for _, label in PPL_MODELS if any(label in r for r in table.values())]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(labels) * len(table), 4.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [t + (i - (len(labels) - 1) / 2) * width for t in range(len(table))]
        ys = [r.get(label, math.nan) for r in table.values()]
        bars = ax.bar(xs, ys, width, label=label, color=COLORS.get(label))
        for bar, (r, y) in zip(bars, zip(table.values(), ys, strict=True), strict=True):
            if y == y and label != "fp16" and "fp16" in r:
                ax.annotate(f"{y:.2f}\n{100 * (y / r['fp16'] - 1):+.1f}%", (bar.get_x() + width / 2, y),
                            ha="center", va="bottom", fontsize=7)
            elif y == y:
                ax.annotate(f"{y:.2f}", (bar.get_x() + width / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(table)), list(table))
    top = max(v for r in table.values() for v in r.values())
    ax.set_ylim(0, top * 1.32)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"Held-out perplexity, group size {ppl.get('group_size', '?')}\n{device}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(labels), loc="upper center", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def plot_agreement(quality: dict[str, Any], out: Path) -> None:
    """Bars: top-1 next-token agreement of each quantized model with fp16, per text."""
    plt = _pyplot()
    texts = list(quality["agreement"])
    names = [n for n in ("rtn", "awq", "packed") if any(n in r for r in quality["agreement"].values())]
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(texts) * len(names), 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [t + (i - (len(names) - 1) / 2) * width for t in range(len(texts))]
        ys = [100 * quality["agreement"][t][name]["top1"] for t in texts]
        bars = ax.bar(xs, ys, width, label=name, color={"rtn": "tab:orange", "awq": "tab:red"}.get(name))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(texts)), texts)
    ax.set_ylim(0, 115)
    ax.set_ylabel("top-1 next token = fp16's (%)")
    ax.set_title(f"Next-token agreement with fp16 ({quality['dtype']})\n{quality['device']}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(names), loc="upper center", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)


def _plain_log_axes(ax, xs: Sequence[int]) -> None:
    """Log-log axes labelled with plain numbers, x ticks at the measured values."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(xs)))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def decode_series(engine: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """label -> [(batch, decode tok/s)] from ``engine.json`` (``{"decode": {label: [{"batch": B,
    "decode_tok_s": x}, ...]}}``, as ``lmkiln bench engine`` writes it)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for label, rows in (engine.get("decode") or {}).items():
        pts = [(int(r["batch"]), float(r["decode_tok_s"])) for r in rows
               if isinstance(r.get("decode_tok_s"), int | float) and math.isfinite(r["decode_tok_s"])]
        if pts:
            series[label] = sorted(pts)
    return series


def plot_tokps(engine: dict[str, Any], out: Path) -> None:
    """Decode output tokens/s against batch size: our engine and the baselines of the same run."""
    plt = _pyplot()
    series = decode_series(engine)
    if not series:
        raise DataError("engine.json has no decode rows to plot; rerun `lmkiln bench engine` without "
                        "options that skip the decode measurement")
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for label, pts in series.items():
        ours = not label.startswith("hf")
        ax.plot(*zip(*pts, strict=True), marker="o", lw=2 if ours else 1.3, ls="-" if ours else "--",
                label=label)
        for b, y in pts:
            ax.annotate(f"{y:,.1f}" if y < 100 else f"{y:,.0f}", (b, y), textcoords="offset points",
                        xytext=(4, -3 if ours else 4), fontsize=7)
    _plain_log_axes(ax, [b for pts in series.values() for b, _ in pts])
    ax.set_xlabel("batch size (concurrent sequences)")
    ax.set_ylabel("decode output tokens / s")
    cfg = engine.get("settings", {})
    shape = f", prompt {cfg['prompt_len']} / output {cfg['output_len']} tokens" if "prompt_len" in cfg else ""
    ax.set_title(f"Decode throughput{shape}\n{engine.get('device', '?')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


def _cdf(ax, xs: Sequence[float], label: str, scale: float = 1e3) -> None:
    s = sorted(x * scale for x in xs)
    ax.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post", label=f"{label} (n={len(s)})")


def plot_latency_cdf(serve: dict[str, Any], out: Path) -> None:
    """CDFs of TTFT and TPOT (ms) per request of the serving load test (HTTP, streaming, with aborts)."""
    sources = [("serve", serve)]
    if not any((rep.get("samples") or {}).get(m) for _, rep in sources for m in ("ttft_s", "tpot_s")):
        raise DataError("serve.json has no per-request samples; rerun `lmkiln bench serve` (it records them)")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, metric, title in ((axes[0], "ttft_s", "time to first token"),
                              (axes[1], "tpot_s", "time per output token")):
        for name, rep in sources:
            samples = (rep.get("samples") or {}).get(metric) or []
            if samples:
                _cdf(ax, samples, name)
                p = rep.get(metric) or {}
                for q, ls in (("p50", ":"), ("p99", "--")):
                    if p.get(q) is not None:
                        ax.axvline(p[q] * 1e3, color="k", ls=ls, lw=0.8)
                        ax.annotate(f"{name} {q} {p[q] * 1e3:.1f}", (p[q] * 1e3, 0.02 if q == "p50" else 0.1),
                                    rotation=90, fontsize=7, ha="right")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    cfg = serve.get("config", {})
    fig.suptitle(f"Latency under load: {serve.get('requests')} requests, "
                 f"concurrency {cfg.get('concurrency')}, "
                 f"{serve.get('aborted')} aborted mid-stream\n{serve.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    _save(fig, out)


def plot_kernel_bandwidth(kernels: dict[str, Any], out: Path) -> None:
    """Achieved bandwidth (bytes our GEMM must move / time) against M per shape, with the measured copy
    bandwidth as the floor line (a kernel on that line runs at the HBM floor), and tinygemm / fp16 cuBLAS
    achieved bandwidth on the same bytes for comparison."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    rows = kernels["results"]
    markers = {"qkv": "o", "o": "s", "gate_up": "^", "down": "v"}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = sorted((r["m"], r["bytes_ours"] / (r["ours_us"] * 1e-6) / 1e9) for r in rows
                     if r["shape"] == shape)
        ax.plot(*zip(*pts, strict=True), marker=markers.get(shape, "o"), color="tab:red",
                label=f"ours {shape}")
        tg = sorted((r["m"], r["bytes_ours"] / (r["tinygemm_us"] * 1e-6) / 1e9) for r in rows
                    if r["shape"] == shape and "tinygemm_us" in r)
        if tg:
            ax.plot(*zip(*tg, strict=True), marker=markers.get(shape, "o"), color="tab:green", ls=":", lw=1,
                    ms=4, label=f"tinygemm {shape}")
        fp = sorted((r["m"], r["bytes_fp16"] / (r["fp16_us"] * 1e-6) / 1e9) for r in rows
                    if r["shape"] == shape and "fp16_us" in r)
        if fp:
            ax.plot(*zip(*fp, strict=True), marker=markers.get(shape, "o"), color="tab:blue", ls="--", lw=1,
                    ms=4, label=f"fp16 cuBLAS {shape}")
    ax.axhline(kernels["copy_bw_GBps"], color="k", lw=1.5,
               label=f"floor: copy {kernels['copy_bw_GBps']:.0f} GB/s")
    _plain_log_axes(ax, [r["m"] for r in rows])
    ax.set_yscale("linear")
    ax.set_xlabel("M (tokens per GEMM)")
    ax.set_ylabel("achieved bandwidth (GB/s)")
    ax.set_title(f"W4A16 GEMM bandwidth, Llama-2-7B linears, g{kernels.get('group_size')}\n"
                 f"{kernels['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    _save(fig, out)


def _read(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the report {path}: {e}; rerun the rule that writes it") from e


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmkiln bench plot", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["ppl", "agreement", "tokps", "latency", "bandwidth", "roofline"])
    p.add_argument("--ppl", type=Path, help="eval/ppl.json (kind ppl)")
    p.add_argument("--kv-ppl", type=Path, help="the engine's KV-quantized perplexities (kind ppl)")
    p.add_argument("--quality", type=Path, help="bench quality JSON (kinds ppl: its device, agreement)")
    p.add_argument("--engine", type=Path, help="engine.json (kind tokps)")
    p.add_argument("--serve", type=Path, help="serve.json (kind latency)")
    p.add_argument("--kernels", type=Path, help="kernels.json (kinds bandwidth, roofline)")
    p.add_argument("--device", default=None, help="device label of the figure (default: from the reports)")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png or .svg)")
    a = p.parse_args(argv)
    need = {"ppl": "ppl", "agreement": "quality", "tokps": "engine", "latency": "serve",
            "bandwidth": "kernels", "roofline": "kernels"}[a.kind]
    try:
        if getattr(a, need) is None:
            raise DataError(f"`lmkiln bench plot {a.kind}` needs --{need.replace('_', '-')}")
        if a.kind == "ppl":
            quality, kv = _read(a.quality), _read(a.kv_ppl)
            device = a.device or (kv or quality or {}).get("device", "device not recorded")
            plot_ppl(_read(a.ppl), a.out, device, kv)
        elif a.kind == "agreement":
            plot_agreement(_read(a.quality), a.out)
        elif a.kind == "tokps":
            plot_tokps(_read(a.engine), a.out)
        elif a.kind == "latency":
            plot_latency_cdf(_read(a.serve), a.out)
        elif a.kind == "bandwidth":
            plot_kernel_bandwidth(_read(a.kernels), a.out)
        else:
            from lmkiln.bench.kernels import plot_roofline

            plot_roofline(_read(a.kernels), a.out)
    except DataError as e:
        print(f"lmkiln bench plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
