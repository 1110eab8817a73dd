"""Experiment (session 5, kept as the record of a negative result): prefetch the next GEMM's int4 weights into
L2 from a side stream while the current GEMM (and, optionally, stand-ins for the attention / norm kernels of a
decode step) runs, in the 7B decode chain of ``lmkiln.bench.linear_chain``.

Run on a GPU (the repository root must not be on sys.path; see notes/kernels.md "Running on the device"):
``python scripts/experiments/l2_prefetch.py --out DIR``. Writes ``l2_prefetch.json``: ms per forward for
prefetch off / per-line ``prefetch.global.L2::evict_last`` / ``cp.async.bulk.prefetch.L2`` with 8-48 MiB
caps, without gaps and with ``torch.cuda._sleep`` gaps of 13/3/3/4 us after qkv/o/gate_up/down.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from lmkiln.bench.kernels import LLAMA2_7B_SHAPES, make_weights
from lmkiln.bench.linear_chain import _graph_ms
from lmkiln.kernels import dispatch
from lmkiln.kernels.w4a16 import make_scratch

ORDER = ("qkv", "o", "gate_up", "down")
GAPS_US = {"none": (0, 0, 0, 0), "decode": (13, 3, 3, 4)}
VARIANTS = ("off", "line8", "line24", "line48", "bulk24", "bulk48")


@triton.jit
def _prefetch_kernel(ptr, nbytes, BLOCK: tl.constexpr, BULK: tl.constexpr):
    pid = tl.program_id(0)
    if BULK:  # one 4 KiB bulk prefetch per thread
        offs = pid * BLOCK + tl.arange(0, BLOCK // 4096) * 4096
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], 4096; mov.u32 $0, 0;", "=r,l",
            [ptr + tl.minimum(offs, nbytes - 4096)], dtype=tl.int32, is_pure=False, pack=1,
        )
    else:  # one 128-byte line per thread
        offs = pid * BLOCK + tl.arange(0, BLOCK // 128) * 128
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
            [ptr + tl.minimum(offs, nbytes - 128)], dtype=tl.int32, is_pure=False, pack=1,
        )


def prefetch(t: torch.Tensor, cap: int, bulk: bool) -> None:
    nbytes = min(t.numel() * t.element_size(), cap)
    nbytes -= nbytes % 4096
    if nbytes > 0:
        block = 4096 * 128 if bulk else 128 * 128
        flat = t.view(torch.uint8).view(-1)
        _prefetch_kernel[(triton.cdiv(nbytes, block),)](flat, nbytes, BLOCK=block, BULK=bulk, num_warps=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    dev = torch.device("cuda")
    weights = {
        name: [make_weights(*LLAMA2_7B_SHAPES[name], 128, dev, seed=1000 * i + j) for i in range(args.layers)]
        for j, name in enumerate(ORDER)
    }
    xs = {name: torch.randn(1, LLAMA2_7B_SHAPES[name][0], device=dev, dtype=torch.float16) for name in ORDER}
    cfgs = {name: dispatch.choose_config(1, *reversed(LLAMA2_7B_SHAPES[name]), 128, torch.float16, dev)
            for name in ORDER}
    scratch = make_scratch(dev)
    cycles = 10_000
    sleep_ms = _graph_ms(lambda: [torch.cuda._sleep(cycles) for _ in range(100)], 100)
    cycles_per_us = cycles * 100 / (sleep_ms * 1e3)
    side = torch.cuda.Stream()
    rows = []
    for gap_name, gaps in GAPS_US.items():
        for variant in VARIANTS:
            bulk, cap = variant.startswith("bulk"), (int(variant[4:]) << 20 if variant != "off" else 0)

            def forward(gaps=gaps, bulk=bulk, cap=cap) -> None:
                main_stream = torch.cuda.current_stream()
                for i in range(args.layers):
                    for j, name in enumerate(ORDER):
                        w = weights[name][i]
                        dispatch.w4a16_matmul(xs[name], w.qweight, w.sz, w.zeros, scratch, cfgs[name])
                        nxt = (i, j + 1) if j < 3 else (i + 1, 0)
                        if cap and nxt[0] < args.layers:
                            nw = weights[ORDER[nxt[1]]][nxt[0]]
                            ev = torch.cuda.Event()
                            ev.record(main_stream)
                            with torch.cuda.stream(side):
                                side.wait_event(ev)
                                for t in (nw.sz, nw.zeros):
                                    prefetch(t, cap, False)
                                prefetch(nw.qweight, cap, bulk)
                        if gaps[j]:
                            torch.cuda._sleep(int(gaps[j] * cycles_per_us))
                if cap:
                    main_stream.wait_stream(side)

            rows.append({"gaps": gap_name, "prefetch": variant, "ms": _graph_ms(forward, 100)})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "gaps_us": GAPS_US, "rows": rows}
    (args.out / "l2_prefetch.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
