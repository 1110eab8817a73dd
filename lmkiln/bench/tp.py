"""``lmkiln bench tp``: the engine's speed at tensor-parallel degrees 1, 2, 4 in one run (tp.json, tp.md).

For each model shape (random weights, built directly on every rank's GPU: no checkpoint on disk), weight
format (``float16`` / ``bfloat16``, or ``int4``: fused Int4Linear over random packed codes, group 128) and
``--tp``: decode tok/s at each ``--batch-sizes`` (prompt ``--prompt-len``, ``--output-len`` tokens,
``ignore_eos``), and a throughput run (``--num-requests`` prompts submitted at once). A combination whose
weights do not fit the GPUs is recorded as skipped, with the reason (70B in fp16 needs tp 4 on 80 GB cards).
Speedups are relative to the smallest tp measured for the same shape and weights. NCCL's NVLink multicast
(NVLS) stays off. ``--device cpu --shape tiny`` runs the same at toy scale with gloo (for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
}
WEIGHTS = ("float16", "bfloat16", "float32", "int4")  # int4: float16 activations (float32 on the CPU)
INT4_GROUP = 128


def weight_bytes(shape: dict[str, int], weights: str, tp: int) -> int:
    """Bytes of one rank's weights (embedding and lm_head in 16 bits; int4 linears ~4.3 bits a weight)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    n = shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = n * (h * (2 * h + 2 * kv) + 3 * h * i)
    per_weight = 0.5 + 4 / INT4_GROUP + 1 / INT4_GROUP if weights == "int4" else 2
    return int((linear * per_weight + 2 * v * h * 2) / tp)


