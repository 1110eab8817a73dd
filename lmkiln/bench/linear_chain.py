"""``python -m lmkiln.bench.linear_chain``: the 7B decoder's linears as one forward, one CUDA graph.

``lmkiln bench kernels`` times each GEMM alone (one graph replay per call), which charges every kernel a
graph launch of its own. A decode step runs the 128 GEMMs of the 32 layers back to back inside one graph.
This benchmark times that: 32 layers x (qkv, o, gate_up, down), each with its own random int4 weights
(3.4 GB, far beyond L2), in layer order, in one graph, with ``triton.testing.do_bench``; our kernels (the
dispatcher's choice, what the engine runs) beside fp16 cuBLAS (``F.linear``) and torch's tinygemm (bf16) on
the same shapes, in the same process. The HBM floor is our bytes over the copy bandwidth measured in the
run. Results go to ``linear_chain.json``.

``--pdl off 0 8 16`` also times our chain with programmatic dependent launch off, and on with each L2
prefetch budget in MiB (``lmkiln.kernels.pdl``), into ``row["pdl"]``.

``--sweep`` picks launch configurations the same way: for each shape, ``--layers`` distinct weights in one
graph, every candidate of ``--kinds`` (default ``fma``) of ``lmkiln bench kernels --tune`` (plus the
dispatcher's current choice and tinygemm), microseconds per call, to ``linear_chain_sweep.json``. A GEMM timed
alone pays its launch, ramp and tail in full; inside a forward they overlap, so the winners differ
(notes/kernels.md, "Session 5").
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmkiln.artifact import write_json_atomic
from lmkiln.bench import report_main
from lmkiln.bench.kernels import (
    LLAMA2_7B_LAYERS,
    LLAMA2_7B_SHAPES,
    copy_bandwidth_gbps,
    make_weights,
    our_bytes,
    tinygemm_pack,
)
from lmkiln.errors import QuantConfigError
from lmkiln.kernels.dispatch import KERNEL_KINDS

log = logging.getLogger(__name__)

ORDER = ("qkv", "o", "gate_up", "down")
COLUMNS = ("ours", "fp16", "tinygemm", "floor_ms")


def _graph_ms(fn: Callable[[], Any], rep_ms: int) -> float:
    """Median ms of one replay of a graph holding ``fn`` (warmed up eagerly first, on a side stream)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def run(
    out_dir: Path,
    ms: Sequence[int],
    layers: int = LLAMA2_7B_LAYERS,
    group_size: int = 128,
    rep_ms: int = 200,
    baselines: bool = True,
    pdl_variants: Sequence[str] = (),
) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise QuantConfigError("bench linear_chain needs a CUDA GPU (none is visible)")
    from lmkiln.kernels import dispatch, pdl
    from lmkiln.kernels.w4a16 import make_scratch

    dev = torch.device("cuda")
    bw = copy_bandwidth_gbps(dev)
    weights = [
        [
            make_weights(*LLAMA2_7B_SHAPES[name], group_size, dev, seed=1000 * layer + j)
            for j, name in enumerate(ORDER)
        ]
        for layer in range(layers)
    ]
    scratch = make_scratch(dev)
    rows: list[dict[str, Any]] = []
    for m in ms:
        xs = {
            name: torch.randn(m, LLAMA2_7B_SHAPES[name][0], device=dev, dtype=torch.float16) for name in ORDER
        }
        floor_ms = (
            sum(our_bytes(m, *LLAMA2_7B_SHAPES[name], group_size) for name in ORDER) * layers / bw / 1e6
        )
        row: dict[str, Any] = {"m": m, "floor_ms": floor_ms}
        cfgs = {
            name: dispatch.choose_config(m, *reversed(LLAMA2_7B_SHAPES[name]), group_size, torch.float16, dev)
            for name in ORDER
        }

        def ours(xs: dict = xs, cfgs: dict = cfgs) -> None:
            for layer in weights:
                for name, w in zip(ORDER, layer, strict=True):
                    dispatch.w4a16_matmul(xs[name], w.qweight, w.sz, w.zeros, scratch, cfgs[name])

        row["ours"] = _graph_ms(ours, rep_ms)
        row["kinds"] = {name: c.kind for name, c in cfgs.items()}
        row["pdl"] = {}
        for variant in pdl_variants:
            with pdl.setting(variant):
                row["pdl"][variant] = _graph_ms(ours, rep_ms)
        if baselines:
            import torch.nn.functional as F

            w16 = [[w.dequant(torch.float16).t().contiguous() for w in layer] for layer in weights]

            def fp16(w16: list = w16, xs: dict = xs) -> None:
                for layer in w16:
                    for name, w in zip(ORDER, layer, strict=True):
                        F.linear(xs[name], w)

            row["fp16"] = _graph_ms(fp16, rep_ms)
            del w16
            tg = [[tinygemm_pack(w)[:2] for w in layer] for layer in weights]
            xb = {name: x.to(torch.bfloat16) for name, x in xs.items()}

            def tinygemm(tg: list = tg, xb: dict = xb) -> None:
                for layer in tg:
                    for name, (q, sz) in zip(ORDER, layer, strict=True):
                        torch._weight_int4pack_mm(xb[name], q, group_size, sz)

            row["tinygemm"] = _graph_ms(tinygemm, rep_ms)
            del tg
            torch.cuda.empty_cache()
        log.info("M=%d: %s", m, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
    return _write_report(out_dir / "linear_chain.json", bw, layers, group_size, rows=rows)


def _write_report(path: Path, bw: float, layers: int, group_size: int, **results: Any) -> dict[str, Any]:
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": bw,
        "layers": layers,
        "group_size": group_size,
        **results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    return report


def _sweep_shape(
    name: str,
    seed: int,
    ms: Sequence[int],
    layers: int,
    group_size: int,
    rep_ms: int,
    bw: float,
    kinds: Sequence[str] = ("fma",),
) -> dict[str, Any]:
    from lmkiln.bench.kernels import candidates_against
    from lmkiln.kernels import dispatch
    from lmkiln.kernels.w4a16 import make_scratch

    dev = torch.device("cuda")
    k, n = LLAMA2_7B_SHAPES[name]
    ws = [make_weights(k, n, group_size, dev, seed=1000 * layer + seed) for layer in range(layers)]
    tg = [tinygemm_pack(w)[:2] for w in ws]
    scratch = make_scratch(dev)

    def ours(x: torch.Tensor, cfg: Any) -> None:
        for w in ws:
            dispatch.w4a16_matmul(x, w.qweight, w.sz, w.zeros, scratch, cfg)

    def tinygemm(x: torch.Tensor) -> None:
        for q, sz in tg:
            torch._weight_int4pack_mm(x, q, group_size, sz)

    by_m: dict[str, Any] = {}
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        current = dispatch.choose_config(m, n, k, group_size, torch.float16, dev)
        cands = candidates_against(current, m, n, k, kinds)
        rows = [
            {"config": c.to_dict(), "us": _graph_ms(functools.partial(ours, x, c), rep_ms) / layers * 1e3}
            for c in cands
        ]
        rows[0]["current"] = True
        rows.sort(key=lambda r: r["us"])
        xb = x.to(torch.bfloat16)
        by_m[str(m)] = {
            "floor_us": our_bytes(m, k, n, group_size) / bw / 1e3,
            "tinygemm_us": _graph_ms(functools.partial(tinygemm, xb), rep_ms) / layers * 1e3,
            "rows": rows,
        }
        cur = next(r["us"] for r in rows if r.get("current"))
        log.info("%s M=%d: best %.2f us, current %.2f us", name, m, rows[0]["us"], cur)
    return by_m


def sweep(
    out_dir: Path,
    ms: Sequence[int],
    layers: int = LLAMA2_7B_LAYERS,
    group_size: int = 128,
    rep_ms: int = 50,
    kinds: Sequence[str] = ("fma",),
) -> dict[str, Any]:
    """Per shape and M: every candidate of ``kinds`` timed in a chain of ``layers`` distinct weights (us per
    call)."""
    if not torch.cuda.is_available():
        raise QuantConfigError("bench linear_chain --sweep needs a CUDA GPU (none is visible)")
    bw = copy_bandwidth_gbps(torch.device("cuda"))
    shapes = {}
    for j, name in enumerate(ORDER):
        shapes[name] = _sweep_shape(name, j, ms, layers, group_size, rep_ms, bw, kinds)
        torch.cuda.empty_cache()
    return _write_report(out_dir / "linear_chain_sweep.json", bw, layers, group_size, shapes=shapes)


def format_sweep(report: dict[str, Any]) -> str:
    lines = [
        f"{report['device']}: us per call, {report['layers']} distinct weights of one shape in one graph",
        "| shape | M | best | current | tinygemm | floor | best config |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_m in report["shapes"].items():
        for m, r in by_m.items():
            best = r["rows"][0]
            cur = next(x["us"] for x in r["rows"] if x.get("current"))
            c = best["config"]
            desc = f"{c['kind']} bn{c['block_n']} w{c['num_warps']} s{c['split_k']} c{c['chunks']}"
            lines.append(
                f"| {name} | {m} | {best['us']:.2f} | {cur:.2f} | {r['tinygemm_us']:.2f} "
                f"| {r['floor_us']:.2f} | {desc} f{c['flush']} |"
            )
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    cols = list(COLUMNS)
    lines = [
        f"{report['device']}: {report['layers']} layers x {ORDER}, one graph, ms per forward",
        "| M | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for row in report["rows"]:
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in cols]
        lines.append(f"| {row['m']} | " + " | ".join(cells) + " |")
    for row in report["rows"]:
        if row.get("pdl"):
            pdl = ", ".join(f"{v}: {ms:.3f}" for v, ms in row["pdl"].items())
            lines.append(f"M={row['m']} ours with PDL off / on with N MiB prefetch: {pdl}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lmkiln.bench.linear_chain", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=Path("results/bench/linear_chain"))
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--layers", type=int, default=LLAMA2_7B_LAYERS)
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument(
        "--pdl", nargs="+", default=[], metavar="VARIANT",
        help="also time ours with PDL 'off' and on with each prefetch budget in MiB, e.g. --pdl off 0 8",
    )
    p.add_argument("--sweep", action="store_true", help="time each candidate per shape, in a chain")
    p.add_argument(
        "--kinds", nargs="+", default=["fma"], choices=KERNEL_KINDS,
        help="kernel kinds --sweep times (beside the dispatcher's current choice)",
    )
    args = p.parse_args(argv)
    if args.sweep:
        return report_main(
            lambda: sweep(args.out, args.m, args.layers, args.group_size, min(args.rep_ms, 50), args.kinds),
            format_sweep,
        )
    return report_main(
        lambda: run(
            args.out, args.m, args.layers, args.group_size, args.rep_ms, not args.no_baselines, args.pdl
        ),
        format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
