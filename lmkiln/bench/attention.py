"""Paged decode attention: Triton kernel vs the torch reference vs SDPA on a contiguous cache.

One layer of a 7B shape (32 q heads, 32 KV heads, head_dim 128, fp16 queries) for each batch x context x KV
bits: ``paged_decode`` over a paged cache (random block order, ``--block-size`` tokens a block, every
sequence at the full context), ``paged_attention_ref`` on the same cache (only where its float32 gathers fit
``--ref-max-gib``) and ``F.scaled_dot_product_attention`` over a contiguous fp16 ``[B, H, S, D]`` cache (the
non-paged baseline; same for every bits value). Times are medians of ``triton.testing.do_bench`` over
CUDA-graph replays (the reference syncs with the host, so it runs eagerly); GB/s counts the KV bytes a
decode step must read (codes + fp16 scale/zero pairs + queries + outputs). A few prefill cases time the
varlen kernel (prefill from scratch and a chunk after a cached prefix) in TFLOP/s. Writes
``attention.json`` to ``--out``::

    python -m lmkiln.bench.attention --out results/bench/attention
"""

from __future__ import annotations

import argparse
import functools
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmkiln.bench import report_main
from lmkiln.errors import LmkilnError

log = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 16, 64, 256)
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_BITS = (0, 8, 4)
PREFILL_CASES = ((1, 0, 2048), (4, 3584, 512), (16, 0, 512))  # (sequences, cached prefix, new tokens)
GIB = 1 << 30


def kv_bytes(batch: int, ctx: int, hk: int, d: int, bits: int, elem: int = 2) -> int:
    """Bytes of K and V a decode step reads for ``batch`` sequences of ``ctx`` tokens."""
    per_head = d * elem if not bits else d * bits // 8 + 4
    return 2 * batch * ctx * hk * per_head


