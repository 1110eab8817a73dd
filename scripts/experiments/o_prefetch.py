"""Experiment (session 6, kept as the record of a negative result): batch-1 decode step of the synthetic 7B
int4 model against the L2 prefetch budget of the GEMVs launched with PDL, per projection.

The prefetch runs before a GEMV's PDL wait, while the kernels before it finish. ``o`` follows attention, the
longest phase without weight traffic; ``qkv`` and ``gate_up`` follow a norm, ``down`` follows ``gate_up``.
Each variant patches ``lmkiln.kernels.dispatch.choose_config`` in this process (``KernelConfig.prefetch_mb``
of the named projections at M=1), builds a fresh engine (new CUDA graphs) on the same loaded weights and
times 60 decode steps (``lmkiln.bench.step_profile``). Run on a GPU (see notes/kernels.md "Running on the
device"): ``python scripts/experiments/o_prefetch.py --out DIR [--workdir W]``; writes ``o_prefetch.json``.

Measured on an H100 (one call, ms a step, in this order): o at 2 MiB 2.326, 8 MiB 2.376, 16 MiB 2.375; o 8
with qkv and gate_up 4: 2.355; o 2 again 2.297, o 8 again 2.341. A bigger prefetch for ``o`` is slower:
every GEMV keeps the 2 MiB default. The call also ran the RMSNorms folded into the GEMMs (a reverted change,
see notes/engine.md), which this cleaned copy no longer varies.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
from pathlib import Path

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
VARIANTS = [  # {projection: prefetch MiB}; the others keep the default (2 MiB)
    {"o": 2},
    {"o": 8},
    {"o": 16},
    {"o": 8, "qkv": 4, "gate_up": 4},
    {"o": 2},
    {"o": 8},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"))
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()

    import torch
    from lmkiln.kernels import dispatch

    from lmkiln.bench.engine import _engine, build_synthetic
    from lmkiln.bench.step_profile import profile_batch
    from lmkiln.engine.loader import load_model

    _, packed = build_synthetic(args.workdir)
    loaded = load_model(packed, torch.device("cuda"), "float16")
    choose = dispatch.choose_config
    rows = []
    for budgets in VARIANTS:
        by_shape = {SHAPES[name]: mb for name, mb in budgets.items()}

        def patched(m, n, k, g, dtype, device, _by=by_shape):
            cfg = choose(m, n, k, g, dtype, device)
            mb = _by.get((n, k)) if m == 1 else None
            return dataclasses.replace(cfg, prefetch_mb=float(mb)) if mb is not None else cfg

        dispatch.choose_config = patched
        try:
            eng = _engine(packed, loaded, "cuda", 1, 128 + args.steps + 16, 0)
            row = profile_batch(eng, 1, 128, args.steps, loaded.config.vocab_size)
        finally:
            dispatch.choose_config = choose
        del eng
        gc.collect()
        torch.cuda.empty_cache()
        row.update(prefetch_mb=budgets)
        print(f"prefetch={budgets}: step {row['wall_ms']:.3f} ms", flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "rows": rows}
    (args.out / "o_prefetch.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
