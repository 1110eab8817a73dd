"""Where a decode step's wall time goes: GPU work vs the host (scheduling, inputs, outputs).

For each batch size, the engine decodes ``--steps`` steps of a full batch; every step's wall time is split
into the GPU span (a CUDA event recorded before the forward is launched and one after the sampler's kernels
are queued; their elapsed time covers the forward, the logits and sampling) and the rest, which the host
spends between steps while the GPU idles (the engine syncs once a step for the sampled tokens). On the CPU
the span is the forward + sampling wall time. Writes ``step_profile.json``::

    python -m lmkiln.bench.step_profile synthetic --out results/bench/step_profile --batch-sizes 1 64
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class _Span:
    """Marks the start of ``_hidden`` and the end of the sampler call of every step (CUDA events or wall)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[Any, Any]] = []
        self._start: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def wrap_start(self, fn: Callable) -> Callable:
        def wrapped(*a: Any, **k: Any) -> Any:
            self._start = self._now()
            return fn(*a, **k)

        return wrapped

    def end(self) -> None:
        self.marks.append((self._start, self._now()))

    def spans_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


class _GcPauses:
    """Wall time the garbage collector spends while the block runs (``gc.callbacks``), by generation."""

    def __init__(self) -> None:
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t0 = 0.0

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            gen = int(info.get("generation", 2))
            self.ms[gen] += (time.perf_counter() - self._t0) * 1e3
            self.count[gen] += 1

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)