def write_config(model_dir: Path, shape: dict[str, int], max_position_embeddings: int) -> Path:
    """A model directory holding only ``config.json`` (the engine takes token-id prompts)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=max_position_embeddings, torch_dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(model_dir)
    return model_dir


@dataclasses.dataclass(frozen=True)
class RandomShards:
    """A :class:`~lmkiln.engine.parallel.ShardBuilder` of random weights made on the rank's device (never
    the full model: a 70B shard is built in place)."""

    weights: str = "float16"
    seed: int = 0

    def model_config(self, config: Any) -> Any:
        from lmkiln.models.config import ModelConfig

        return ModelConfig.from_dir(config.model_dir)

    def __call__(self, config: Any, comm: Any, device: torch.device) -> Any:
        from lmkiln.engine.loader import LoadedModel
        from lmkiln.engine.parallel import shard_bytes
        from lmkiln.models.llama import CausalLM, Rotary
        from lmkiln.models.tensor_parallel import shard_model

        cfg = self.model_config(config)
        if self.weights == "int4":
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, self.weights)
        with torch.device("meta"):
            model = CausalLM(cfg)
        local = shard_model(model, cfg, comm)
        gen = torch.Generator(device).manual_seed(self.seed + comm.rank)
        if self.weights == "int4":
            _int4_layers(model, cfg, comm, device, gen)
        _materialize(model, dtype, device, gen)
        model.rotary = Rotary(cfg).to(device)
        model.eval()
        int4 = self.weights == "int4"
        return LoadedModel(model, local, "synthetic", dtype, device, shard_bytes(model), int4)


def _random_int4(k: int, n: int, device: torch.device, gen: torch.Generator) -> nn.Module:
    from lmkiln.layers import Int4Linear

    qweight = torch.randint(-(2**31), 2**31 - 1, (n // 32, k // 8, 32), dtype=torch.int32, device=device,
                            generator=gen)
    zeros = torch.randint(0, 16, (k // INT4_GROUP, n), dtype=torch.uint8, device=device, generator=gen)
    s = torch.rand((k // INT4_GROUP, n), device=device, generator=gen) * 0.002 + 0.001
    sz = torch.stack([s, -zeros.float() * s], dim=-1).half()
    return Int4Linear(qweight, sz, zeros)


def _int4_layers(model: nn.Module, cfg: Any, comm: Any, device: torch.device, gen: torch.Generator) -> None:
    """Fused q/k/v and gate/up plus o and down as random Int4Linear of this rank's shapes (the MLP split in
    whole 128-row chunks, as a packed artifact is split)."""
    from lmkiln.models.tensor_parallel import RowParallel, balanced_split

    h, world = cfg.hidden_size, comm.world
    a, b = balanced_split(cfg.intermediate_size, world, 128)[comm.rank]
    for layer in model.model.layers:
        attn = layer.self_attn
        q, kv = attn.num_heads * cfg.head_dim, attn.num_kv_heads * cfg.head_dim
        o, down = _random_int4(q, h, device, gen), _random_int4(b - a, h, device, gen)
        if world > 1:
            o, down = RowParallel(o, comm), RowParallel(down, comm)
        qkv, gate_up = _random_int4(h, q + 2 * kv, device, gen), _random_int4(h, 2 * (b - a), device, gen)
        layer.fuse(qkv, o, gate_up, down)


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> None:
    """Every parameter still on the meta device becomes a random one (norms: ones), ties kept."""
    from lmkiln.models.llama import RMSNorm

    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=dtype, device=device)
                if isinstance(mod, RMSNorm):
                    t.fill_(1)
                else:
                    t.normal_(0, 0.02, generator=gen)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            setattr(mod, name, made[id(p)])


# ------------------------------------------------------------------------------------------------- run


def _gpu_bytes() -> int:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 1 << 62


def run_one(model_dir: Path, weights: str, tp: int, a: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from lmkiln.bench.engine import bench_decode_ours, bench_throughput
    from lmkiln.engine import LLMEngine
    from lmkiln.engine.config import EngineConfig
    from lmkiln.models.tensor_parallel import TPGroup

    session_len = max(a.prompt_len + a.output_len, a.throughput_prompt_len + a.throughput_output_len) + 8
    cache: float | int = 0.85 if a.device != "cpu" else a.max_num_seqs * -(-session_len // 64)
    cfg = EngineConfig(model_dir, device=a.device, tp=tp, cache_max_entry_count=cache,
                       max_num_seqs=a.max_num_seqs, session_len=session_len, eager=a.eager,
                       verify_artifact=False, max_prefill_token_num=8192)
    builder = RandomShards(weights)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if tp == 1:
        dev = torch.device("cuda:0" if a.device != "cpu" else "cpu")
        eng = LLMEngine(cfg, tokenizer=None, loaded=builder(cfg, TPGroup(0, 1), dev))
    else:
        eng = LLMEngine(cfg, tokenizer=None, shard_builder=builder)
    row: dict[str, Any] = {"init_s": round(time.perf_counter() - t0, 1),
                           "weight_bytes_per_gpu": eng.loaded.weight_bytes,
                           "weight_gib_per_gpu": round(eng.loaded.weight_bytes / 2**30, 3),
                           "kv_blocks": eng.block_manager.num_blocks,
                           "decode_graphs": getattr(eng.runner, "decode_graphs", None) is not None}
    try:
        row["decode"] = bench_decode_ours(eng, a.batch_sizes, a.prompt_len, a.output_len, vocab)
        if a.num_requests:
            row["throughput"] = bench_throughput(eng, a.num_requests, a.throughput_prompt_len,
                                                 a.throughput_output_len, vocab)
        if torch.cuda.is_available():
            row["peak_gpu0_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        eng.shutdown()
        del eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _speedups(results: list[dict[str, Any]]) -> None:
    """``speedup`` of each measured row over the smallest tp of the same shape and weights."""
    base: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if "decode" in r:
            base.setdefault((r["shape"], r["weights"]), r)
    for r in results:
        b = base.get((r["shape"], r["weights"]))
        if "decode" not in r or b is None or b is r:
            continue
        bd = {d["batch"]: d["decode_tok_s"] for d in b["decode"]}
        r["speedup_vs_tp"] = b["tp"]
        r["decode_speedup"] = {
            str(d["batch"]): round(d["decode_tok_s"] / bd[d["batch"]], 3)
            for d in r["decode"]
            if d["batch"] in bd
        }
        if "throughput" in r and "throughput" in b:
            ratio = r["throughput"]["output_tok_s"] / b["throughput"]["output_tok_s"]
            r["throughput_speedup"] = round(ratio, 3)


def run(a: argparse.Namespace) -> dict[str, Any]:
    from lmkiln.bench.quantize import device_name

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    tps = a.tp or [t for t in (1, 2, 4, 8) if t <= max(n_gpu, 1)]
    if a.device != "cpu" and max(tps) > n_gpu:
        raise SystemExit(f"--tp {max(tps)} needs {max(tps)} GPUs; {n_gpu} visible")
    report: dict[str, Any] = {"benchmark": "tensor_parallel", "device": device_name(), "gpus": n_gpu,
                              "torch": torch.__version__, "nvls": "off", "settings": {
                                  k: v for k, v in vars(a).items() if k not in ("out", "func")},
                              "results": []}
    work = Path(a.out) / "models"
    for shape_name in a.shape:
        shape = SHAPES[shape_name]
        model_dir = write_config(work / shape_name, shape, 4096)
        for weights in a.weights:
            for tp in tps:
                row: dict[str, Any] = {"shape": shape_name, "weights": weights, "tp": tp}
                need = weight_bytes(shape, weights, tp)
                if a.device != "cpu" and need > 0.8 * _gpu_bytes():
                    row["skipped"] = (f"{need / 2**30:.1f} GiB of weights per GPU do not fit 80% of "
                                      f"{_gpu_bytes() / 2**30:.0f} GiB")
                    log.info("%s %s tp=%d: skipped (%s)", shape_name, weights, tp, row["skipped"])
                else:
                    log.info("%s %s tp=%d ...", shape_name, weights, tp)
                    try:
                        row.update(run_one(model_dir, weights, tp, a, shape["vocab_size"]))
                    except (torch.OutOfMemoryError, RuntimeError) as e:
                        row["failed"] = f"{type(e).__name__}: {str(e)[:300]}"
                        log.error("%s %s tp=%d failed: %s", shape_name, weights, tp, row["failed"])
                report["results"].append(row)
                _write(report, Path(a.out))  # partial results survive a later failure
    _speedups(report["results"])
    _write(report, Path(a.out))
    return report


def format_table(report: dict[str, Any]) -> str:
    batches = report["settings"]["batch_sizes"]
    head = ["shape", "weights", "tp", *(f"decode tok/s b={b}" for b in batches), "throughput out tok/s",
            "speedup (decode b=1 / b=max / thr)", "weights GiB/GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [r["shape"], r["weights"], str(r["tp"])]
        if "decode" not in r:
            cells += [r.get("skipped") or r.get("failed", "?")] + [""] * (len(head) - 4)
        else:
            d = {x["batch"]: x["decode_tok_s"] for x in r["decode"]}
            cells += [f"{d.get(b, float('nan')):.1f}" for b in batches]
            cells.append(f"{r['throughput']['output_tok_s']:.0f}" if "throughput" in r else "")
            s = r.get("decode_speedup", {})
            sp = (f"{s.get(str(batches[0]), 1):.2f} / {s.get(str(batches[-1]), 1):.2f} / "
                  f"{r.get('throughput_speedup', 1):.2f}") if s else "(base)"
            cells += [sp, f"{r['weight_gib_per_gpu']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(report: dict[str, Any], out: Path) -> None:
    from lmkiln.artifact import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "tp.json", report)
    (out / "tp.md").write_text(f"Tensor parallel on {report['device']} x{report['gpus']}\n\n"
                               + format_table(report) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkiln bench tp", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for tp.json and tp.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo ranks (tests)")
    p.add_argument("--tp", type=int, nargs="+", default=None, help="degrees (default 1 2 4 8 up to the GPUs)")
    p.add_argument("--shape", nargs="+", default=["7b"], choices=list(SHAPES), help="model shapes")
    p.add_argument("--weights", nargs="+", default=["float16"], choices=WEIGHTS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-requests", type=int, default=256, help="throughput run (0: skip)")
    p.add_argument("--throughput-prompt-len", type=int, default=512)
    p.add_argument("--throughput-output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (the oracle)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(a)
    print(format_table(report))
    print(f"wrote {Path(a.out) / 'tp.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
