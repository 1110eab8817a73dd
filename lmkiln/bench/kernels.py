"""``lmkiln bench kernels``: W4A16 kernels vs fp16 cuBLAS, torch's tinygemm and the HBM floor.

For the Llama-2-7B linear shapes (fused qkv, o, fused gate_up, down) and a list of M, one run measures, on the
same GPU: our kernel (the dispatcher's choice), ``F.linear`` in fp16 (cuBLAS), ``torch._weight_int4pack_mm``
(tinygemm, bf16) on the same int4 weights, and the HBM floor (our bytes / the copy bandwidth measured in the
run). Every time is the median of ``triton.testing.do_bench`` (which flushes L2 before each call) while the
inputs rotate over copies, so no weight is L2-resident; every method is captured in CUDA graphs and replayed
(``--eager`` times plain calls, which for a small Triton GEMM also times the Python launch). Results go to
``kernels.json`` and a roofline plot ``kernels_roofline.png``; the per-token sum over the 32 decoder layers is
reported per M.

``--tune`` first times candidate configurations per (shape, M) and writes the winners to a tuned table
(``kernels/tuned/<gpu>.json``), which the dispatcher reads at start-up instead of autotuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmkiln.bench import report_main
from lmkiln.errors import LmkilnError, QuantConfigError
from lmkiln.kernels.dispatch import KERNEL_KINDS

log = logging.getLogger(__name__)

LLAMA2_7B_SHAPES: dict[str, tuple[int, int]] = {  # name -> (K, N)
    "qkv": (4096, 12288),
    "o": (4096, 4096),
    "gate_up": (4096, 22016),
    "down": (11008, 4096),
}
LLAMA2_7B_LAYERS = 32
DEFAULT_M = (1, 4, 16, 32, 64, 128, 256, 1024, 2048, 8192)
# The targets: per-token sum over the 7B linears (ms) and the reference figures measured elsewhere.
TARGETS_MS = {1: 1.4, 16: 1.6, 64: 2.2, 256: 5.5}
TARGET_FP16_RATIO_2048 = 1.1
REFERENCE_MS = {
    1: {"fp16": 6.37, "tinygemm": 2.81, "floor": 1.14},
    16: {"fp16": 6.33, "tinygemm": 7.83},
    64: {"fp16": 6.43, "tinygemm": 29.0},
    256: {"fp16": 7.28, "tinygemm": 114.7},
    2048: {"fp16": 37.8},
}


@dataclasses.dataclass
class Weights:
    """One linear's int4 weights in every format a method needs (on the GPU)."""

    k: int
    n: int
    group_size: int
    qweight: torch.Tensor
    sz: torch.Tensor
    codes: torch.Tensor  # uint8 [K, N]
    zeros: torch.Tensor  # uint8 [K/G, N]
    scales: torch.Tensor  # fp16 [K/G, N]

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.group_size
        z = self.zeros.to(dtype).repeat_interleave(g, 0)
        s = self.scales.to(dtype).repeat_interleave(g, 0)
        return (self.codes.to(dtype) - z) * s