def _pinned_allocs(device: torch.device) -> int | None:
    """How many pinned blocks torch's host allocator has created so far (None: not CUDA, or no statistics)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device.type != "cuda" or stats is None:
        return None
    return int(stats().get("num_host_alloc", 0))


class _SamplerProxy:
    """The runner's sampler, marking the end of the GPU span after each call queues its kernels."""

    def __init__(self, inner: Any, span: _Span) -> None:
        self.inner, self.span = inner, span

    def __call__(self, *a: Any, **k: Any) -> Any:
        out = self.inner(*a, **k)
        self.span.end()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def kernel_table(engine: Any, steps: int, chrome_trace: Path | None = None) -> list[dict[str, Any]]:
    """GPU time per decode step by kernel name over ``steps`` steps (torch.profiler / CUPTI; CUDA graph
    replays report their kernels one by one), largest first; ``chrome_trace``: also write the timeline
    there (chrome://tracing / Perfetto JSON: the gaps between kernels, the work outside the graphs)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # one warm-up step first: the profiler misses part of the first step it sees
    plan = schedule(wait=0, warmup=1, active=steps)
    with profile(activities=[ProfilerActivity.CUDA], schedule=plan) as prof:
        for _ in range(steps + 1):
            engine.step()
            torch.cuda.synchronize()
            prof.step()
    if chrome_trace is not None:
        chrome_trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(chrome_trace))
    rows: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(ev.name, [0, 0.0])
            r[0] += 1
            r[1] += ev.device_time
    table = [
        {"kernel": k, "calls_per_step": n / steps, "us_per_step": t / steps} for k, (n, t) in rows.items()
    ]
    return sorted(table, key=lambda r: -r["us_per_step"])


def profile_batch(
    engine: Any,
    batch: int,
    prompt_len: int,
    steps: int,
    vocab: int,
    trace: bool = False,
    chrome_trace: Path | None = None,
) -> dict[str, Any]:
    """Decode ``steps`` steps of ``batch`` sequences; per-step wall, GPU span and host gap (medians);
    ``trace``: also the GPU time per kernel name (:func:`kernel_table`), and its timeline to
    ``chrome_trace``."""
    from lmkiln.bench.engine import _pct, _prompts
    from lmkiln.engine import SamplingParams

    traced = 5 if trace and engine.runner.device.type == "cuda" else 0
    params = SamplingParams(temperature=0, max_tokens=steps + traced + 8, ignore_eos=True)
    for p in _prompts(batch, prompt_len, vocab, batch):
        engine.add_request(p, params)
    sched = engine.scheduler
    while len(sched.running) < batch or any(s.is_prefill for s in sched.running):  # prefill everything
        engine.step()
    for _ in range(3):  # warm decode steps
        engine.step()
    kernels = kernel_table(engine, traced - 1, chrome_trace) if traced else None  # full-batch decode steps
    runner = engine.runner
    span = _Span(runner.device.type == "cuda")
    hidden, sampler = runner._hidden, runner.sampler
    runner._hidden = span.wrap_start(hidden)
    runner.sampler = _SamplerProxy(sampler, span)
    walls = []
    pinned0 = _pinned_allocs(runner.device)
    try:
        with _GcPauses() as pauses:
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                walls.append((time.perf_counter() - t0) * 1e3)
    finally:
        del runner._hidden  # back to the method
        runner.sampler = sampler
    while engine.has_unfinished_requests():
        engine.step()
    pinned1 = _pinned_allocs(runner.device)
    gpu = span.spans_ms()
    wall_ms, gpu_ms = statistics.median(walls), statistics.median(gpu)
    row = {
        "batch": batch,
        "steps": steps,
        "wall_ms": wall_ms,
        "gpu_span_ms": gpu_ms,
        "host_gap_ms": wall_ms - gpu_ms,
        "gpu_busy_frac": gpu_ms / wall_ms,
        # the median hides rare long steps that a tokens/s average (lmkiln bench engine) pays for
        "wall_mean_ms": statistics.fmean(walls),
        "wall_p90_ms": _pct(walls, 90),
        "wall_p99_ms": _pct(walls, 99),
        "wall_max_ms": max(walls),
        "gc_pause_ms": sum(pauses.ms),
        "gc_collections": {f"gen{g}": n for g, n in enumerate(pauses.count)},
        # pinned host blocks torch's caching allocator had to create (cudaHostAlloc) during the steps
        "pinned_allocs": None if pinned0 is None or pinned1 is None else pinned1 - pinned0,
        # steps over twice the median: (index, wall ms, GPU span ms), whether the host or the GPU stalled
        "slow_steps": [
            [i, round(w, 3), round(g, 3)]
            for i, (w, g) in enumerate(zip(walls, gpu, strict=True))
            if w > 2 * wall_ms
        ][:20],
    }
    if kernels is not None:
        row["kernels"] = kernels
    return row


def run(a: argparse.Namespace) -> dict[str, Any]:
    from lmkiln.artifact import write_json_atomic
    from lmkiln.bench.engine import SYNTHETIC, _engine, build_synthetic
    from lmkiln.bench.quantize import device_name
    from lmkiln.engine.loader import load_model, resolve_device

    device = resolve_device(a.device)
    model = a.model
    if str(model) == SYNTHETIC:
        hf_dir, packed = build_synthetic(a.workdir)
        model = packed if a.weights == "int4" else hf_dir
    dtype = a.dtype if device.type == "cuda" else "float32"
    loaded = load_model(model, device, dtype)
    session_len = a.session_len or a.prompt_len + a.steps + 16
    report: dict[str, Any] = {
        "benchmark": "step_profile",
        "device": device_name(),
        "model": str(model),
        "dtype": dtype,
        "torch": torch.__version__,
        "session_len": session_len,
        "max_num_seqs": a.max_num_seqs or None,
        "rows": [],
    }
    for b in a.batch_sizes:
        eng = _engine(model, loaded, str(device), max(b, a.max_num_seqs), session_len, a.quant_policy)
        timeline = a.out / f"trace_b{b}.json" if a.trace else None
        row = profile_batch(eng, b, a.prompt_len, a.steps, loaded.config.vocab_size, a.trace, timeline)
        log.info(
            "batch %4d: step %.3f ms = GPU span %.3f ms + host gap %.3f ms (GPU busy %.0f %%); mean %.3f ms, "
            "max %.3f ms, GC %.1f ms over %d steps",
            b,
            row["wall_ms"],
            row["gpu_span_ms"],
            row["host_gap_ms"],
            100 * row["gpu_busy_frac"],
            row["wall_mean_ms"],
            row["wall_max_ms"],
            row["gc_pause_ms"],
            a.steps,
        )
        report["rows"].append(row)
        del eng
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "step_profile.json", report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m lmkiln.bench.step_profile", description=doc)
    p.add_argument("model", type=Path, metavar="MODEL_DIR_OR_synthetic")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"))
    p.add_argument("--weights", choices=("int4", "bf16"), default="bf16", help="which synthetic model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--quant-policy", type=int, choices=(0, 4, 8), default=0)
    p.add_argument(
        "--max-num-seqs", type=int, default=0,
        help="the engine's max_num_seqs (default: the batch size; `lmkiln bench engine` uses its largest)",
    )
    p.add_argument(
        "--session-len", type=int, default=0,
        help="the engine's session length (default: prompt + steps + 16); it sizes the decode graphs' block "
        "tables, and so the decode attention's split count",
    )
    p.add_argument(
        "--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="activation dtype (GPU)"
    )
    p.add_argument(
        "--trace", action="store_true",
        help="also GPU time per kernel (torch.profiler), a timeline of 4 steps in --out/trace_b<batch>.json",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
