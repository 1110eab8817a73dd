"""``lmkiln bench quality``: next-token agreement with the fp16 model, and model size on disk / in memory.

On the same held-out windows as the perplexity protocol (``lmkiln.eval.ppl``), each quantized model (RTN
of the reference weights, the AWQ artifact, the packed artifact) is run beside the reference and compared
at every position: the fraction where its greedy (top-1) token equals the reference's, and the mean
``KL(reference || quantized)`` of the next-token distributions. Sizes: the bytes of each artifact directory
on disk and the bytes of the tensors the engine's loader holds for it on the device.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmkiln.errors import DataError, LmkilnError

log = logging.getLogger(__name__)


def describe_device(device: str | torch.device) -> str:
    """A human name for the device a measurement ran on, e.g. ``NVIDIA H100 80GB HBM3`` or
    ``AMD EPYC (CPU, 2 cores)``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name or platform.processor() or platform.machine()} (CPU, {cores} cores)"


def disk_bytes(path: str | Path) -> int:
    """Bytes of every file under ``path`` (an artifact or model directory)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (tied weights once)."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@torch.no_grad()
def agreement(reference: torch.nn.Module, candidate: torch.nn.Module, windows: torch.Tensor,
              batch_size: int = 4) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || candidate) of the next-token distributions over every
    position of ``windows`` [n, L] (every position predicts the next token, as in perplexity)."""
    device = next(reference.parameters()).device
    same, kl, count = 0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        ref = F.log_softmax(reference(batch)[:, :-1].float(), dim=-1)
        cand = F.log_softmax(candidate(batch)[:, :-1].float(), dim=-1)
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl += float(F.kl_div(cand, ref, log_target=True, reduction="sum"))
        count += ref.shape[0] * ref.shape[1]
    return {"top1": same / count, "kl": kl / count, "positions": count}


def _loaders(model_dir: Path, awq_dir: Path | None, packed_dir: Path | None, device: str, dtype: str
             ) -> dict[str, Callable[[], Any]]:
    """Candidate name -> a function loading it with the engine's loader (a ``LoadedModel``)."""
    from lmkiln.engine.loader import load_model
    from lmkiln.eval.ppl import rtn_model
    from lmkiln.models.checkpoint import Checkpoint
    from lmkiln.quant.rtn import QuantSpec

    out: dict[str, Callable[[], Any]] = {}
    if awq_dir is not None:
        qc = Checkpoint(awq_dir).quantization_config or {}
        spec = QuantSpec(qc.get("bits", 4), qc.get("group_size", 128))

        def rtn() -> Any:
            loaded = load_model(model_dir, device, dtype)
            rtn_model(loaded.model, spec)
            return loaded

        out["rtn"] = rtn
        out["awq"] = lambda: load_model(awq_dir, device, dtype, verify=True)
    if packed_dir is not None:
        out["packed"] = lambda: load_model(packed_dir, device, dtype, verify=True)
    return out


