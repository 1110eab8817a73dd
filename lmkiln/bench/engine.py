"""``lmkiln bench engine``: the engine's decode speed vs batch size (ours vs HF transformers), throughput
under load, and interactive-session TTFT; writes ``engine.json`` and ``engine.png`` to ``--out``.

* decode: per batch size, random prompts of ``--prompt-len`` tokens, ``--output-len`` tokens each with
  ``ignore_eos``; decode tok/s = ``B * (output_len - 1)`` / (time from the last first token to the end).
  Ours for every model variant (int4 packed, fp), then HF ``generate`` on the fp weights with
  ``cache_implementation="static"`` (compiled on CUDA; the compile is warmed up first and not timed) and,
  on CUDA, HF with torch's int4 tinygemm linears (``torch._weight_int4pack_mm``) on RTN weights. HF's decode
  time is ``generate(output_len) - generate(1)``.
* throughput: ``--num-requests`` random prompts submitted at once to one :class:`LLMEngine`: requests/s,
  output tok/s, TTFT and TPOT p50/p99, peak GPU memory, for each ``--quant-policy``.
* session: TTFT of turn ``--session-turns`` of an interactive session vs turn 1 (KV reused between turns).

``MODEL_DIR`` is an HF / AWQ / packed dir, or ``synthetic``: a Llama-2-7B-shaped model with random fp16
weights plus its RTN int4 g128 packed artifact, built in ``--workdir`` on the GPU host (reused if there).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


# ------------------------------------------------------------------------------------------- synthetic


def build_synthetic(workdir: Path, shape: dict | None = None, group_size: int = 128) -> tuple[Path, Path]:
    """A random-weight fp16 HF dir and its RTN int4 packed artifact (``(hf_dir, packed_dir)``), reused if
    already built. Quantization and packing run on the GPU when there is one."""
    from lmkiln.bench.quantize import LLAMA2_7B, write_random_llama

    shape = shape or LLAMA2_7B
    tag = f"llama-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-random"
    hf_dir, packed_dir = workdir / tag, workdir / f"{tag}-packed-g{group_size}"
    if (packed_dir / "manifest.json").is_file() and (hf_dir / "model.safetensors.index.json").is_file():
        log.info("reusing %s and %s", hf_dir, packed_dir)
        return hf_dir, packed_dir
    t0 = time.perf_counter()
    shutil.rmtree(hf_dir, ignore_errors=True)
    write_random_llama(hf_dir, shape)
    log.info("wrote %s in %.1f s", hf_dir, time.perf_counter() - t0)
    t0 = time.perf_counter()
    pack_random_llama(hf_dir, packed_dir, group_size)
    log.info("packed %s in %.1f s", packed_dir, time.perf_counter() - t0)
    return hf_dir, packed_dir


def pack_random_llama(hf_dir: Path, packed_dir: Path, group_size: int) -> Path:
    """RTN-quantize every decoder linear of an fp16 HF dir straight into the packed layout (q/k/v and
    gate/up fused), with the manifest ``lite pack`` writes."""
    from lmkiln.artifact import (
        copy_file_atomic,
        save_safetensors_atomic,
        staged_dir,
        write_json_atomic,
        write_manifest,
    )
    from lmkiln.models.checkpoint import Checkpoint
    from lmkiln.quant.awq import awq_config_json
    from lmkiln.quant.pack import FUSED_LINEARS, MODEL_FILE, SINGLE_LINEARS, layout_info, pack_codes
    from lmkiln.quant.rtn import QuantSpec, quantize_codes

    spec = QuantSpec(4, group_size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = Checkpoint(hf_dir)
    cfg = ckpt.config
    out: dict[str, torch.Tensor] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in ckpt:
            out[name] = ckpt.get(name, torch.float16)
    fused_sizes: dict[str, list[int]] = {}
    for i in range(cfg.num_layers):
        base = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{base}.{norm}.weight"] = ckpt.get(f"{base}.{norm}.weight", torch.float16)
        jobs = [*FUSED_LINEARS.items(), *((s, (s,)) for s in SINGLE_LINEARS)]
        for target, parts in jobs:
            qs = [quantize_codes(ckpt.get(f"{base}.{p}.weight", torch.float32).to(dev), spec) for p in parts]
            if len(parts) > 1:
                fused_sizes[target] = [q[0].shape[0] for q in qs]
            codes, zeros, scales = (torch.cat([q[j] for q in qs]).t().contiguous() for j in range(3))
            for key, v in pack_codes(codes, zeros, scales).items():
                out[f"{base}.{target}.{key}"] = v.cpu()
    with staged_dir(packed_dir) as tmp:
        save_safetensors_atomic(tmp / MODEL_FILE, dict(sorted(out.items())), metadata={"format": "pt"})
        raw = json.loads((hf_dir / "config.json").read_text())
        write_json_atomic(tmp / "config.json", awq_config_json(raw, spec))
        for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if (hf_dir / f).is_file():
                copy_file_atomic(hf_dir / f, tmp / f)
        write_manifest(tmp, kind="packed", info={
            "format": "lmkiln-packed", **layout_info(), "bits": 4, "group_size": group_size,
            "fused": {k: list(v) for k, v in FUSED_LINEARS.items()}, "fused_sizes": fused_sizes,
            "padded_in_features": {}, "source": {"synthetic": str(hf_dir.name), "method": "rtn"},
        })
    return packed_dir


# ----------------------------------------------------------------------------------------------- utils


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def _engine(model_dir: Path, loaded: Any, device: str, max_num_seqs: int, session_len: int,
            quant_policy: int = 0, eager: bool = False, cache: float | int | None = None,
            async_scheduling: bool = True) -> Any:
    from lmkiln.engine import LLMEngine
    from lmkiln.engine.config import EngineConfig

    if cache is None:  # the CPU gets exactly what the batch needs
        cache = 0.85 if loaded.device.type == "cuda" else max_num_seqs * -(-session_len // 64)
    cfg = EngineConfig(model_dir, device=device, cache_max_entry_count=cache, max_num_seqs=max_num_seqs,
                       session_len=session_len, quant_policy=quant_policy, eager=eager, verify_artifact=False,
                       max_prefill_token_num=8192, async_scheduling=async_scheduling)
    return LLMEngine(cfg, tokenizer=None, loaded=loaded)


def _run(engine: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    """Submit all prompts at once and step to the end; per-request first-token and finish times, and when
    each step returned."""
    t0 = time.perf_counter()
    start, first, done, ntok, steps = {}, {}, {}, {}, []
    for p in prompts:
        rid = engine.add_request(p, params)
        start[rid] = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps.append(now)
        for o in outs:
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = now
            if o.finished:
                done[o.request_id], ntok[o.request_id] = now, len(o.token_ids)
    return {"t0": t0, "start": start, "first": first, "done": done, "ntok": ntok, "steps": steps,
            "end": time.perf_counter()}


# ---------------------------------------------------------------------------------------------- decode


def bench_decode_ours(engine: Any, batch_sizes: Sequence[int], prompt_len: int, output_len: int,
                      vocab: int) -> list[dict[str, Any]]:
    from lmkiln.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    _run(engine, _prompts(min(batch_sizes), prompt_len, vocab, 99), warm)
    rows = []
    for b in batch_sizes:
        r = _run(engine, _prompts(b, prompt_len, vocab, b), params)
        t_first = max(r["first"].values())
        decode_s = r["end"] - t_first
        total = sum(r["ntok"].values())
        # the decode steps one by one: a mean (tokens/s) above the median means rare long steps
        step_ms = [1000 * (y - x) for x, y in itertools.pairwise(r["steps"]) if x >= t_first]
        rows.append({
            "batch": b, "decode_tok_s": b * (output_len - 1) / decode_s if decode_s > 0 else math.nan,
            "total_tok_s": total / (r["end"] - r["t0"]), "prefill_s": t_first - r["t0"], "decode_s": decode_s,
            "tpot_ms": 1000 * decode_s / max(1, output_len - 1),
            "step_ms_p50": _pct(step_ms, 50), "step_ms_p99": _pct(step_ms, 99),
            "step_ms_max": max(step_ms, default=math.nan),
        })
        log.info("ours batch %4d: %.1f decode tok/s", b, rows[-1]["decode_tok_s"])
    return rows


def _hf_model(hf_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, device_map=str(device)).eval()


class TinygemmLinear(torch.nn.Module):
    """An ``nn.Linear`` replaced by torch's int4 tinygemm (RTN, same group size as ours)."""

    def __init__(self, lin: torch.nn.Linear, group_size: int) -> None:
        super().__init__()
        from lmkiln.bench.kernels import Weights, tinygemm_pack
        from lmkiln.quant.rtn import QuantSpec, quantize_codes

        codes, zeros, scales = quantize_codes(lin.weight.data.float(), QuantSpec(4, group_size))
        n, k = lin.weight.shape
        w = Weights(k, n, group_size, None, None, codes.t(), zeros.t(), scales.t())  # type: ignore[arg-type]
        self.packed, self.sz, _ = tinygemm_pack(w)
        self.group_size, self.out_features = group_size, n
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def to_tinygemm(model: Any, group_size: int) -> Any:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, TinygemmLinear(child, group_size))
    _free()
    return model