class PagedCase:
    """A paged one-layer cache of ``batch`` sequences x ``ctx`` tokens (random blocks), queries, metadata."""

    def __init__(
        self, batch: int, ctx: int, hq: int, hk: int, d: int, bits: int, page: int, dev: str
    ) -> None:
        from lmkiln.engine.kv_cache import KVCache

        g = torch.Generator(device=dev).manual_seed(batch * 7 + ctx + bits)
        nblk = -(-ctx // page)
        self.cache = KVCache(1, batch * nblk, page, hk, d, torch.float16, dev, quant_policy=bits)[0]
        c = self.cache
        for x in (c.k, c.v):
            if bits:
                x.random_(0, 256, generator=g)
            else:
                x.normal_(generator=g)
        for x in (c.k_sz, c.v_sz) if bits else ():
            x[..., 0].uniform_(0.002, 0.02, generator=g)
            x[..., 1].uniform_(-1.0, 0.0, generator=g)
        perm = torch.randperm(batch * nblk, device=dev, generator=g).to(torch.int32)
        self.tables = perm.view(batch, nblk).contiguous()
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.q = torch.randn(batch, hq, d, device=dev, generator=g).half()
        self.out = torch.empty_like(self.q)
        self.bits, self.scale = bits, d**-0.5

    def triton(self, config: Any = None) -> torch.Tensor:
        from lmkiln.kernels.paged_attention import paged_decode

        c = self.cache
        return paged_decode(
            self.q, c.k, c.v, self.tables, self.lens, self.scale, c.k_sz, c.v_sz, self.bits, config, self.out
        )

    def reference(self) -> torch.Tensor:
        from lmkiln.kernels.attention_ref import paged_attention_ref

        c = self.cache
        return paged_attention_ref(
            self.q, c.k, c.v, self.tables, self.qsl, self.lens, self.scale, c.k_sz, c.v_sz, self.bits
        )


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _prefill_case(nseq: int, ctx: int, new: int, page: int, rep_ms: int, dev: str) -> dict[str, Any]:
    from lmkiln.bench.kernels import _median_us
    from lmkiln.kernels.paged_attention import paged_prefill

    hq = hk = 32
    d = 128
    case = PagedCase(nseq, ctx + new, hq, hk, d, 0, page, dev)
    c = case.cache
    lens = torch.full((nseq,), ctx + new, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, (nseq + 1) * new, new, dtype=torch.int32, device=dev)
    q = torch.randn(nseq * new, hq, d, device=dev).half()

    def call() -> torch.Tensor:
        return paged_prefill(q, c.k, c.v, case.tables, qsl, lens, new, d**-0.5)

    us = _median_us(call, rep_ms)
    # causal FLOPs: QK^T and PV over the keys each query sees
    keys = sum(ctx + i + 1 for i in range(new))
    flops = 4 * nseq * hq * d * keys
    return {"seqs": nseq, "cached": ctx, "new": new, "triton_us": us, "TFLOPs": flops / (us * 1e-6) / 1e12}


def run(
    out_dir: Path,
    batches: Sequence[int],
    contexts: Sequence[int],
    bits_list: Sequence[int],
    page: int,
    rep_ms: int,
    ref_max_gib: float,
    graphs: bool = True,
) -> dict[str, Any]:
    """Time every case and write ``attention.json``; returns the report."""
    import torch.nn.functional as F
    import triton

    from lmkiln.artifact import write_json_atomic
    from lmkiln.bench.kernels import _median_us, _timed, copy_bandwidth_gbps
    from lmkiln.kernels.paged_attention import decode_splits

    if not torch.cuda.is_available():
        raise LmkilnError("the attention benchmark needs a CUDA GPU")
    dev = "cuda"
    hq = hk = 32
    d = 128
    props = torch.cuda.get_device_properties(dev)
    bw = copy_bandwidth_gbps(torch.device(dev))
    report: dict[str, Any] = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_bw_GBps": bw,
        "shape": {
            "num_q_heads": hq,
            "num_kv_heads": hk,
            "head_dim": d,
            "dtype": "float16",
            "block_size": page,
        },
        "rep_ms": rep_ms,
        "timing": "cuda-graph replays (reference: eager)" if graphs else "eager calls",
        "decode": [],
        "prefill": [],
    }
    sdpa_us: dict[tuple[int, int], float | None] = {}
    for bits in bits_list:
        for batch in batches:
            for ctx in contexts:
                row: dict[str, Any] = {"bits": bits, "batch": batch, "ctx": ctx}
                nbytes = kv_bytes(batch, ctx, hk, d, bits) + 2 * batch * hq * d * 2
                free, _ = torch.cuda.mem_get_info()
                if kv_bytes(batch, ctx, hk, d, bits) * 1.2 > free:
                    row["skipped"] = "cache does not fit in free GPU memory"
                    report["decode"].append(row)
                    continue
                case = PagedCase(batch, ctx, hq, hk, d, bits, page, dev)
                row["splits"] = decode_splits(batch, hk, case.tables.shape[1] * page, torch.device(dev))
                us = _timed(lambda _, fn=case.triton: fn(), 1, rep_ms, graphs)
                row.update(triton_us=us, bytes=nbytes, triton_GBps=nbytes / (us * 1e-6) / 1e9)
                row["triton_frac_of_copy_bw"] = row["triton_GBps"] / bw
                gathered = 2 * batch * ctx * hk * d * 4 / GIB
                if gathered <= ref_max_gib:
                    ref = case.reference()
                    row["rel_err_vs_ref"] = _rel(case.triton(), ref)
                    row["ref_us"] = _median_us(case.reference, max(20, rep_ms // 3))
                    del ref
                else:
                    row["ref_us"] = None
                key = (batch, ctx)
                if key not in sdpa_us:
                    sdpa_us[key] = None
                    free, _ = torch.cuda.mem_get_info()
                    if kv_bytes(batch, ctx, hk, d, 0) * 1.2 < free:
                        k = torch.randn(batch, hk, ctx, d, device=dev, dtype=torch.float16)
                        v = torch.randn_like(k)
                        q4 = case.q.unsqueeze(2)  # [B, H, 1, D]
                        sdpa_us[key] = _timed(
                            lambda _, q4=q4, k=k, v=v: F.scaled_dot_product_attention(q4, k, v),
                            1,
                            rep_ms,
                            graphs,
                        )
                        del k, v
                row["sdpa_contiguous_fp16_us"] = sdpa_us[key]
                if sdpa_us[key]:
                    fp16_bytes = kv_bytes(batch, ctx, hk, d, 0) + 2 * batch * hq * d * 2
                    row["sdpa_GBps"] = fp16_bytes / (sdpa_us[key] * 1e-6) / 1e9
                    row["speedup_vs_sdpa"] = sdpa_us[key] / us
                log.info("decode %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                report["decode"].append(row)
                del case
                torch.cuda.empty_cache()
    for nseq, ctx, new in PREFILL_CASES:
        row = _prefill_case(nseq, ctx, new, page, rep_ms, dev)
        log.info("prefill %s", row)
        report["prefill"].append(row)
        torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "attention.json", report)
    return report


def _decode_with(_: Any, cfg: Any, case: PagedCase) -> torch.Tensor:
    return case.triton(cfg)


SWEEP_BLOCK_N = (32, 64, 128)
SWEEP_WARPS = (2, 4, 8)
SWEEP_STAGES = (1, 2, 3, 4)


def sweep(
    out_dir: Path,
    batches: Sequence[int],
    contexts: Sequence[int],
    bits_list: Sequence[int],
    page: int,
    rep_ms: int,
) -> dict[str, Any]:
    """Time the decode kernel over launch configs (block_n x num_warps x num_stages) for every case; ``err``
    is each config's relative difference from the default config's output. Writes ``attention_sweep.json``."""
    from lmkiln.artifact import write_json_atomic
    from lmkiln.bench.kernels import _timed
    from lmkiln.kernels.paged_attention import AttentionConfig

    if not torch.cuda.is_available():
        raise LmkilnError("the attention sweep needs a CUDA GPU")
    dev, hq, hk, d = "cuda", 32, 32, 128
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "cases": []}
    for bits in bits_list:
        for batch in batches:
            for ctx in contexts:
                case = PagedCase(batch, ctx, hq, hk, d, bits, page, dev)
                nbytes = kv_bytes(batch, ctx, hk, d, bits) + 2 * batch * hq * d * 2
                want = case.triton().clone()
                rows = []
                for bn in SWEEP_BLOCK_N:
                    for w in SWEEP_WARPS:
                        for st in SWEEP_STAGES:
                            cfg = AttentionConfig(block_n=bn, num_warps=w, num_stages=st)
                            call = functools.partial(_decode_with, cfg=cfg, case=case)
                            try:
                                got = call(None).clone()
                                us = _timed(call, 1, rep_ms, True)
                            except Exception as e:  # a config the compiler refuses (shared memory, registers)
                                rows.append({"block_n": bn, "warps": w, "stages": st, "error": repr(e)[:200]})
                                continue
                            rows.append({"block_n": bn, "warps": w, "stages": st, "us": us,
                                         "GBps": nbytes / (us * 1e-6) / 1e9, "err": _rel(got, want)})
                ok = [r for r in rows if "us" in r]
                best = min(ok, key=lambda r: r["us"]) if ok else None
                log.info("sweep bits %d batch %d ctx %d: best %s", bits, batch, ctx, best)
                report["cases"].append({"bits": bits, "batch": batch, "ctx": ctx, "best": best, "rows": rows})
                del case
                torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "attention_sweep.json", report)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['device']}: copy {report['copy_bw_GBps']:.0f} GB/s; decode, 32/32 heads, d=128 (us, GB/s)",
        f"{'bits':>4} {'B':>4} {'ctx':>5} {'splits':>6} {'triton':>9} {'GB/s':>6} {'sdpa':>9} {'ref':>9} "
        f"{'err':>8}",
    ]
    for r in report["decode"]:
        if "skipped" in r:
            lines.append(f"{r['bits']:>4} {r['batch']:>4} {r['ctx']:>5} skipped: {r['skipped']}")
            continue

        def f(x: float | None) -> str:
            return f"{x:9.1f}" if x else f"{'-':>9}"

        err = r.get("rel_err_vs_ref")
        lines.append(
            f"{r['bits']:>4} {r['batch']:>4} {r['ctx']:>5} {r['splits']:>6} {r['triton_us']:9.1f} "
            f"{r['triton_GBps']:6.0f} {f(r['sdpa_contiguous_fp16_us'])} {f(r['ref_us'])} "
            + (f"{err:8.1e}" if err is not None else f"{'-':>8}")
        )
    for r in report["prefill"]:
        lines.append(
            f"prefill {r['seqs']} x ({r['cached']} cached + {r['new']} new): {r['triton_us']:.1f} us, "
            f"{r['TFLOPs']:.1f} TFLOP/s"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmkiln bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/bench/attention"), help="output directory")
    p.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--ctx", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    p.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_BITS), choices=(0, 4, 8))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench repetition time per measurement")
    p.add_argument("--ref-max-gib", type=float, default=8.0, help="skip the torch reference above this")
    p.add_argument("--eager", action="store_true", help="time eager calls, not CUDA-graph replays")
    p.add_argument("--sweep", action="store_true",
                   help="time the decode kernel over launch configs instead (attention_sweep.json)")
    args = p.parse_args(argv)
    if args.sweep:
        return report_main(
            lambda: sweep(args.out, args.batch, args.ctx, args.bits, args.block_size, args.rep_ms), None
        )
    return report_main(
        lambda: run(
            args.out,
            args.batch,
            args.ctx,
            args.bits,
            args.block_size,
            args.rep_ms,
            args.ref_max_gib,
            not args.eager,
        ),
        format_table,
    )


if __name__ == "__main__":
    sys.exit(main())
