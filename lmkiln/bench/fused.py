"""One decoder layer's non-GEMM ops, torch eager (the model's code) vs the fused Triton kernels.

A Llama-2-7B layer (hidden 4096, 32 q / ``--kv-heads`` KV heads of 128, intermediate 11008, fp16) at each
batch size (tokens): residual add + input RMSNorm, rotary on q/k of a fused qkv output (+ the ``v``
``.contiguous()`` copy the torch path makes), residual add + post-attention RMSNorm, SiLU·mul of a fused
gate/up output. ``torch`` runs ``RMSNorm.forward`` / the rotary of ``Attention.forward_paged`` / ``F.silu(g) *
u`` as the model does without ``LMKILN_FUSED``; ``fused`` the four launches of ``lmkiln.kernels.fused``.
Times are medians of ``triton.testing.do_bench`` over CUDA-graph replays (L2 flushed before each call), per
op and for the whole sequence; ``per_step_32_layers_us`` scales the layer to a 32-layer decode step. Also
records each variant's CUDA kernel count (profiler) and the max difference between the two. Writes
``fused.json`` to ``--out``::

    python -m lmkiln.bench.fused --out results/bench/fused
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmkiln.bench import report_main
from lmkiln.errors import LmkilnError

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 16, 64, 256)
HIDDEN, HEADS, HEAD_DIM, INTER, LAYERS = 4096, 32, 128, 11008, 32


class LayerOps:
    """Static inputs of one layer's small ops at ``t`` tokens and the two implementations."""

    def __init__(self, t: int, kv_heads: int, dtype: torch.dtype, dev: str) -> None:
        from lmkiln.models.llama import RMSNorm

        g = torch.Generator(device=dev).manual_seed(t)

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

        self.t, self.hk = t, kv_heads
        self.norms = [RMSNorm(HIDDEN, 1e-5).to(dev, dtype) for _ in range(2)]
        for n in self.norms:
            n.weight.requires_grad_(False).copy_(randn(HIDDEN, scale=0.1) + 1)
        self.x, self.res, self.o = randn(t, HIDDEN), randn(t, HIDDEN, scale=4), randn(t, HIDDEN)
        self.qkv = randn(t, (HEADS + 2 * kv_heads) * HEAD_DIM)
        self.gate_up = randn(t, 2 * INTER, scale=3)
        pos = torch.arange(t, device=dev, dtype=torch.float32)[:, None] + 100
        inv = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM)
        ang = torch.cat((pos * inv, pos * inv), dim=-1)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sizes = [HEADS * HEAD_DIM, self.hk * HEAD_DIM, self.hk * HEAD_DIM]
        return tuple(p.view(self.t, -1, HEAD_DIM) for p in self.qkv.split(sizes, dim=-1))  # type: ignore[return-value]

    # the model's torch code (llama.py with fused=False)
    def torch_norm(self) -> Any:
        return self.norms[0](self.x, self.res)

    def torch_rotary(self) -> Any:
        from lmkiln.models.llama import rotate_half

        q, k, v = self._qkv()
        v = v.contiguous()
        cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def torch_silu(self) -> torch.Tensor:
        import torch.nn.functional as F

        gate, up = self.gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def torch_layer(self) -> Any:
        h1, r1 = self.norms[0](self.x, self.res)
        rot = self.torch_rotary()
        h2, r2 = self.norms[1](self.o, r1)
        return h1, rot, h2, r2, self.torch_silu()

    # the fused kernels (llama.py with fused=True)
    def fused_norm(self) -> Any:
        return self.norms[0](self.x, self.res, fused=True)

    def fused_rotary(self) -> Any:
        from lmkiln.kernels.fused import rotary_

        q, k, v = self._qkv()
        rotary_(q, k, self.cos, self.sin)
        return q, k, v

    def fused_silu(self) -> torch.Tensor:
        from lmkiln.kernels.fused import silu_mul

        return silu_mul(self.gate_up)

    def fused_layer(self) -> Any:
        h1, r1 = self.norms[0](self.x, self.res, fused=True)
        rot = self.fused_rotary()
        h2, r2 = self.norms[1](self.o, r1, fused=True)
        return h1, rot, h2, r2, self.fused_silu()


