"""What one kernel boundary costs in a decode-style chain: ``griddepcontrol.wait`` (PDL, what the decode step
uses) against a flag the previous kernel's programs raise (each program adds 1 to a counter with release
semantics when its output is written; the next kernel's programs spin on an acquire load until all have), and
against plain stream order.

A chain of N tiny kernels (each program copies 256 fp16 values and adds one), G programs each, in one CUDA
graph that first zeroes the counters; µs per kernel = replay time / N.

    python scripts/experiments/sync_cost.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from lmkiln.kernels import pdl


@triton.jit
def _acquire(ptr):
    return tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _step_kernel(src, dst, cnt, i, g_prev, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if MODE == 0:  # PDL: let the next launch, wait for this one's predecessor to finish
        pdl.enter(True)
    elif MODE == 1:  # flags
        pdl.trigger(True)
        if i > 0:
            seen = _acquire(cnt + i - 1)
            while seen < g_prev:
                seen = _acquire(cnt + i - 1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs) + 1.0)
    if MODE == 1:
        tl.debug_barrier()
        tl.atomic_add(cnt + i, 1, sem="release", scope="gpu")


def _chain_us(mode: int, n: int, g: int, block: int = 256) -> float:
    from lmkiln.bench.linear_chain import _graph_ms

    bufs = [torch.zeros(g * block, device="cuda", dtype=torch.float16) for _ in range(2)]
    cnt = torch.zeros(n, device="cuda", dtype=torch.int32)
    opts = pdl.launch_opts(mode in (0, 1))

    def run() -> None:
        cnt.zero_()
        for i in range(n):
            _step_kernel[(g,)](bufs[i % 2], bufs[(i + 1) % 2], cnt, i, g, MODE=mode, BLOCK=block, num_warps=4,
                               **opts)

    run()
    torch.cuda.synchronize()
    got = float(bufs[n % 2].float().min())  # each step writes its input + 1: n at the end if in order
    if got != n:
        raise RuntimeError(f"mode {mode}, {g} programs: the chain ended at {got}, not {n} (out of order)")
    return 1000.0 * _graph_ms(run, 200) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=200)
    a = p.parse_args()
    report: dict = {"device": torch.cuda.get_device_name(), "us_per_kernel": {}}
    for g in (1, 132, 1024):
        for mode, name in ((2, "stream"), (0, "pdl"), (1, "flags")):
            us = _chain_us(mode, a.n, g)
            report["us_per_kernel"][f"{name} g={g}"] = us
            print(f"{name:6s} g={g:5d}: {us:.2f} us a kernel", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sync_cost.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
