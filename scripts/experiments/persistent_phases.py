"""Experiment (session 11): the persistent batch-1 layer kernel (``kernels/persistent.py``) against the
unfused decode kernels, one 7B layer at a time, on a GPU.

For each grid variant (CTAs per SM, warps, L2 prefetch, chunks per iteration) it times, as CUDA graphs of
``--layers`` consecutive layers (distinct weights, so nothing stays in L2), ms per layer:

* each phase alone (``o``, ``gate_up``, ``down``, ``qkv``: one launch per layer without barriers);
* the whole persistent launch (all four phases, grid barriers in between);

and once the unfused chain the engine runs today: ``fma`` GEMVs (atomic split-K for o / down / qkv, the SiLU
epilogue for gate/up) and the two ``add_rmsnorm`` kernels, with PDL as the engine launches them, each GEMV
alone too. Results to ``persistent_phases.json``.

``python scripts/experiments/persistent_phases.py --out DIR [--variants 4,2,1,2 8,2,1,2 ...]``

Measured on an H100 (session 11), µs per layer; unfused ``fma`` chain (with its two add_rmsnorm kernels)
58.1-58.2, its GEMVs alone o 7.5, gate_up 23.2, down 14.0, qkv 13.5.

v1 (commit 82bd16b: RMSNorm recomputed where each GEMV reads its input, L2 prefetch of the next item;
variant = CTAs/SM, warps, prefetch, chunks an iteration): the barriers cost little, the prefetch nothing:

| variant | o | gate_up | down | qkv | whole launch |
|---|---|---|---|---|---|
| 4,2,1,2 | 9.8 | 58.3 | 22.1 | 40.5 | 127.3 |
| 8,2,1,2 | 8.8 | 37.6 | 15.8 | 31.8 | 91.9 |
| 8,2,0,2 | 8.1 | 34.0 | 15.9 | 30.0 | 85.8 |

v2 (this script's kernel: RMSNorm phases of their own, the next GEMV phase's first weight tiles loaded into
registers before each barrier; variant = CTAs/SM, warps, prefetch, preload):

| variant | o | norm | gate_up | down | norm | qkv | whole launch |
|---|---|---|---|---|---|---|---|
| 4,4,0,1 | 8.5 | 3.6 | 29.7 | 16.8 | 3.6 | 21.1 | 73.2 |
| 4,4,0,0 | 8.7 | 4.0 | 30.1 | 16.3 | 3.7 | 18.0 | 90.7 |
| 6,4,0,0 | 9.5 | 4.0 | 26.7 | 14.5 | 3.7 | 16.3 | 73.0 |
| 8,2,0,0 | 8.2 | 6.2 | 26.4 | 13.8 | 5.9 | 15.7 | 70.8 |
| 2,8,0,1 | 10.3 | 3.5 | 41.5 | 19.3 | 3.2 | 23.0 | 89.5 |

The preload hides ~17 µs of barriers and pipeline fill a layer (90.7 -> 73.2 at 4,4), but every variant stays
above the unfused chain: the persistent GEMV phases keep fewer bytes in flight than the tuned ``fma`` grids
and the two norm phases cost ~7 µs, where the PDL chain hides its norms entirely. Not kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

H, I, Q, G = 4096, 11008, 12288, 128


def _weights(k: int, n: int, seed: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    from lmkiln.quant.pack import pack_codes

    gen = torch.Generator(device=dev).manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, device=dev, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // G, n), generator=gen, device=dev, dtype=torch.uint8)
    scales = (torch.rand((k // G, n), generator=gen, device=dev) * 0.01 + 0.002).half()
    p = pack_codes(codes, zeros, scales)
    return p["qweight"], p["sz"], p["zeros"]


def _graph_ms(fn, rep_ms: int = 200) -> float:
    from lmkiln.bench.linear_chain import _graph_ms as graph_ms

    return graph_ms(fn, rep_ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["4,4,0,1", "4,4,0,0", "6,4,0,0", "6,2,0,1", "8,2,0,0"])
    a = ap.parse_args()
    from lmkiln.kernels import dispatch, fused, w4a16
    from lmkiln.kernels.persistent import LayerKernel, LayerShape

    from lmkiln.quant.pack import gate_up_interleave

    dev = torch.device("cuda")
    n = a.layers
    layers = []
    for li in range(n):
        gu = gate_up_interleave(*_weights(H, 2 * I, 10 * li + 2, dev), None)[:3]
        w = dict(o=_weights(H, H, 10 * li + 1, dev), gu=gu, dn=_weights(I, H, 10 * li + 3, dev))
        layers.append(dict(w, qkv=_weights(H, Q, 10 * li + 4, dev)))
    f16, f32 = torch.float16, torch.float32
    attn = (torch.randn(H, device=dev) * 0.5).half()
    res = (torch.randn(H, device=dev) * 2).half()
    post_w = (torch.rand(H, device=dev) + 0.5).half()
    in_w = (torch.rand(H, device=dev) + 0.5).half()
    bufs = dict(o_acc=torch.zeros(n, H, dtype=f32, device=dev))
    bufs["dn_acc"] = torch.zeros(n, H, dtype=f32, device=dev)
    bufs["bars"] = torch.zeros(n, 8, dtype=torch.int32, device=dev)
    bufs.update(act=torch.zeros(I, dtype=f16, device=dev),
                hmid=torch.zeros(H, dtype=f16, device=dev), res_out=torch.zeros(H, dtype=f16, device=dev),
                out=torch.zeros(H, dtype=f16, device=dev), q_acc=torch.zeros(Q, dtype=f32, device=dev))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "layers": n, "variants": {}}

    def launch(kern, first: int, last: int, li: int) -> None:
        w = layers[li]
        kern.launch(first=first, last=last, final=False, head=False, attn=attn, o=w["o"], res=res, gu=w["gu"],
                    post_w=post_w, act=bufs["act"], hmid=bufs["hmid"], dn=w["dn"], hin=bufs["hmid"],
                    qkv=w["qkv"], in_w=in_w, q_acc=bufs["q_acc"], res_out=bufs["res_out"], out=bufs["out"],
                    o_acc=bufs["o_acc"][li], dn_acc=bufs["dn_acc"][li], bars=bufs["bars"][li], eps=1e-5)

    for v in a.variants:
        ctas, warps, pf, pre = (int(x) for x in v.split(","))
        kern = LayerKernel(LayerShape(H, I, Q, G), dev, ctas_per_sm=ctas, num_warps=warps, prefetch=bool(pf),
                           preload=bool(pre))
        row: dict[str, Any] = {"plan": kern.describe()}
        for ph, name in ((0, "o"), (1, "norm1"), (2, "gate_up"), (3, "down"), (4, "norm2"), (5, "qkv")):
            row[name] = _graph_ms(lambda ph=ph, kern=kern: [launch(kern, ph, ph, li) for li in range(n)]) / n

        def full(kern=kern) -> None:
            bufs["bars"].zero_()
            for li in range(n):
                launch(kern, 0, 5, li)

        row["layer"] = _graph_ms(full) / n
        report["variants"][v] = row
        print(v, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)

    # the unfused chain (atomic o / down / qkv, SiLU gate/up, two add_rmsnorm), as the engine runs it
    accs = {name: torch.zeros(1, nn, dtype=f32, device=dev) for name, nn in (("o", H), ("dn", H), ("qkv", Q))}
    x16 = attn.view(1, H)
    resid = res.view(1, H)

    def gemv(name: str, x: torch.Tensor, w: tuple, silu: bool = False) -> torch.Tensor:
        k = x.shape[-1]
        n_out = {"o": H, "dn": H, "qkv": Q, "gu": 2 * I}[name]
        cfg = dispatch.choose_config(1, n_out, k, G, f16, dev)
        if silu:
            return w4a16.fma(x, *w, cfg, scratch=scratch, silu=True)
        return w4a16.fma(x, *w, cfg, out=accs[name], reduce="atomic")

    scratch = torch.zeros(1 << 14, dtype=torch.int32, device=dev)
    base: dict[str, Any] = {}
    for name, key, k in (("o", "o", H), ("dn", "dn", I), ("qkv", "qkv", H), ("gu", "gu", H)):
        xin = x16 if k == H else torch.randn(1, I, device=dev).half()
        base[name] = _graph_ms(lambda name=name, key=key, xin=xin: [
            gemv(name, xin, layers[li][key], silu=name == "gu") for li in range(n)]) / n

    def chain() -> None:
        for li in range(n):
            w = layers[li]
            o = gemv("o", x16, w["o"])
            xn, h = fused.add_rmsnorm(o, resid, post_w, 1e-5, consume=True)
            act = gemv("gu", xn, w["gu"], silu=True)
            d = gemv("dn", act, w["dn"])
            xq, _ = fused.add_rmsnorm(d, h, in_w, 1e-5, consume=True)
            gemv("qkv", xq, w["qkv"])
            accs["qkv"].zero_()

    base["chain_with_qkv_zero"] = _graph_ms(chain) / n
    report["unfused"] = base
    print("unfused", {k: round(x, 4) for k, x in base.items()}, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "persistent_phases.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