def kernel_count(fn: Callable[[], Any]) -> int | None:
    """CUDA kernels one eager call launches (profiler; None where CUPTI is unavailable)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception as e:  # CUPTI missing or busy: the count is optional
        log.warning("profiler unavailable (%s): no kernel counts", e)
        return None
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if "memcpy" not in n.lower() and "memset" not in n.lower())


def _maxdiff(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return max(_maxdiff(x, y) for x, y in zip(a, b, strict=True))


def run(
    out_dir: Path, batches: Sequence[int], kv_heads: int, dtype: torch.dtype, rep_ms: int, graphs: bool = True
) -> dict[str, Any]:
    """Time every batch size and write ``fused.json``; returns the report."""
    import triton

    from lmkiln.artifact import write_json_atomic
    from lmkiln.bench.kernels import _timed

    if not torch.cuda.is_available():
        raise LmkilnError("the fused-ops benchmark needs a CUDA GPU")
    dev = "cuda"
    props = torch.cuda.get_device_properties(dev)
    report: dict[str, Any] = {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {"hidden": HIDDEN, "num_q_heads": HEADS, "num_kv_heads": kv_heads, "head_dim": HEAD_DIM,
                  "intermediate": INTER, "dtype": str(dtype).removeprefix("torch.")},
        "rep_ms": rep_ms,
        "timing": "cuda-graph replays" if graphs else "eager calls",
        "rows": [],
    }
    with torch.inference_mode():
        for t in batches:
            ops = LayerOps(t, kv_heads, dtype, dev)
            # correctness first (on fresh qkv: the fused rotary works in place)
            qkv0 = ops.qkv.clone()
            want = ops.torch_layer()
            got = ops.fused_layer()
            row: dict[str, Any] = {"tokens": t, "max_abs_diff": _maxdiff(got, want)}
            ops.qkv.copy_(qkv0)
            for part in ("norm", "rotary", "silu", "layer"):
                for impl in ("torch", "fused"):
                    fn = getattr(ops, f"{impl}_{part}")
                    row[f"{impl}_{part}_us"] = _timed(lambda _, fn=fn: fn(), 1, rep_ms, graphs)
            row["speedup_layer"] = row["torch_layer_us"] / row["fused_layer_us"]
            row["per_step_32_layers_us"] = {
                "torch": LAYERS * row["torch_layer_us"],
                "fused": LAYERS * row["fused_layer_us"],
            }
            row["kernels_per_layer"] = {"torch": kernel_count(ops.torch_layer),
                                        "fused": kernel_count(ops.fused_layer)}
            log.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            report["rows"].append(row)
            del ops
            torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "fused.json", report)
    return report


def format_table(report: dict[str, Any]) -> str:
    s = report["shape"]
    lines = [
        f"{report['device']}: one layer's small ops, hidden {s['hidden']}, {s['num_q_heads']}/"
        f"{s['num_kv_heads']} heads, inter {s['intermediate']}, {s['dtype']} ({report['timing']}; us)",
        f"{'T':>5} {'norm t/f':>13} {'rotary t/f':>13} {'silu t/f':>13} {'layer t/f':>13} {'x':>5} "
        f"{'32 layers t/f':>15} {'kernels':>8} {'maxdiff':>8}",
    ]
    for r in report["rows"]:

        def pair(p: str, r: dict[str, Any] = r) -> str:
            return f"{r[f'torch_{p}_us']:6.1f}/{r[f'fused_{p}_us']:<6.1f}"

        k = r["kernels_per_layer"]
        st = r["per_step_32_layers_us"]
        lines.append(
            f"{r['tokens']:>5} {pair('norm'):>13} {pair('rotary'):>13} {pair('silu'):>13} "
            f"{pair('layer'):>13} "
            f"{r['speedup_layer']:5.2f} {st['torch']:7.0f}/{st['fused']:<7.0f} {k['torch']}/{k['fused']:<5} "
            f"{r['max_abs_diff']:8.1e}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmkiln.bench.fused", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench/fused"), help="output directory")
    p.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES), help="tokens per step")
    p.add_argument("--kv-heads", type=int, default=32, help="32: Llama-2-7B; 8: Llama-3-8B-style GQA")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per measurement")
    p.add_argument("--eager", action="store_true", help="time eager calls, not CUDA-graph replays")
    args = p.parse_args(argv)
    return report_main(
        lambda: run(
            args.out, args.batch, args.kv_heads, getattr(torch, args.dtype), args.rep_ms, not args.eager
        ),
        format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