@torch.inference_mode()
def bench_decode_hf(model: Any, batch_sizes: Sequence[int], prompt_len: int, output_len: int, vocab: int,
                    device: torch.device) -> list[dict[str, Any]]:
    """HF ``generate``: static cache (compiled) on CUDA, the default dynamic cache on the CPU."""
    static = device.type == "cuda"
    kw: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}
    if static:
        kw["cache_implementation"] = "static"
    rows = []
    for b in batch_sizes:
        ids = torch.tensor(_prompts(b, prompt_len, vocab, b), device=device)
        mask = torch.ones_like(ids)

        def gen(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> float:
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
            _sync(device)
            return time.perf_counter() - t0

        row: dict[str, Any] = {"batch": b, "cache": "static" if static else "dynamic"}
        try:
            row["warmup_s"] = gen(output_len) if static else gen(2)  # compiles on CUDA
            t_prefill, t_full = gen(1), gen(output_len)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e)[:200]}"
            _free()
            rows.append(row)
            continue
        decode_s = t_full - t_prefill
        row.update({"decode_tok_s": b * (output_len - 1) / decode_s if decode_s > 0 else math.nan,
                    "total_tok_s": b * output_len / t_full, "prefill_s": t_prefill, "decode_s": decode_s})
        log.info("hf batch %4d: %.1f decode tok/s", b, row["decode_tok_s"])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ throughput, session


