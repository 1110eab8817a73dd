"""Benchmarks of the quantize pipeline (recorded to JSON; never a timed unit test).

``cpu``: run ``snakemake quantize`` on the configured model in a work directory and collect each rule's
wall time and peak RSS from Snakemake's ``benchmark:`` files.

``synthetic``: calibration + AWQ search on a random-weight checkpoint of a given shape (default
Llama-2-7B: hidden 4096, 32 layers, intermediate 11008, vocab 32000) on the GPU, reporting wall time per
step and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def write_random_llama(path: Path, shape: dict, seed: int = 0) -> Path:
    """An fp16 HF Llama directory with random weights (one safetensors shard per layer)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape, torch_dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*s: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*s, generator=g, device=dev) * std).half().cpu()

    weight_map = {}
    shards = [("model-embed.safetensors", {"model.embed_tokens.weight": rnd(v, h),
                                            "model.norm.weight": torch.ones(h, dtype=torch.float16),
                                            "lm_head.weight": rnd(v, h)})]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shards.append((f"model-layer{n:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i)}))
    for name, tensors in shards:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def bench_synthetic(samples: int, seqlen: int, group_size: int, workdir: Path | None,
                    shape: dict | None = None) -> dict:
    from lmkiln.models.checkpoint import Checkpoint
    from lmkiln.quant.awq import AWQConfig, awq_quantize
    from lmkiln.quant.calibrate import calibrate
    from lmkiln.quant.rtn import QuantSpec

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shape = shape or LLAMA2_7B
        model = write_random_llama(tmp / "llama-random", shape)
        t_write = time.perf_counter() - t0
        ckpt = Checkpoint(model)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, ckpt.config.vocab_size, (samples, seqlen), generator=gen)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        calibrate(model, tokens, tmp / "stats.safetensors", {"dataset": "random", "seed": 0})
        t_calib = time.perf_counter() - t0
        t0 = time.perf_counter()
        awq_quantize(model, tmp / "stats.safetensors", tokens, tmp / "awq",
                     AWQConfig(spec=QuantSpec(4, group_size), search_scale=True))
        t_awq = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"benchmark": "awq_synthetic", "device": device_name(), "shape": shape, "samples": samples,
            "seqlen": seqlen, "group_size": group_size, "write_checkpoint_s": round(t_write, 3),
            "calibrate_s": round(t_calib, 3), "awq_s": round(t_awq, 3),
            "calibrate_plus_awq_s": round(t_calib + t_awq, 3), "peak_gpu_mem_gib": round(peak, 2),
            "torch": torch.__version__}


def bench_cpu_pipeline(workdir: Path, cores: int, extra_config: list[str]) -> dict:
    """Run ``snakemake quantize`` in ``workdir`` (a clean one measures the whole build)."""
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(workdir),
           "--configfile", str(repo / "config.yaml"), "--cores", str(cores), "quantize"]
    if extra_config:
        cmd += ["--config", *extra_config]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    from lmkiln.report import rule_times

    rules = {name: {"s": s, "max_rss_mib": rss}
             for name, (s, rss) in rule_times(workdir / "benchmarks", recursive=True).items()}
    return {"benchmark": "snakemake_quantize_cpu", "device": device_name(), "wall_s": round(wall, 1),
            "rules": rules}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmkiln bench quantize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("synthetic", help="AWQ time and peak GPU memory on a random Llama-2-7B shape")
    s.add_argument("--samples", type=int, default=128)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--group-size", type=int, default=128)
    s.add_argument("--workdir", type=Path, default=None, help="where the temporary checkpoint goes")
    s.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("cpu", help="`snakemake quantize` wall time and peak memory per rule")
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--cores", type=int, default=2)
    s.add_argument("--config", nargs="*", default=[], help="KEY=VALUE overrides passed to snakemake")
    s.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.mode == "synthetic":
        result = bench_synthetic(a.samples, a.seqlen, a.group_size, a.workdir)
    else:
        result = bench_cpu_pipeline(a.workdir, a.cores, a.config)
    from lmkiln.artifact import write_json_atomic

    write_json_atomic(a.out, result)
    print(json.dumps(result, indent=2))
    return 0
