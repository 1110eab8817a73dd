"""Batch-1 GEMV with its weights copied into shared memory before the PDL wait (kernels/fma_smem.py) against
the shipped atomic ``fma`` GEMV: correctness at the 7B shapes, then the 7B decode linears as one CUDA graph
(qkv, o, down through the kernel under test; gate/up through the shipped ordered ``fma`` with its SiLU, as in
the engine), with a short stand-in kernel between the GEMVs that consumes and zeroes each accumulator.

    python scripts/experiments/fma_smem.py --out OUT_DIR [--layers 32] [--rep-ms 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from lmkiln.kernels import pdl, w4a16
from lmkiln.kernels.dispatch import atomic_splitk_config, choose_config
from lmkiln.kernels.fma_smem import fma_smem

from lmkiln.bench.kernels import LLAMA2_7B_SHAPES, make_weights


def _graph_ms(fn, rep_ms: int) -> float:
    from triton.testing import do_bench

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return float(do_bench(g.replay, warmup=50, rep=rep_ms, return_mode="median"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rep-ms", type=int, default=300)
    a = p.parse_args()
    dev = torch.device("cuda")
    report: dict = {"device": torch.cuda.get_device_name(), "check": {}, "chain_ms": {}}
    shapes = dict(LLAMA2_7B_SHAPES)
    weights = {name: make_weights(k, n, 128, dev, seed=i) for i, (name, (k, n)) in enumerate(shapes.items())}
    for name, w in weights.items():
        if name == "gate_up":
            continue
        cfg = atomic_splitk_config(1, w.n, w.k, 128, torch.float16, dev)
        x = torch.randn(1, w.k, device=dev, dtype=torch.float16)
        ref = torch.zeros(1, w.n, device=dev, dtype=torch.float32)
        w4a16.fma(x, w.qweight, w.sz, w.zeros, cfg, out=ref, reduce="atomic")
        got = torch.zeros_like(ref)
        fma_smem(x, w.qweight, w.sz, w.zeros, got, cfg.block_n, cfg.num_warps, cfg.split_k)
        exact = x.float() @ ((w.codes.float() - w.zeros.float().repeat_interleave(128, 0))
                             * w.scales.float().repeat_interleave(128, 0))
        report["check"][name] = {"cfg": cfg.to_dict(),
                                 "rel_err_fma": float((ref - exact).norm() / exact.norm()),
                                 "rel_err_smem": float((got - exact).norm() / exact.norm()),
                                 "max_abs_diff": float((got - ref).abs().max())}
        print(name, report["check"][name], flush=True)

    # the chain, per layer: qkv -> add+RMSNorm (consumes the first 4096 of its accumulator) -> o ->
    # add+RMSNorm -> gate_up (ordered fma, no SiLU) -> down -> add+RMSNorm; every kernel with PDL as in the
    # engine
    from lmkiln.kernels.fused import add_rmsnorm

    layers = []
    for i in range(a.layers):
        layers.append({name: make_weights(k, n, 128, dev, seed=100 + 4 * i + j)
                       for j, (name, (k, n)) in enumerate(shapes.items())})
    accs = {name: torch.zeros(1, n, device=dev, dtype=torch.float32) for name, (k, n) in shapes.items()}
    h = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    res = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    nw = torch.ones(4096, device=dev, dtype=torch.float16)
    act = torch.randn(1, 11008, device=dev, dtype=torch.float16) * 0.1
    gu = torch.empty(1, shapes["gate_up"][1], device=dev, dtype=torch.float16)
    scratch = w4a16.make_scratch(dev)
    gcfg = choose_config(1, shapes["gate_up"][1], shapes["gate_up"][0], 128, torch.float16, dev)
    cfgs = {name: atomic_splitk_config(1, n, k, 128, torch.float16, dev) for name, (k, n) in shapes.items()
            if name != "gate_up"}

    def gemv(v: dict, name: str, w, x: torch.Tensor) -> None:
        cfg = cfgs[name]
        if v["kind"] == "fma":
            w4a16.fma(x, w.qweight, w.sz, w.zeros, cfg, out=accs[name], reduce="atomic")
        else:
            bn, nw_ = v.get("bn", cfg.block_n), v.get("nw", cfg.num_warps)
            fma_smem(x, w.qweight, w.sz, w.zeros, accs[name], bn, nw_, cfg.split_k * v.get("split_mult", 1),
                     pre=v["pre"])

    def chain(v: dict) -> None:
        x, r = h, res
        for lw in layers:
            gemv(v, "qkv", lw["qkv"], x)
            x, r = add_rmsnorm(accs["qkv"][:, :4096], r, nw, 1e-5, consume=True)
            gemv(v, "o", lw["o"], x)
            x, r = add_rmsnorm(accs["o"], r, nw, 1e-5, consume=True)
            w = lw["gate_up"]
            w4a16.fma(x, w.qweight, w.sz, w.zeros, gcfg, scratch=scratch, out=gu)
            gemv(v, "down", lw["down"], act)
            x, r = add_rmsnorm(accs["down"], r, nw, 1e-5, consume=True)

    variants = {
        "fma": {"kind": "fma"},
        "smem_pre": {"kind": "smem", "pre": True},
        "smem_post": {"kind": "smem", "pre": False},
        "smem_pre_bn128_w1": {"kind": "smem", "pre": True, "bn": 128, "nw": 1},
        "smem_pre_bn128_w2": {"kind": "smem", "pre": True, "bn": 128, "nw": 2},
        "smem_pre_split2x": {"kind": "smem", "pre": True, "split_mult": 2},
    }
    for rep in range(2):
        for pdl_v in ("2", "off"):
            for vname, v in variants.items():
                with pdl.setting(pdl_v):
                    ms = _graph_ms(lambda v=v: chain(v), a.rep_ms)
                key = f"{vname} pdl={pdl_v}"
                report["chain_ms"].setdefault(key, []).append(ms)
                print(f"chain {key} rep {rep}: {ms:.3f} ms", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fma_smem.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