def make_weights(k: int, n: int, group_size: int, device: torch.device, seed: int = 0) -> Weights:
    from lmkiln.quant.pack import pack_codes

    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, device=device, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen, device=device, dtype=torch.uint8)
    scales = (torch.rand((k // group_size, n), generator=gen, device=device) * 0.01 + 0.002).half()
    p = pack_codes(codes, zeros, scales)
    return Weights(k, n, group_size, p["qweight"], p["sz"], codes, zeros, scales)


def tinygemm_pack(w: Weights, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Convert to ``torch._weight_int4pack_mm`` operands: ``(packed, scale_and_zero bf16, api)``.

    tinygemm computes ``(q - 8) * scale + zero``, so ``zero = (8 - z) * s`` reproduces ``(q - z) * s``.
    """
    q = w.codes.t().contiguous()  # [N, K]
    try:
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)
        api = "uint8[N,K/2]"
    except (RuntimeError, TypeError):
        packed = torch._convert_weight_to_int4pack(q.to(torch.int32), inner_k_tiles)
        api = "int32[N,K]"
    s = w.scales.float()
    zero = (8.0 - w.zeros.float()) * s
    sz = torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz, api


def _median_us(fn: Callable[[], Any], rep_ms: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")) * 1e3


def _rotating(fn: Callable[[int], Any], copies: int) -> Callable[[], Any]:
    state = [0]

    def call() -> Any:
        state[0] = (state[0] + 1) % copies
        return fn(state[0])

    return call


def _graphed(fn: Callable[[int], Any], copies: int) -> Callable[[], Any]:
    """One CUDA graph per input copy (captured after a warm-up that compiles), replayed in rotation.

    do_bench enqueues a 256 MB L2 flush before every call; an eager Triton launch (Python argument checks +
    launch, tens of us of CPU) can take longer than that memset on an H200 (~55 us), so the GPU waits for the
    CPU inside the timed interval. Graph replays cost the CPU a few us, so the timings are GPU time, the way a
    decode step runs (CUDA graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for i in range(copies):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    return _rotating(lambda i: graphs[i].replay(), copies)


def _timed(fn: Callable[[int], Any], copies: int, rep_ms: int, graphs: bool) -> float:
    return _median_us(_graphed(fn, copies) if graphs else _rotating(fn, copies), rep_ms)


def _time_ours(
    cfg, xs: list[torch.Tensor], ws: list[Weights], scratch: torch.Tensor, rep_ms: int, graphs: bool = True
) -> float:
    from lmkiln.kernels.w4a16 import LAUNCHERS

    launch = LAUNCHERS[cfg.kind]
    return _timed(
        lambda i: launch(xs[i], ws[i].qweight, ws[i].sz, ws[i].zeros, cfg, scratch), len(xs), rep_ms, graphs
    )


def _time_fp16(xs: list[torch.Tensor], w_t: list[torch.Tensor], rep_ms: int, graphs: bool = True) -> float:
    import torch.nn.functional as F

    return _timed(lambda i: F.linear(xs[i], w_t[i]), len(xs), rep_ms, graphs)


def _time_tinygemm(
    xb: list[torch.Tensor], tg: list[tuple], group_size: int, rep_ms: int, graphs: bool = True
) -> float:
    return _timed(
        lambda i: torch._weight_int4pack_mm(xb[i], tg[i][0], group_size, tg[i][1]), len(xb), rep_ms, graphs
    )


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, rep_ms: int = 200) -> float:
    """Device-to-device copy bandwidth counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    us = _median_us(functools.partial(torch.empty_like(src).copy_, src), rep_ms)
    return 2 * nbytes / (us * 1e-6) / 1e9


def matmul_peak_tflops(device: torch.device, size: int = 8192, rep_ms: int = 200) -> float:
    a = torch.randn(size, size, dtype=torch.float16, device=device)
    b = torch.randn(size, size, dtype=torch.float16, device=device)
    us = _median_us(lambda: a @ b, rep_ms)
    return 2 * size**3 / (us * 1e-6) / 1e12


def our_bytes(m: int, k: int, n: int, group_size: int, act_bytes: int = 2) -> int:
    """Fewest bytes our GEMM must move: int4 codes + (s, m) pairs + activations in + outputs out."""
    return k * n // 2 + (k // group_size) * n * 4 + m * k * act_bytes + m * n * act_bytes


# ----------------------------------------------------------------------------------------------------------
# Candidate configurations for --tune
# ----------------------------------------------------------------------------------------------------------


def candidate_configs(m: int, n: int, k: int) -> list:
    """Configurations worth timing for one shape and M (split-K is a runtime argument: gemv / fma compile
    once per power of two of it, mma once)."""
    from lmkiln.kernels.w4a16 import KernelConfig

    n_chunks = k // 128
    out: list[KernelConfig] = []

    def splits(tiles: int) -> list[int]:
        vals = {s for s in (1, 2, 3, 4, 6, 8, 12, 16) if s <= n_chunks and tiles * s <= 8 * 132}
        # and splits of 4 or 6 chunks a program (whole two-chunk iterations), up to 12 programs an SM: the
        # H100's batch-1 down (86 chunks) runs 11.4 us in 22 splits against 12.6 in 16 (notes/kernels.md)
        vals |= {s for s in (-(-n_chunks // p) for p in (4, 6)) if tiles * s <= 12 * 132}
        vals = sorted(vals)
        return [s for s in vals if tiles * s >= 66 or s == vals[-1]] or [1]

    if m <= 8:
        # CUDA-core kernel: block_m rows per program, every dequantized weight reused across them
        bm = 1 << (m - 1).bit_length()
        flush = 2 if bm <= 2 else 4
        # (block_n, warps, stages, chunks, flush)
        shapes = [(128, 4, 1, 1, flush), (128, 4, 2, 1, flush), (256, 8, 1, 1, flush), (256, 4, 1, 1, flush)]
        if bm == 1:  # 64 columns x 2 warps, two chunks an iteration: the H100's M=1 winners in a chain
            shapes += [(128, 4, 1, 2, flush), (128, 4, 3, 1, flush), (64, 2, 1, 2, 1), (128, 4, 1, 2, 1)]
        for bn, warps, st, chunks, fl in shapes:
            if n % bn:
                continue
            for sk in splits(n // bn):
                out.append(
                    KernelConfig(
                        kind="fma",
                        block_m=bm,
                        block_n=bn,
                        split_k=sk,
                        num_warps=warps,
                        num_stages=st,
                        chunks=chunks,
                        flush=fl,
                    )
                )
    if m == 1:
        # the CUDA C++ GEMV (fp16 where NVRTC loads; the tuner skips it elsewhere): warps = 32-column blocks a
        # CTA, ksplit warps over each block's K range, one chunk an iteration, tensor cores
        for warps, ksplit in ((1, 8), (1, 4), (2, 4), (4, 1)):
            tiles = -(-n // (32 * warps))
            out += [KernelConfig.cuda_gemv(warps, ksplit, sk) for sk in sorted({1, 2, 3, *splits(tiles)})]
        for bn, warps in ((128, 4), (256, 8)):
            for st in (1, 3):
                if n % bn == 0:
                    for sk in splits(n // bn):
                        out.append(
                            KernelConfig(kind="gemv", block_n=bn, split_k=sk, num_warps=warps, num_stages=st)
                        )
    if m <= 64:
        # zero-folding tensor-core tiles; pipelining depth 1 keeps the weights out of the cp.async/smem path
        for bm in sorted({16, min(64, max(16, 1 << (m - 1).bit_length()))}):
            for bn in (64, 128, 256):
                if n % bn or (bm >= 32 and bn == 256) or (bm == 64 and bn == 128):
                    continue
                tiles = (n // bn) * -(-m // bm)
                for st in (1, 2, 3):
                    for sk in splits(tiles):
                        out.append(
                            KernelConfig(
                                kind="mma",
                                block_m=bm,
                                block_n=bn,
                                split_k=sk,
                                num_warps=4,
                                num_stages=st,
                                zfold=True,
                                join=True,
                            )
                        )
    if m >= 128:
        for bm, bn, warps, zfold in ((64, 64, 4, True), (128, 128, 8, False), (64, 128, 4, False)):
            if n % bn:
                continue
            tiles = (n // bn) * -(-m // bm)
            sks = [1] if tiles >= 132 else [s for s in splits(tiles) if s <= 4]
            for sk in sks:
                out.append(
                    KernelConfig(
                        kind="mma",
                        block_m=bm,
                        block_n=bn,
                        split_k=sk,
                        num_warps=warps,
                        num_stages=3,
                        zfold=zfold,
                        join=True,
                    )
                )
    if m >= 2:
        out += mma_t_candidates(m, n, k)
    if m >= 64:
        out.append(KernelConfig(kind="dequant_mm", block_n=64, num_warps=4))
    return out


def candidates_against(current: Any, m: int, n: int, k: int, kinds: Sequence[str]) -> list:
    """``current`` (the dispatcher's choice) first, then the other candidates of ``kinds`` for ``[M, K] x
    [K, N]``: what a tuning run restricted to some kernel kinds times."""
    return [current] + [c for c in candidate_configs(m, n, k) if c.kind in kinds and c != current]


def _wave_splits(tiles: int, n_chunks: int) -> list[int]:
    """split-K values that make a launch of ``tiles`` tiles about 1, 2 or 3 waves of 132 programs."""
    return sorted({max(1, min(n_chunks, 16, round(w * 132 / tiles))) for w in (1, 2, 3)})


def mma_t_candidates(m: int, n: int, k: int) -> list:
    """Swapped-operand tensor-core tiles (kind ``mma_t``): ``block_m`` tokens per tile (the MMA's N: the
    next power of two of M up to 32, else 32-128), 64..256 weight columns (the MMA's M: one or two
    warpgroups), pipelining depth 2-4, one dot per group or per slice, split-K for 1-3 waves."""
    from lmkiln.kernels.w4a16 import KernelConfig

    if m <= 32:
        bms = [max(16, 1 << (m - 1).bit_length())]
    elif m <= 64:
        bms = [32, 64]
    else:
        bms = [64, 128]
    out = []
    for bm in bms:
        for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
            if n % bn or (bm == 128 and warps == 4):  # 128 x 128 in one warpgroup spills
                continue
            for st in (3, 4) if bm <= 32 else (2, 3):
                for join in (True, False):
                    for sk in _wave_splits((n // bn) * -(-m // bm), k // 128):
                        out.append(
                            KernelConfig(
                                kind="mma_t",
                                block_m=bm,
                                block_n=bn,
                                split_k=sk,
                                num_warps=warps,
                                num_stages=st,
                                join=join,
                                zfold=False,
                            )
                        )
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _compile_key(cfg) -> tuple:
    """What decides a candidate's compiled variant: its config with split-K rounded to the power of two that
    the gemv / fma launchers pass as a constexpr (mma kernels do not specialise on it)."""
    split = 1 << (max(1, cfg.split_k) - 1).bit_length() if cfg.kind in ("gemv", "fma") else 1
    return tuple(sorted(dataclasses.replace(cfg, split_k=split).to_dict().items()))


def _warm_worker(job: tuple[list[dict[str, Any]], int, str]) -> int:
    """Launch each config once on the ``o`` shape (the 7B shapes specialise alike: N and K/8 are multiples
    of 16; only ``fma``'s L2-prefetch rows depend on N, so its variants for other shapes may compile again),
    so that Triton compiles it into its on-disk cache. Returns how many launched."""
    from lmkiln.kernels.w4a16 import LAUNCHERS, KernelConfig, make_scratch

    configs, group_size, dtype_name = job
    dev = torch.device("cuda")
    k, n = LLAMA2_7B_SHAPES["o"]
    w = make_weights(k, n, group_size, dev)
    scratch = make_scratch(dev)
    xs = {m: torch.randn(m, k, device=dev, dtype=getattr(torch, dtype_name)) for m in (1, 16)}
    done = 0
    for d in configs:
        cfg = KernelConfig.from_dict(d)
        try:
            LAUNCHERS[cfg.kind](xs[1 if cfg.kind == "gemv" else 16], w.qweight, w.sz, w.zeros, cfg, scratch)
            done += 1
        except Exception as e:  # the timing loop records the failure against its shape
            log.debug("warm-up of %s failed: %r", cfg, e)
    torch.cuda.synchronize()
    return done


def warm_compile(configs: Sequence[Any], group_size: int, dtype: torch.dtype, workers: int) -> float:
    """Compile the distinct variants among ``configs`` in ``workers`` spawned processes; returns seconds."""
    import concurrent.futures
    import multiprocessing

    t0 = time.time()
    # (kind "cuda" builds with NVRTC in the process that launches it, a fraction of a second: nothing to warm)
    uniq = list({_compile_key(c): c.to_dict() for c in configs if c.kind != "cuda"}.values())
    jobs = [(uniq[i::workers], group_size, str(dtype).replace("torch.", "")) for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        done = sum(pool.map(_warm_worker, [j for j in jobs if j[0]]))
    took = time.time() - t0
    log.info("compiled %d of %d kernel variants in %d processes: %.0f s", done, len(uniq), workers, took)
    return took


def _check(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    y, ref = y.float(), ref.float()
    ok = bool(torch.isfinite(y).all())
    return {
        "max_abs": float((y - ref).abs().max()),
        "rel_fro": float((y - ref).norm() / ref.norm().clamp_min(1e-30)),
        "finite": ok,
    }


def run(
    out_dir: Path,
    ms: Sequence[int] = DEFAULT_M,
    shapes: Sequence[str] = tuple(LLAMA2_7B_SHAPES),
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    tune: bool = False,
    tuned_out: Path | None = None,
    rep_ms: int = 60,
    baselines: bool = True,
    plot: bool = True,
    graphs: bool = True,
    kinds: Sequence[str] | None = None,
    compile_workers: int = 0,
) -> dict[str, Any]:
    """Measure everything on the current CUDA device; write ``kernels.json`` (+ PNG) under ``out_dir``.

    ``graphs``: time CUDA-graph replays (GPU time; see ``_graphed``) instead of eager calls. ``kinds``: tune
    only the candidates of these kernel kinds, against the dispatcher's current choice (which stays where
    none beats it). ``compile_workers`` > 1: compile every candidate in that many processes first (Triton's
    on-disk cache then serves the timing loop)."""
    import triton

    from lmkiln.kernels import dispatch, w4a16

    if not torch.cuda.is_available():
        raise LmkilnError("`lmkiln bench kernels` needs a CUDA GPU; none is visible to torch")
    unknown = [s for s in shapes if s not in LLAMA2_7B_SHAPES]
    if unknown:
        raise QuantConfigError(f"unknown shapes {unknown}; choose from {sorted(LLAMA2_7B_SHAPES)}")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    props = torch.cuda.get_device_properties(dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bw = copy_bandwidth_gbps(dev)
    peak = matmul_peak_tflops(dev) if baselines else float("nan")
    log.info("%s: copy %.0f GB/s, fp16 mm %.0f TFLOP/s", name, bw, peak)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    scratch = w4a16.make_scratch(dev)
    report: dict[str, Any] = {
        "device": name,
        "sm_count": props.multi_processor_count,
        "l2_bytes": l2,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_bw_GBps": bw,
        "fp16_mm_peak_TFLOPs": peak,
        "group_size": group_size,
        "dtype": str(dtype).replace("torch.", ""),
        "rep_ms": rep_ms,
        "timing": "cuda-graph replays" if graphs else "eager calls",
        "results": [],
        "checks": [],
        "tune": [],
    }
    tuned_entries: list[dict[str, Any]] = []

    def cands_for(m: int, n: int, k: int) -> list:
        if kinds is None:
            return candidate_configs(m, n, k)
        return candidates_against(dispatch.choose_config(m, n, k, group_size, dtype, dev), m, n, k, kinds)

    if tune and compile_workers > 1:
        todo = [c for sn in shapes for m in ms for c in cands_for(m, *reversed(LLAMA2_7B_SHAPES[sn]))]
        report["compile_warmup_s"] = warm_compile(todo, group_size, dtype, compile_workers)
    for sname in shapes:
        k, n = LLAMA2_7B_SHAPES[sname]
        copies = 2  # with do_bench's L2 flush, no weight is L2-resident when a call starts
        ws = [make_weights(k, n, group_size, dev, seed=i) for i in range(copies)]
        w_fp16 = [w.dequant(torch.float32).t().contiguous().to(dtype) for w in ws] if baselines else []
        tg = []
        if baselines:
            try:
                tg = [tinygemm_pack(w) for w in ws]
                report.setdefault("tinygemm_api", tg[0][2])
            except (RuntimeError, TypeError, AttributeError) as e:
                report["tinygemm_error"] = repr(e)
        for m in ms:
            xs = [torch.randn(m, k, device=dev, dtype=dtype) for _ in range(copies)]
            ref = xs[0].float() @ ws[0].dequant(torch.float32)
            # ---- tune
            if tune:
                best = best_other = None
                cuda_ok = dtype == torch.float16 and w4a16.w4a16_cuda.enabled(dev)
                for cfg in cands_for(m, n, k):
                    if cfg.kind == "cuda" and not cuda_ok:
                        continue
                    try:
                        y = w4a16.LAUNCHERS[cfg.kind](
                            xs[0], ws[0].qweight, ws[0].sz, ws[0].zeros, cfg, scratch
                        )
                        chk = _check(y, ref)
                        if not chk["finite"] or chk["rel_fro"] > 5e-3:
                            report["tune"].append(
                                {"shape": sname, "m": m, "config": cfg.to_dict(), "bad": chk}
                            )
                            continue
                        us = _time_ours(cfg, xs, ws, scratch, max(20, rep_ms // 3), graphs)
                    except Exception as e:  # a config that fails to compile or launch is skipped, not fatal
                        report["tune"].append(
                            {"shape": sname, "m": m, "config": cfg.to_dict(), "error": repr(e)[:300]}
                        )
                        continue
                    report["tune"].append({"shape": sname, "m": m, "config": cfg.to_dict(), "us": us})
                    if best is None or us < best[0]:
                        best = (us, cfg)
                    if cfg.kind != "cuda" and (best_other is None or us < best_other[0]):
                        best_other = (us, cfg)
                if best is not None:
                    entry = {
                        "n": n,
                        "k": k,
                        "group_size": group_size,
                        "dtype": report["dtype"],
                        "m_max": m,
                        "config": best[1].to_dict(),
                        "us": round(best[0], 2),
                    }
                    if best[1].kind == "cuda" and best_other is not None:  # where NVRTC is missing
                        entry["fallback"] = best_other[1].to_dict()
                    tuned_entries.append(entry)
                    print(f"tune {sname:8s} M={m:5d} best {best[0]:9.1f} us {best[1]}", flush=True)
            cfg = _pick_from(tuned_entries, n, k, m) if tune else None
            cfg = cfg or dispatch.choose_config(m, n, k, group_size, dtype, dev)
            y = w4a16.LAUNCHERS[cfg.kind](xs[0], ws[0].qweight, ws[0].sz, ws[0].zeros, cfg, scratch)
            chk = _check(y, ref)
            report["checks"].append({"shape": sname, "m": m, **chk})
            row: dict[str, Any] = {"shape": sname, "k": k, "n": n, "m": m, "config": cfg.to_dict()}
            row["ours_us"] = _time_ours(cfg, xs, ws, scratch, rep_ms, graphs)
            nbytes = our_bytes(m, k, n, group_size)
            row["floor_us"] = nbytes / (bw * 1e9) * 1e6
            row["flops"] = 2 * m * n * k
            row["bytes_ours"] = nbytes
            if baselines:
                row["fp16_us"] = _time_fp16(xs, w_fp16, rep_ms, graphs)
                row["bytes_fp16"] = 2 * (k * n + m * k + m * n)
                if tg:
                    xb = [x.to(torch.bfloat16) for x in xs]
                    try:
                        yt = torch._weight_int4pack_mm(xb[0], tg[0][0], group_size, tg[0][1])
                        row["tinygemm_check"] = _check(yt, ref)
                        row["tinygemm_us"] = _time_tinygemm(xb, tg, group_size, rep_ms, graphs)
                    except (RuntimeError, TypeError) as e:
                        row["tinygemm_error"] = repr(e)[:300]
            row["pct_floor"] = 100 * row["floor_us"] / row["ours_us"]
            if "fp16_us" in row:
                row["speedup_vs_fp16"] = row["fp16_us"] / row["ours_us"]
            if "tinygemm_us" in row:
                row["speedup_vs_tinygemm"] = row["tinygemm_us"] / row["ours_us"]
            report["results"].append(row)
            print(
                f"{sname:8s} M={m:5d} ours {row['ours_us']:9.1f} us  floor {row['floor_us']:8.1f}  "
                f"fp16 {row.get('fp16_us', math.nan):9.1f}  tinygemm {row.get('tinygemm_us', math.nan):9.1f}"
                f"  err {chk['rel_fro']:.1e}  {cfg.kind} bm{cfg.block_m} bn{cfg.block_n} sk{cfg.split_k}",
                flush=True,
            )
        ws, w_fp16, tg = [], [], []  # free this shape's weights before the next one
        torch.cuda.empty_cache()
        # partial results survive a run that is cut short
        (out_dir / "kernels.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        if tune and tuned_out is not None:
            write_tuned(tuned_out, name, tuned_entries, report)
    report["sum_7b_ms"] = summarize(report["results"], shapes)
    report["targets"] = targets(report["sum_7b_ms"])
    report["wall_s"] = time.time() - t0
    if tune and tuned_out is not None:
        write_tuned(tuned_out, name, tuned_entries, report)
        report["tuned_table"] = str(tuned_out)
    (out_dir / "kernels.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    if plot:
        try:
            plot_roofline(report, out_dir / "kernels_roofline.png")
        except ImportError as e:
            log.warning("no plot: %s (pip install matplotlib)", e)
    return report


def _pick_from(entries: list[dict[str, Any]], n: int, k: int, m: int):
    from lmkiln.kernels.w4a16 import KernelConfig

    cands = [e for e in entries if e["n"] == n and e["k"] == k and e["m_max"] >= m]
    if not cands:
        return None
    return KernelConfig.from_dict(min(cands, key=lambda e: e["m_max"])["config"])


def summarize(results: list[dict[str, Any]], shapes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per M: the sum over the 32 layers x the 4 linears, in ms, for each method (when all shapes ran)."""
    out: dict[str, dict[str, float]] = {}
    for m in sorted({r["m"] for r in results}):
        rows = [r for r in results if r["m"] == m]
        if len({r["shape"] for r in rows}) != len(shapes):
            continue
        entry = {}
        for key in ("ours_us", "fp16_us", "tinygemm_us", "floor_us"):
            if all(key in r for r in rows):
                entry[key.replace("_us", "_ms")] = LLAMA2_7B_LAYERS * sum(r[key] for r in rows) / 1e3
        out[str(m)] = entry
    return out


def targets(sums: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m, limit in TARGETS_MS.items():
        if str(m) in sums and "ours_ms" in sums[str(m)]:
            v = sums[str(m)]["ours_ms"]
            out[f"M={m}"] = {"ours_ms": v, "target_ms": limit, "met": v <= limit}
    s = sums.get("2048", {})
    if "ours_ms" in s and "fp16_ms" in s:
        ratio = s["ours_ms"] / s["fp16_ms"]
        out["M=2048"] = {
            "ratio_vs_fp16": ratio,
            "target_ratio": TARGET_FP16_RATIO_2048,
            "met": ratio <= TARGET_FP16_RATIO_2048,
        }
    return out


def _entry_key(e: dict[str, Any]) -> tuple:
    return (int(e["n"]), int(e["k"]), int(e["group_size"]), str(e["dtype"]), int(e["m_max"]))


def merge_entries(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of a tuned table after a run: ``new`` replaces the ``old`` entry of the same shape, dtype
    and ``m_max``; every other old entry stays (a run over some shapes or M keeps the rest of the table)."""
    merged = {_entry_key(e): e for e in old}
    merged.update({_entry_key(e): e for e in new})
    return [merged[key] for key in sorted(merged)]


def write_tuned(path: Path, device_name: str, entries: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Write (atomically) the tuned table at ``path``, merged into the one already there for this device."""
    from lmkiln.artifact import write_json_atomic
    from lmkiln.quant.pack import LAYOUT, LAYOUT_VERSION

    old: list[dict[str, Any]] = []
    if path.is_file():
        try:
            prev = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise QuantConfigError(f"tuned table {path} is unreadable ({e}); move it away and re-run") from e
        if prev.get("device") == device_name:
            old = list(prev.get("entries", []))
        else:
            log.warning("%s was tuned on %r, not %r: replacing it", path, prev.get("device"), device_name)
    entries = merge_entries(old, entries)

    write_json_atomic(
        path,
        {
            "device": device_name,
            "layout": f"{LAYOUT}/v{LAYOUT_VERSION}",
            "torch": report["torch"],
            "triton": report["triton"],
            "note": "written by `lmkiln bench kernels --tune`; m_max = largest M "
            "an entry was timed for (the dispatcher takes the smallest m_max >= M)",
            "entries": entries,
        },
    )


def plot_roofline(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw, peak = report["copy_bw_GBps"], report["fp16_mm_peak_TFLOPs"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    xs = [2**e for e in range(-2, 14)]
    ax.plot(
        xs,
        [min(x * bw / 1e3, peak if peak == peak else 1e9) for x in xs],
        "k-",
        lw=1,
        label=f"roof: {bw:.0f} GB/s, {peak:.0f} TFLOP/s",
    )
    markers = {"qkv": "o", "o": "s", "gate_up": "^", "down": "v"}
    for method, color, bkey in (
        ("ours", "tab:red", "bytes_ours"),
        ("fp16", "tab:blue", "bytes_fp16"),
        ("tinygemm", "tab:green", "bytes_ours"),
    ):
        for r in report["results"]:
            if f"{method}_us" not in r or bkey not in r:
                continue
            ai = r["flops"] / r[bkey]
            ax.scatter(
                ai,
                r["flops"] / (r[f"{method}_us"] * 1e-6) / 1e12,
                c=color,
                marker=markers.get(r["shape"], "o"),
                s=18,
            )
        ax.scatter([], [], c=color, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved by that method)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Llama-2-7B linears, {report['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    sums = report.get("sum_7b_ms", {})
    mm = sorted(int(m) for m in sums)
    for key, color in (
        ("ours_ms", "tab:red"),
        ("fp16_ms", "tab:blue"),
        ("tinygemm_ms", "tab:green"),
        ("floor_ms", "k"),
    ):
        pts = [(m, sums[str(m)][key]) for m in mm if key in sums[str(m)]]
        if pts:
            ax2.plot(
                *zip(*pts, strict=True),
                marker="o",
                color=color,
                label=key.replace("_ms", ""),
                ls="--" if key == "floor_ms" else "-",
            )
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("M (tokens per GEMM)")
    ax2.set_ylabel("ms (sum of the 32 x 4 linears)")
    ax2.set_title("7B linears per forward pass")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['device']}  copy {report['copy_bw_GBps']:.0f} GB/s  "
        f"fp16 mm {report['fp16_mm_peak_TFLOPs']:.0f} TFLOP/s"
    ]
    lines.append(
        f"{'shape':8s} {'M':>5s} {'ours':>9s} {'floor':>8s} {'%floor':>7s} {'fp16':>9s} "
        f"{'tinygemm':>9s} {'x fp16':>7s}"
    )
    for r in report["results"]:
        lines.append(
            f"{r['shape']:8s} {r['m']:5d} {r['ours_us']:9.1f} {r['floor_us']:8.1f} "
            f"{r['pct_floor']:6.0f}% {r.get('fp16_us', math.nan):9.1f} "
            f"{r.get('tinygemm_us', math.nan):9.1f} {r.get('speedup_vs_fp16', math.nan):7.2f}"
        )
    lines.append("sum over the 7B layers (ms): M: ours / fp16 / tinygemm / floor")
    for m, s in report.get("sum_7b_ms", {}).items():
        lines.append(
            f"  M={m:>5s}: "
            + " / ".join(
                f"{s.get(k, math.nan):.3f}" for k in ("ours_ms", "fp16_ms", "tinygemm_ms", "floor_ms")
            )
        )
    for key, t in report.get("targets", {}).items():
        lines.append(f"  target {key}: {t}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmkiln bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench/kernels"), help="output directory")
    p.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M), help="M values (tokens per GEMM)")
    p.add_argument("--shapes", nargs="+", default=list(LLAMA2_7B_SHAPES), choices=list(LLAMA2_7B_SHAPES))
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--tune", action="store_true", help="time candidate configs first and write a tuned table")
    p.add_argument(
        "--tuned-out",
        type=Path,
        default=None,
        help="where --tune writes (default kernels/tuned/<gpu>.json); entries of shapes and M not timed in "
        "this run are kept",
    )
    p.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        choices=KERNEL_KINDS,
        help="with --tune: time only these kernel kinds against the current table's choice (which is kept "
        "where none beats it)",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        default=0,
        help="with --tune: compile the candidates in this many processes before timing (0: compile as they "
        "are timed)",
    )
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    p.add_argument("--no-baselines", action="store_true", help="skip fp16 / tinygemm")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--eager", action="store_true", help="time eager calls, not CUDA-graph replays (adds launch cost)"
    )
    args = p.parse_args(argv)

    def produce() -> dict[str, Any]:
        tuned_out = args.tuned_out
        if args.tune and tuned_out is None:
            from lmkiln.kernels.dispatch import TUNED_DIR, device_slug

            tuned_out = TUNED_DIR / f"{device_slug(torch.cuda.get_device_name())}.json"
        return run(
            args.out,
            args.m,
            args.shapes,
            args.group_size,
            getattr(torch, args.dtype),
            args.tune,
            tuned_out,
            args.rep_ms,
            not args.no_baselines,
            not args.no_plot,
            not args.eager,
            args.kinds,
            args.compile_workers,
        )

    return report_main(produce, format_table)


if __name__ == "__main__":
    sys.exit(main())