def bench_throughput(engine: Any, num_requests: int, prompt_len: int, output_len: int,
                     vocab: int) -> dict[str, Any]:
    from lmkiln.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    r = _run(engine, _prompts(num_requests, prompt_len, vocab, 7), params)
    wall = r["end"] - r["t0"]
    ttft = [r["first"][k] - r["start"][k] for k in r["first"]]
    tpot = [(r["done"][k] - r["first"][k]) / (r["ntok"][k] - 1) for k in r["done"] if r["ntok"][k] > 1]
    out_tokens = sum(r["ntok"].values())
    return {
        "num_requests": num_requests, "prompt_len": prompt_len, "output_len": output_len, "wall_s": wall,
        "requests_per_s": num_requests / wall, "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + num_requests * prompt_len) / wall,
        "ttft_ms": {"p50": 1000 * _pct(ttft, 50), "p99": 1000 * _pct(ttft, 99)},
        "tpot_ms": {"p50": 1000 * _pct(tpot, 50), "p99": 1000 * _pct(tpot, 99)},
        "kv_cache_gib": engine.runner.kv_cache.nbytes() / 2**30,
        "kv_blocks": engine.block_manager.num_blocks,
        "max_num_seqs": engine.config.max_num_seqs,
    }


def bench_session(engine: Any, turns: int, turn_len: int, output_len: int, vocab: int) -> dict[str, Any]:
    from lmkiln.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    rows = []
    for i, prompt in enumerate(_prompts(turns, turn_len, vocab, 11)):
        t0 = time.perf_counter()
        rid = engine.add_request(prompt, params, session_id="bench-session")
        ttft, cached = None, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id == rid and o.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
                if o.request_id == rid and o.finished:
                    cached = o.num_cached_tokens
        rows.append({"turn": i + 1, "ttft_ms": 1000 * (ttft or math.nan), "cached_tokens": cached})
    engine.end_session("bench-session")
    first, last = rows[0]["ttft_ms"], rows[-1]["ttft_ms"]
    return {"turns": rows, "turn_len": turn_len, "output_len": output_len,
            "ttft_first_ms": first, "ttft_last_ms": last, "ttft_last_over_first": last / first}