def run(model_dir: Path, awq_dir: Path | None, packed_dir: Path | None, windows: dict[str, torch.Tensor],
        device: str = "cpu", dtype: str = "auto", batch_size: int = 4) -> dict[str, Any]:
    """Agreement of every candidate with the reference on each text, and each model's sizes."""
    from lmkiln.engine.loader import load_model

    t0 = time.perf_counter()
    ref = load_model(model_dir, device, dtype)
    sizes = {"fp16": {"path": str(model_dir), "disk_bytes": disk_bytes(model_dir),
                      "memory_bytes": tensor_bytes(ref.model),
                      "dtype": str(ref.dtype).removeprefix("torch.")}}
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in windows}
    paths = {"awq": awq_dir, "packed": packed_dir}
    for name, load in _loaders(model_dir, awq_dir, packed_dir, device, dtype).items():
        cand = load()
        if name in paths:
            sizes[name] = {"path": str(paths[name]), "disk_bytes": disk_bytes(paths[name]),
                           "memory_bytes": tensor_bytes(cand.model),
                           "dtype": str(cand.dtype).removeprefix("torch.")}
        for text, w in windows.items():
            results[text][name] = agreement(ref.model, cand.model, w, batch_size)
            log.info("agreement %-8s %-22s top1 %.4f kl %.5f", name, text, results[text][name]["top1"],
                     results[text][name]["kl"])
        del cand
    return {
        "benchmark": "quality",
        "device": describe_device(ref.device),
        "device_type": ref.device.type,
        "dtype": str(ref.dtype).removeprefix("torch."),
        "protocol": {name: {"windows": int(w.shape[0]), "window_len": int(w.shape[1])}
                     for name, w in windows.items()},
        "agreement": results,
        "sizes": sizes,
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def format_table(report: dict[str, Any]) -> str:
    names = sorted({n for r in report["agreement"].values() for n in r}, key=["rtn", "awq", "packed"].index)
    lines = [f"next-token agreement with fp16 ({report['device']}): top-1 % / KL"]
    lines.append(f"{'text':<22} " + " ".join(f"{n:>16}" for n in names))
    for text, r in report["agreement"].items():
        cells = [f"{100 * r[n]['top1']:>7.2f}% {r[n]['kl']:>7.4f}" for n in names]
        lines.append(f"{text:<22} " + " ".join(cells))
    lines.append(f"{'model':<8} {'disk MiB':>10} {'memory MiB':>11}  dtype")
    for name, s in report["sizes"].items():
        lines.append(f"{name:<8} {s['disk_bytes'] / 2**20:>10.1f} {s['memory_bytes'] / 2**20:>11.1f}  "
                     f"{s['dtype']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkiln bench quality", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the reference (fp16) HF checkpoint")
    p.add_argument("--awq", type=Path, default=None, help="AWQ artifact (also enables the RTN comparison)")
    p.add_argument("--packed", type=Path, default=None, help="packed artifact")
    p.add_argument("--texts", nargs="+", default=["pride_and_prejudice", "wiki_sample"])
    p.add_argument("--text-dir", type=Path, default=Path("resources/text"))
    p.add_argument("--tokens", type=int, default=4096, help="first tokens of each text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, the model's on GPU) | float16 | ...")
    p.add_argument("--out", type=Path, required=True, help="JSON report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lmkiln.artifact import write_json_atomic
    from lmkiln.data.calib import eval_token_windows, load_text
    from lmkiln.quant.pipeline import load_tokenizer

    try:
        if a.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {a.batch_size}")
        tok = load_tokenizer(a.model)
        windows = {name: eval_token_windows(tok, load_text(name, a.text_dir), a.tokens, a.window, a.add_bos)
                   for name in a.texts}
        report = run(a.model, a.awq, a.packed, windows, a.device, a.dtype, a.batch_size)
    except LmkilnError as e:
        print(f"lmkiln bench quality: error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(a.out, report)
    print(format_table(report))
    return 0


def kv_main(argv: Sequence[str] | None = None) -> int:
    """``lmkiln bench kv-ppl``: perplexity through the engine with the KV cache in fp / int8 / int4
    (:mod:`lmkiln.eval.engine_ppl`, ``eval ppl``'s protocol), labelled with the device that ran it."""
    from lmkiln.eval.engine_ppl import format_table as kv_table
    from lmkiln.eval.engine_ppl import run as engine_ppl

    p = argparse.ArgumentParser(prog="lmkiln bench kv-ppl", description=kv_main.__doc__)
    p.add_argument("model", type=Path, help="the packed (or AWQ / HF) directory the engine serves")
    p.add_argument("--texts", nargs="+", default=["pride_and_prejudice", "wiki_sample"])
    p.add_argument("--text-dir", type=Path, default=Path("resources/text"))
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--quant-policy", type=int, nargs="+", default=[0, 8, 4], choices=(0, 8, 4))
    p.add_argument("--reference", type=Path, default=None, help="eval/ppl.json: compare kv0 with its AWQ ppl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lmkiln.artifact import write_json_atomic
    from lmkiln.engine.loader import resolve_device

    try:
        report = engine_ppl(a.model, a.texts, a.out, a.quant_policy, a.text_dir, a.tokens, a.window,
                            a.add_bos, a.device, reference=a.reference)
        report["device_type"] = report["device"]
        report["device"] = describe_device(resolve_device(a.device))
        write_json_atomic(a.out, report)
    except LmkilnError as e:
        print(f"lmkiln bench kv-ppl: error: {e}", file=sys.stderr)
        return 2
    print(kv_table(report))
    print(f"checks: {'passed' if report['checks']['passed'] else 'FAILED'} {report['checks']['failures']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
