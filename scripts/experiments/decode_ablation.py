"""Experiment (session 7): where the batch-1 decode step of the synthetic 7B int4 model spends its time.

Two parts, both on a GPU (see notes/kernels.md "Running on the device"), results to ``decode_ablation.json``:

* ``chain``: the 128 linears of the 7B shape at M=1 as one CUDA graph (as ``lmkiln.bench.linear_chain``),
  with the fma kernel's split-K reduction done three ways: ``ordered`` (the shipped tail: partials to a
  workspace, an acq_rel counter, the last program sums them in order), ``atomic`` (every program
  ``red.add``-s its partial into a float32 output) and ``none`` (partials stored and never summed: the lower
  bound of any reduction), each at the tuned split-K and at half and twice it. The atomic outputs are never
  re-zeroed here (timing only).
* ``step``: decode steps (``lmkiln.bench.step_profile``) with parts of the model replaced by a no-op that
  returns a preallocated tensor: the attention kernel, the whole attention (KV write + rotary too), the
  RMSNorms, the lm_head. The difference to the full step is what that part costs on the critical path.
  ``--step-variants`` also takes ``splitsN`` (decode attention with N KV splits), ``bnN`` (its key tile),
  ``o_pfX`` (the o GEMV's L2 prefetch budget, X MiB), ``sampler_full`` (greedy rows through the whole
  sampler), ``copies`` (the decode graph's inputs copied on the first step only) and ``pending`` (no copy of
  the previous step's tokens into the inputs); the last two give wrong tokens and are for timing only.

``python scripts/experiments/decode_ablation.py --out DIR [--parts chain step] [--workdir W]``.

Measured on an H100 (session 7; ms; notes/engine.md has the context):

* chain (session 6 code), split-K at the table / half / twice: ordered 1.768 / 2.162 / 1.947, atomic
  1.584 / 2.026 / 1.732, none 1.643 / 2.037 / 1.758 (floor 1.148). Atomic beats even "none": the partials
  of a workspace cost more than red.add into a small output. The engine now adds o / down / qkv atomically.
* step (session 6 code), ~160 cached tokens: full 2.318, without the attention kernel 2.120, without the
  whole attention 2.050, without the RMSNorms 2.202, without the lm_head 2.223, without all three 1.834.
* step (session 9 code, 250 steps; two engines of the same code differed by 0.065 ms, so these are noise):
  full 2.176 / 2.241, sampler_full 2.191, copies 2.164, pending 2.220, copies + pending 2.156.
* step (o / down atomic): 4 splits 2.256, 1 2.272 / 2.298, 2 2.269, 8 2.291; the o prefetch at 0 MiB 2.259
  (neutral). Later (qkv atomic too): 4 splits 2.159 / 2.203, 8 2.173, 16 2.299; a 32-key tile (bn32) 1 %
  slower at every split count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ORDER = ("qkv", "o", "gate_up", "down")
MODES = ("ordered", "atomic", "none")


def chain(rep_ms: int) -> list[dict[str, Any]]:
    import torch
    from lmkiln.kernels import dispatch, w4a16

    from lmkiln.bench.kernels import (
        LLAMA2_7B_LAYERS,
        LLAMA2_7B_SHAPES,
        copy_bandwidth_gbps,
        make_weights,
        our_bytes,
    )
    from lmkiln.bench.linear_chain import _graph_ms

    dev = torch.device("cuda")
    bw = copy_bandwidth_gbps(dev)
    weights = [
        [make_weights(*LLAMA2_7B_SHAPES[n], 128, dev, seed=1000 * layer + j) for j, n in enumerate(ORDER)]
        for layer in range(LLAMA2_7B_LAYERS)
    ]
    floor_ms = sum(our_bytes(1, *LLAMA2_7B_SHAPES[n], 128) for n in ORDER) * LLAMA2_7B_LAYERS / bw / 1e6
    xs = {n: torch.randn(1, LLAMA2_7B_SHAPES[n][0], device=dev, dtype=torch.float16) for n in ORDER}
    ys = {n: torch.zeros(1, LLAMA2_7B_SHAPES[n][1], device=dev, dtype=torch.float32) for n in ORDER}
    scratch = w4a16.make_scratch(dev)
    base = {
        n: dispatch.choose_config(1, *reversed(LLAMA2_7B_SHAPES[n]), 128, torch.float16, dev) for n in ORDER
    }
    rows = []
    for scale in (1.0, 0.5, 2.0):
        cfgs = {n: dataclasses.replace(c, split_k=max(1, int(c.split_k * scale))) for n, c in base.items()}
        for mode in MODES:

            def fwd(cfgs: dict = cfgs, mode: str = mode, weights: list = weights) -> None:
                for layer in weights:
                    for n, w in zip(ORDER, layer, strict=True):
                        out = ys[n] if mode == "atomic" else None
                        w4a16.fma(xs[n], w.qweight, w.sz, w.zeros, cfgs[n], scratch, out=out, reduce=mode)

            ms = _graph_ms(fwd, rep_ms)
            row = {"mode": mode, "split_scale": scale, "splits": {n: c.split_k for n, c in cfgs.items()},
                   "ms": ms, "floor_ms": floor_ms}
            print(json.dumps(row), flush=True)
            rows.append(row)
    del weights
    torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _patched(parts: tuple[str, ...]) -> Iterator[None]:
    """No-op stand-ins (returning preallocated tensors, so no kernel runs) for the named parts."""
    import torch
    from lmkiln.kernels import fused as kf

    from lmkiln.engine import attention
    from lmkiln.models import llama

    bufs: dict[tuple, torch.Tensor] = {}

    def zeros(shape: tuple, like: torch.Tensor) -> torch.Tensor:
        # a consumed split-K accumulator (float32) stands for fp16 activations
        dtype = torch.float16 if like.dtype == torch.float32 and like.is_cuda else like.dtype
        key = (tuple(shape), dtype, like.device)
        if key not in bufs:
            bufs[key] = torch.zeros(shape, dtype=dtype, device=like.device)
        return bufs[key]

    saved = []

    def patch(obj: Any, name: str, fn: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, fn)

    if "attention" in parts:
        patch(attention._Backend, "forward", lambda self, q, *a, **k: zeros(q.shape, q))
    if "attn_kernel" in parts:
        patch(attention.TritonAttentionBackend, "_attend", lambda self, q, *a, **k: zeros(q.shape, q))
    if "norm" in parts:
        patch(kf, "add_rmsnorm", lambda x, residual, *a: (residual, residual))
        patch(kf, "rmsnorm", lambda x, *a: x)
    for part in parts:
        if part.startswith("bn"):  # decode attention with BLOCK_N keys a tile
            import functools

            from lmkiln.kernels import paged_attention

            cls = paged_attention.AttentionConfig
            patch(paged_attention, "AttentionConfig", functools.partial(cls, block_n=int(part[2:])))
        if part.startswith("splits"):  # decode attention with a fixed split-KV factor
            from lmkiln.kernels import paged_attention

            patch(paged_attention, "decode_splits", lambda *a, _n=int(part[6:]): _n)
        if part.startswith("o_pf"):  # the o GEMV's L2 prefetch budget (MiB), which runs during attention
            from lmkiln.kernels import dispatch

            choose = dispatch.choose_config

            def o_config(m, n, k, g, dtype, device, _mb=float(part[4:]), _choose=choose):
                cfg = _choose(m, n, k, g, dtype, device)
                return dataclasses.replace(cfg, prefetch_mb=_mb) if (m, n, k) == (1, 4096, 4096) else cfg

            patch(dispatch, "choose_config", o_config)
    if "sampler_full" in parts:  # greedy rows through the full sampler (float32 copy, clone, penalties)
        from lmkiln.engine import sampler

        patch(sampler, "_plain_greedy", lambda seq: False)
    if "copies" in parts:  # the decode graph's inputs copied once, then never again (timing only)
        from lmkiln.engine.transfer import StagedCopy

        copy = StagedCopy.copy

        def copy_once(self, values, _copy=copy):
            if not getattr(self, "_copied", False):
                self._copied = True
                _copy(self, values)

        patch(StagedCopy, "copy", copy_once)
    if "pending" in parts:  # no device copy of the step in flight's tokens into the inputs (timing only)
        from lmkiln.engine.model_runner import ModelRunner

        patch(ModelRunner, "_pending", lambda self, step, prev: None)
    if "lm_head" in parts:
        patch(llama.CausalLM, "compute_logits",
              lambda self, h: zeros((h.shape[0], self.lm_head.weight.shape[0]), h))
    try:
        yield
    finally:
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)


STEP_VARIANTS = [
    (), ("attn_kernel",), ("attention",), ("norm",), ("lm_head",), ("attention", "norm", "lm_head"), ()
]


def step(workdir: Path, steps: int, variants: list[tuple[str, ...]]) -> list[dict[str, Any]]:
    import torch

    from lmkiln.bench.engine import _engine, build_synthetic
    from lmkiln.bench.step_profile import profile_batch
    from lmkiln.engine.loader import load_model

    _, packed = build_synthetic(workdir)
    loaded = load_model(packed, torch.device("cuda"), "float16")
    rows = []
    for parts in variants:
        with _patched(parts):
            eng = _engine(packed, loaded, "cuda", 1, 128 + steps + 32)
            r = profile_batch(eng, 1, 128, steps, loaded.config.vocab_size)
        row = {"off": list(parts), "wall_ms": r["wall_ms"], "gpu_span_ms": r["gpu_span_ms"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", nargs="+", choices=("chain", "step"), default=["chain", "step"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument(
        "--step-variants", nargs="+", default=None, metavar="PARTS",
        help="comma-joined parts per variant, '-' for none; e.g. - splits1 splits2 o_pf0 attn_kernel,norm",
    )
    args = p.parse_args()
    import torch

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "chain" in args.parts:
        report["chain"] = chain(args.rep_ms)
    if "step" in args.parts:
        variants = STEP_VARIANTS
        if args.step_variants:
            variants = [() if v == "-" else tuple(v.split(",")) for v in args.step_variants]
        report["step"] = step(args.workdir, args.steps, variants)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_ablation.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