# ------------------------------------------------------------------------------------------------ main


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in report["decode"].items():
        ok = [r for r in rows if math.isfinite(r.get("decode_tok_s", math.nan))]
        pts = [(r["batch"], r["decode_tok_s"]) for r in ok]
        if pts:
            style = "--" if name.startswith("hf") else "-"
            ax.plot(*zip(*pts, strict=True), marker="o", ls=style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences decoding)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"decode throughput, {report['device']}\n{report['model']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    from lmkiln.artifact import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _ratios(decode: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per batch size, each of our variants' decode tok/s over each HF baseline's."""
    out: dict[str, dict[str, float]] = {}
    ours = {k: v for k, v in decode.items() if not k.startswith("hf")}
    hf = {k: v for k, v in decode.items() if k.startswith("hf")}
    for on, orows in ours.items():
        for hn, hrows in hf.items():
            hb = {r["batch"]: r.get("decode_tok_s", math.nan) for r in hrows}
            out[f"{on}/{hn}"] = {str(r["batch"]): r["decode_tok_s"] / hb[r["batch"]]
                                 for r in orows if hb.get(r["batch"]) and math.isfinite(hb[r["batch"]])}
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from lmkiln.bench.quantize import device_name
    from lmkiln.engine.loader import artifact_kind, load_model, resolve_device

    device = resolve_device(a.device)
    t_build = 0.0
    if str(a.model) == SYNTHETIC:
        t0 = time.perf_counter()
        hf_dir, packed = build_synthetic(a.workdir)
        t_build = time.perf_counter() - t0
        variants = [("ours-int4", packed, a.int4_dtype), ("ours-bf16", hf_dir, "bfloat16")]
        hf_fp: Path | None = hf_dir
    else:
        kind = artifact_kind(a.model)
        hf_fp = a.model if kind == "hf_model" else a.hf_model
        label = {"packed": "int4", "hf_model": "fp"}.get(kind, kind)
        variants = [(f"ours-{label}", a.model, a.dtype)]
        if a.hf_model is not None and kind != "hf_model":
            variants.append(("ours-fp", a.hf_model, a.dtype))
    report: dict[str, Any] = {
        "benchmark": "engine", "device": device_name() if device.type == "cuda" else f"cpu ({device_name()})",
        "model": str(a.model), "torch": torch.__version__, "synthetic_build_s": t_build,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "decode": {}, "throughput": {}, "session": None,
    }
    session_len = max(a.prompt_len + a.output_len, a.throughput_prompt_len + a.throughput_output_len,
                      a.session_turns * (a.session_turn_len + a.session_output_len)) + 8
    max_seqs = max(max(a.batch_sizes), 1 if a.skip_throughput else min(a.num_requests, a.max_num_seqs))
    if a.skip_decode:  # only the primary model's throughput (and session) runs on our engine
        variants = variants[:1] if not (a.skip_throughput and a.skip_session) else []
    for i, (name, path, dtype) in enumerate(variants):
        loaded = load_model(path, device, dtype)
        vocab = loaded.config.vocab_size
        report.setdefault("variants", {})[name] = {
            "dir": str(path), "kind": loaded.kind, "int4": loaded.int4, "dtype": str(loaded.dtype),
            "weight_gib": loaded.weight_bytes / 2**30,
        }
        eng = _engine(path, loaded, str(device), max_seqs, session_len, eager=a.eager)
        if not a.skip_decode:
            report["decode"][name] = bench_decode_ours(eng, a.batch_sizes, a.prompt_len, a.output_len, vocab)
        if i == 0 and not a.skip_session:
            report["session"] = bench_session(eng, a.session_turns, a.session_turn_len, a.session_output_len,
                                              vocab)
        del eng
        _free()
        if a.compare_sync and not a.skip_decode:  # the same engine waiting for every step's tokens
            eng = _engine(path, loaded, str(device), max_seqs, session_len, eager=a.eager,
                          async_scheduling=False)
            report["decode"][f"{name}-sync"] = bench_decode_ours(
                eng, a.batch_sizes, a.prompt_len, a.output_len, vocab)
            del eng
            _free()
        for q in (p for p in a.decode_quant_policy if p and not a.skip_decode):  # over a quantized KV cache
            eng = _engine(path, loaded, str(device), max_seqs, session_len, q, a.eager)
            report["decode"][f"{name}-kv{q}"] = bench_decode_ours(
                eng, a.batch_sizes, a.prompt_len, a.output_len, vocab)
            del eng
            _free()
        if i == 0 and not a.skip_throughput:
            for q in a.quant_policy:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                eng = _engine(path, loaded, str(device), min(a.num_requests, a.max_num_seqs), session_len, q,
                              a.eager)
                row = bench_throughput(eng, a.num_requests, a.throughput_prompt_len, a.throughput_output_len,
                                       vocab)
                if device.type == "cuda":
                    row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                report["throughput"][f"kv{q}"] = row
                log.info("throughput quant_policy %d: %.1f output tok/s", q, row["output_tok_s"])
                del eng
                _free()
        del loaded
        _free()
    if not a.skip_hf and hf_fp is not None:
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = _hf_model(hf_fp, dt, device)
        vocab = model.config.vocab_size
        report["decode"][f"hf-{str(dt).removeprefix('torch.')}"] = bench_decode_hf(
            model, a.batch_sizes, a.prompt_len, a.output_len, vocab, device)
        if device.type == "cuda" and not a.skip_hf_int4:
            try:
                to_tinygemm(model, a.group_size)
                report["decode"]["hf-int4-tinygemm"] = bench_decode_hf(
                    model, a.batch_sizes, a.prompt_len, a.output_len, vocab, device)
            except (RuntimeError, NotImplementedError) as e:
                report["hf_int4_error"] = repr(e)[:300]
        del model
        _free()
    elif not a.skip_hf:
        report["hf_skipped"] = "no fp HF dir for the baseline: pass --hf-model for an AWQ/packed MODEL_DIR"
    report["ratios"] = _ratios(report["decode"])
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkiln bench engine", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, metavar="MODEL_DIR_OR_synthetic",
                   help="HF / AWQ / packed dir, or `synthetic` (random Llama-2-7B + its int4 packed dir)")
    p.add_argument("--out", type=Path, required=True, help="directory for engine.json and engine.png")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="dtype of a given MODEL_DIR (auto: fp16/bf16 on GPU)")
    p.add_argument("--int4-dtype", default="float16", choices=("float16", "bfloat16"),
                   help="activation dtype of the synthetic int4 model (fp16: the AWQ convention, and the "
                        "dtype of the packed-fp16 CUDA-core kernel for small batches)")
    p.add_argument("--hf-model", type=Path, default=None,
                   help="fp HF dir of the same model: HF baseline (and ours-fp) for an AWQ/packed MODEL_DIR")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"),
                   help="where `synthetic` builds (and reuses) its ~17 GB of checkpoints")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (synthetic, tinygemm)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--throughput-prompt-len", type=int, default=512)
    p.add_argument("--throughput-output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256, help="engine batch limit for the throughput run")
    p.add_argument("--quant-policy", type=int, nargs="+", default=[0, 8], choices=[0, 4, 8],
                   help="KV cache policies of the throughput run")
    p.add_argument("--decode-quant-policy", type=int, nargs="+", default=[0], choices=[0, 4, 8],
                   help="KV cache policies of the decode sweep; fp (0) always runs, 8 / 4 add rows named "
                        "ours-<variant>-kv8 / -kv4")
    p.add_argument("--session-turns", type=int, default=10)
    p.add_argument("--session-turn-len", type=int, default=64, help="new prompt tokens each turn")
    p.add_argument("--session-output-len", type=int, default=32)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (the oracle)")
    p.add_argument("--compare-sync", action="store_true",
                   help="also decode without async scheduling (rows ours-<variant>-sync)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--skip-hf-int4", action="store_true", help="no transformers + tinygemm int4 baseline")
    p.add_argument("--skip-decode", action="store_true", help="no decode sweep of our engine")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-session", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from lmkiln.artifact import write_json_atomic
    from lmkiln.errors import LmkilnError

    a = build_parser().parse_args(argv)
    if any(b < 1 for b in a.batch_sizes) or a.output_len < 2 or a.prompt_len < 1:
        raise LmkilnError("--batch-sizes and --prompt-len must be >= 1 and --output-len >= 2")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    report = run(a)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "engine.json", report)
    plot(report, a.out / "engine.png")
    print(format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    names = list(report["decode"])
    batches = sorted({r["batch"] for rows in report["decode"].values() for r in rows})
    lines = [f"decode tok/s on {report['device']}", f"{'batch':>6} " + " ".join(f"{n:>18}" for n in names)]
    for b in batches:
        vals = [
            next((r.get("decode_tok_s", math.nan) for r in report["decode"][n] if r["batch"] == b), math.nan)
            for n in names
        ]
        lines.append(f"{b:>6} " + " ".join(f"{v:>18.1f}" for v in vals))
    for q, t in report["throughput"].items():
        lines.append(f"throughput {q}: {t['requests_per_s']:.2f} req/s, {t['output_tok_s']:.1f} out tok/s, "
                     f"TTFT p50 {t['ttft_ms']['p50']:.0f} ms, TPOT p50 {t['tpot_ms']['p50']:.1f} ms")
    if report.get("session"):
        s = report["session"]
        lines.append(f"session: TTFT turn 1 {s['ttft_first_ms']:.1f} ms, turn {len(s['turns'])} "
                     f"{s['ttft_last_ms']:.1f} ms")
    return "\n".join(lines)
