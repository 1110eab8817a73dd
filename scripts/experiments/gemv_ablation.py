"""Where the batch-1 ``fma`` GEMV's time goes (session 13): the shipped kernel against copies of it with
parts of its arithmetic removed, other schedules and splits, and a plain read of the same int4 codes.

Variants (``--variants``; an edited one is a copy of ``kernels/w4a16.py`` imported under its own name):

* ``ship``: the shipped kernel at the device table's M = 1 configs;
* ``nomul``: the dequantization without its four ``mul.f16x2`` by the scale (9 instructions a word, not 13);
* ``nodeq``: no dequantization (the word itself stands for the four half2);
* ``noflop``: no dequantization, integer adds instead of the four ``fma.f16x2`` (loads, loop and reduction
  left);
* ``st2`` / ``st2c2`` / ``st3``: Triton's own pipelining (``num_stages`` 2 or 3: ``cp.async`` through shared
  memory), one or two chunks an iteration;
* ``l1pf`` / ``l2pf`` / ``l1pfc1``: ``prefetch.global.L1`` / ``.L2`` of the next iteration's words at the top
  of each iteration;
* ``pass1`` / ``pass2`` (``c1``: one chunk an iteration): split-K such that every program runs one or two
  iterations (many programs, several waves);
* ``s:NAME=SPLIT,...``: the table's configs with other splits; ``ga:...``: the same with gate/up added
  atomically into float32 (no SiLU); ``gas:...``: gate/up atomic, then a SiLU kernel of its own that
  consumes (reads and zeroes) the accumulator;
* ``f2`` / ``f4``: half2 partials of 2 or 4 words before the float32 flush (fewer conversions);
* ``c4``: four chunks an iteration; ``r64`` / ``r96c4``: a register cap for ptxas (``maxnreg`` 64; 96 with
  four chunks, so that all 16 loads of an iteration are in flight: 96 registers, no spills);
* ``VARIANT:NAME=SPLIT,...``: that variant with other splits for the named shapes;
* ``smem0:...`` / ``smem:...``: the Gluon kernel of session 12 (``kernels/fma_smem.py``, in commit
  a2514d4 and removed after it): every program's weight slice copied into shared memory with
  ``cp.async`` before its PDL wait; ``smem0`` computes after the whole slice has landed, ``smem`` chunk by
  chunk as each copy group lands (activations read once into shared memory); gate/up added atomically;
* ``read``: a plain kernel that reads the codes with 16-byte loads (4,096 words, 4 warps a program) and
  stores one sum a program: what this access size reaches, with PDL as the GEMVs use it; ``readc``: 2,048
  words and 2 warps a program (a GEMV program's bytes); ``readp``: a GEMV program's tile (32 word-rows x
  64 columns of the packed panel layout), one tile a program.

Timing as the decode step runs them: 32 layers of distinct weights (3.4 GB, far beyond L2) in one CUDA graph
with PDL; qkv / o / down add atomically into float32 outputs, gate/up with its SiLU epilogue and the ordered
split-K tail. Per shape: the same shape 32 times in a graph, us a call. The outputs of the edited variants are
garbage (timing only); the others are checked against the shipped kernel and a float64 ``x @ W``.

    python scripts/experiments/gemv_ablation.py --out OUT_DIR --variants ship noflop read

Results, NVIDIA H100 80GB HBM3, torch 2.11, Triton 3.6 (chain ms; qkv / o / gate_up / down us a call; floor
at copy bandwidth 8.9 / 3.0 / 16.0 / 8.0, the codes alone 8.4 / 2.8 / 15.0 / 7.5):

* ship 1.635-1.67 (11.9-12.2 / 6.2 / 21.7 / 12.6); read **1.20** (9.7 / 4.4 / 15.9 / 8.8); noflop 1.39
  (10.5 / 5.2 / 19.4 / 9.9); nomul 1.84; nodeq 1.82. Removing instructions from the dequantization made the
  kernel slower; only removing the math entirely (noflop) gains, and even that stays 0.19 ms above a plain
  read: the loop's structure, not the instruction count, is the limit.
* st2 1.88, st2c2 1.98, st3 1.96; l1pf 2.04, l2pf 2.04, l1pfc1 2.06; pass1 1.72, pass2 1.72, pass1c1 1.97,
  pass2c1 1.99. Also measured with kernel changes since reverted: the next chunk's words loaded into
  registers before this chunk's math (ptxas sinks the loads to the end of the loop body again) 2.06; the
  activation pairs read 16 bytes at a time (4 loads a chunk, not 16; 79 registers, not 73) 1.735 against
  1.710, decode step 2.244 against 2.146 ms.
* read 1.201, readc 1.205, readp 1.236 (9.9 / 4.5 / 16.4 / 9.0): the packed layout's access pattern costs
  3 % against contiguous reads; noflop 1.384 in the same run. f2 1.76, f4 1.66 (ship 1.60-1.63).
* Four chunks an iteration (o in 8 splits): c4 1.78, r96c4 1.83 (1.79 with two iterations a program for
  every shape); r64 1.70 (ship 1.60 / 1.63 in that run). Without a cap ptxas gives the shipped kernel 72
  registers (about 3 of its 8 weight loads issued ahead, the rest a sub-tile before use), nomul 56 and nodeq
  40 (loads one at a time). A kernel change (commit 32c43a3, reverted) that issues all of an iteration's
  loads before a never-taken branch, so that ptxas cannot spread them: 2.146 (128 registers), 1.946 with
  splits for 8 programs an SM: more loads in flight is not faster either.
* Gluon (gate/up atomic, no SiLU; the shipped kernel so 1.595): smem0 1.78, smem 1.787 (pipelining inside
  a program changes nothing), smem with splits qkv 16 / o 32 / gate_up 16 / down 43 1.651 (o 6.13 us, the
  only shape it wins), qkv 4 / o 8 / gate_up 4 / down 11 2.05; the chunk-by-chunk version reading its
  activations from global memory a sub-tile at a time 2.11.
* gas (gate/up atomic + its SiLU kernel), gate/up us with the SiLU kernel: split 4 22.0, 6 21.3, 16 21.4
  (atomic alone 19.9 at 6; the shipped ordered tail with the SiLU epilogue 21.7); chain 1.618 against
  1.599 / 1.631 for ship in that run.
* Splits, us a call: down 22 **11.43**, 24 11.42, 43 11.93, 20 12.99, 29 13.13 (16: 12.61); qkv 12 15.3, 16
  12.7 (8: 12.2); gate_up 5 22.6, 6 21.7 (4: 21.7); o 11 7.3 (16: 6.2); gate_up atomic without SiLU 4 20.6, 6
  19.9, 8 20.7, 11 22.6, 16 19.9. Down in 22 splits is now the H100 table's choice (decode step 2.156 ->
  2.119 ms, three alternating runs each).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import triton
import triton.language as tl
from lmkiln.kernels import dispatch, pdl

from lmkiln.bench.kernels import LLAMA2_7B_SHAPES, copy_bandwidth_gbps, make_weights, our_bytes
from lmkiln.bench.linear_chain import ORDER, _graph_ms

MULS = """        mul.rn.f16x2 $0, a, $9;
        mul.rn.f16x2 $1, b, $10;
        mul.rn.f16x2 $2, c, $11;
        mul.rn.f16x2 $3, d, $12;
"""
NO_MULS = """        mov.b32 $0, a;
        mov.b32 $1, b;
        mov.b32 $2, c;
        mov.b32 $3, d;
"""
DEQ_START = "        mov.b32 k, 0x2C002C00;\n"
NO_DEQ = """        mov.b32 $0, $4;
        mov.b32 $1, $4;
        mov.b32 $2, $4;
        mov.b32 $3, $4;
"""
FMAS = """        fma.rn.f16x2 a, $2, $3, $1;
        fma.rn.f16x2 a, $4, $5, a;
        fma.rn.f16x2 a, $6, $7, a;
        fma.rn.f16x2 a, $8, $9, a;
"""
ADDS = """        add.u32 a, $3, $1;
        add.u32 a, $5, a;
        add.u32 a, $7, a;
        add.u32 a, $9, a;
"""


LAUNCH = "        REDUCE=mode,\n        num_warps=cfg.num_warps,\n"
LOOP = "        for c0 in tl.range(c_lo, c_hi, CPI, num_stages=NUM_STAGES):\n"
PREFETCH = """            for u in tl.static_range(U * CPI):  # the next iteration's words, no registers
                _pf(w_ptrs + tl.minimum((c0 + CPI) * 16 + u * SUB, c_hi * 16 - 1) * PACK_N_)
"""
PF_FN = """

@triton.jit
def _pf(ptrs):
    tl.inline_asm_elementwise("prefetch.global.LEVEL [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
"""
# name -> (source edit, config overrides)
VARIANTS = {
    "ship": ("", {}),
    "nomul": ("nomul", {}),
    "nodeq": ("nodeq", {}),
    "noflop": ("noflop", {}),
    "st2": ("", {"num_stages": 2, "chunks": 1}),
    "st2c2": ("", {"num_stages": 2}),
    "st3": ("", {"num_stages": 3, "chunks": 1}),
    "l1pf": ("l1pf", {}),
    "l2pf": ("l2pf", {}),
    "l1pfc1": ("l1pf", {"chunks": 1}),
    "c4": ("", {"chunks": 4}),
    "r64": ("r64", {}),
    "r64c4": ("r64", {"chunks": 4}),
    "r96c4": ("r96", {"chunks": 4}),
    "f2": ("", {"flush": 2}),
    "f4": ("", {"flush": 4}),
    # split-K so that every program runs ``passes`` iterations of its loop (many programs, several waves)
    "pass1": ("", {"passes": 1}),
    "pass2": ("", {"passes": 2}),
    "pass1c1": ("", {"passes": 1, "chunks": 1}),
    "pass2c1": ("", {"passes": 2, "chunks": 1}),
}


def _edit(src: str, name: str) -> str:
    def sub(text: str, old: str, new: str) -> str:
        if text.count(old) != 1:
            raise RuntimeError(f"variant {name}: the kernel changed ({old.strip()[:40]!r} not found once)")
        return text.replace(old, new)

    if name in ("nodeq", "noflop"):
        start = src.index(DEQ_START)
        end = src.index(MULS, start) + len(MULS)
        src = src[:start] + NO_DEQ + src[end:]
    if name == "nomul":
        src = sub(src, MULS, NO_MULS)
    if name == "noflop":
        src = sub(src, FMAS, ADDS)
    if name in ("r64", "r96"):  # a register cap for ptxas (maxnreg)
        src = sub(src, LAUNCH, LAUNCH + f"        maxnreg={name[1:]},\n")
    if name in ("l1pf", "l2pf"):
        src = sub(src, LOOP, LOOP + PREFETCH)
        src += PF_FN.replace("LEVEL", name[:2].upper())
    return src


def _load(name: str, tmp: Path) -> ModuleType:
    from lmkiln.kernels import w4a16

    path = tmp / f"w4a16_{name or 'ship'}.py"
    path.write_text(_edit(Path(w4a16.__file__).read_text(), name))
    spec = importlib.util.spec_from_file_location(f"lmkiln_w4a16_{name or 'ship'}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # Triton reads the kernels' source through the module
    spec.loader.exec_module(mod)
    return mod


def _override(mod: ModuleType, cfg: object, over: dict, n_chunks: int) -> object:
    """``cfg`` with the variant's fields; ``passes``: the split-K that gives every program that many
    iterations."""
    d = {**cfg.to_dict(), **{k: v for k, v in over.items() if k != "passes"}}
    if "passes" in over:
        d["split_k"] = -(-n_chunks // (d["chunks"] * over["passes"]))
    return mod.KernelConfig.from_dict(d)


@triton.jit
def _read_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    pdl.wait(PDL)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n_words, other=0)
    pdl.trigger(PDL)
    tl.store(out_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _read_panel_kernel(w_ptr, out_ptr, KW, ROWS: tl.constexpr, BN: tl.constexpr, PACK: tl.constexpr,
                       PDL: tl.constexpr):
    """A GEMV program's reads without its math: a [ROWS word-rows, BN columns] tile of the packed layout
    (panels of PACK columns x KW word-rows), program (n tile, row block)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    col = (offs_n // PACK) * (KW * PACK) + offs_n % PACK
    col = tl.max_contiguous(tl.multiple_of(col, PACK), PACK)
    rows = pid_k * ROWS + tl.arange(0, ROWS)
    pdl.wait(PDL)
    w = tl.load(w_ptr + col[None, :] + (rows * PACK)[:, None])
    pdl.trigger(PDL)
    tl.store(out_ptr + pid_k * 4096 + pid_n, tl.sum(tl.sum(w, axis=1), axis=0))


@triton.jit
def _silu_consume_kernel(acc_ptr, o_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``silu(g) * u`` from a float32 gate/up accumulator in 32-column blocks, which it zeroes (rounded as
    the fused epilogue rounds)."""
    pdl.enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    col = (offs // 32) * 64 + offs % 32
    g = tl.load(acc_ptr + col, mask=m, other=0.0).to(tl.float16).to(tl.float32)
    u = tl.load(acc_ptr + col + 32, mask=m, other=0.0).to(tl.float16).to(tl.float32)
    tl.store(acc_ptr + col, tl.zeros_like(g), mask=m)
    tl.store(acc_ptr + col + 32, tl.zeros_like(u), mask=m)
    sg = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(tl.float16).to(tl.float32)
    tl.store(o_ptr + offs, (sg * u).to(tl.float16), mask=m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--variants", nargs="+", default=["ship", "nomul", "nodeq", "noflop", "read"],
                    help=f"{sorted(VARIANTS)}, read, readc, readp, or s: / ga: / smem: / smem0: with "
                    "NAME=SPLIT,...")
    args = ap.parse_args()
    dev = torch.device("cuda")
    on = pdl.enabled(dev)
    bw = copy_bandwidth_gbps(dev)
    weights = {
        name: [make_weights(*LLAMA2_7B_SHAPES[name], 128, dev, seed=1000 * li + j)
               for li in range(args.layers)]
        for j, name in enumerate(ORDER)
    }
    xs = {n: torch.randn(1, LLAMA2_7B_SHAPES[n][0], device=dev, dtype=torch.float16) for n in ORDER}
    accs = {n: torch.zeros(1, LLAMA2_7B_SHAPES[n][1], device=dev, dtype=torch.float32) for n in ORDER}
    os.environ["LMKILN_CUDA_GEMV"] = "0"  # ship: the Triton fma configs (the table's fallbacks)
    cfgs = {name: dispatch.choose_config(1, *reversed(LLAMA2_7B_SHAPES[name]), 128, torch.float16, dev)
            for name in ORDER}
    del os.environ["LMKILN_CUDA_GEMV"]
    floor_us = {name: our_bytes(1, *LLAMA2_7B_SHAPES[name], 128) / bw / 1e3 for name in ORDER}
    code_us = {name: LLAMA2_7B_SHAPES[name][0] * LLAMA2_7B_SHAPES[name][1] / 2 / bw / 1e3 for name in ORDER}
    report: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbps": bw, "pdl": on,
                    "configs": {n: c.to_dict() for n, c in cfgs.items()}, "floor_us": floor_us,
                    "codes_floor_us": code_us, "variants": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gemv_ablation_"))
    mods: dict[str, ModuleType] = {}
    last: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}

    def run_variant(variant: str) -> None:
        if variant.startswith("read"):
            sums = torch.zeros(1 << 20, device=dev, dtype=torch.int32)
            # read: 4,096 words a program, 4 warps; readc: 2,048 words, 2 warps (a GEMV program's bytes);
            # readp: the GEMV program's tile, 32 word-rows x 64 columns of the panel layout, 2 warps
            block, warps = {"read": (4096, 4), "readc": (2048, 2)}.get(variant, (0, 2))

            def call(name: str, w, _s=sums, _b=block, _nw=warps) -> None:
                n_words = w.qweight.numel()
                if _b:
                    _read_kernel[(triton.cdiv(n_words, _b),)](w.qweight, _s, n_words, BLOCK=_b, PDL=on,
                                                              num_warps=_nw, **pdl.launch_opts(on))
                else:
                    k, n = LLAMA2_7B_SHAPES[name]
                    grid = (n // 64, k // 8 // 32)
                    _read_panel_kernel[grid](w.qweight, _s, k // 8, ROWS=32, BN=64, PACK=32, PDL=on,
                                             num_warps=_nw, **pdl.launch_opts(on))
        else:
            base = variant.split(":")[0]  # VARIANT:NAME=SPLIT,... takes that variant with those splits
            edit, over = VARIANTS.get(base, ("", {}))
            mod = mods.get(edit) or mods.setdefault(edit, _load(edit, tmp))
            scratch = mod.make_scratch(dev)
            vc = {n: _override(mod, c, over, LLAMA2_7B_SHAPES[n][0] // 128) for n, c in cfgs.items()}
            gu_atomic = base in ("ga", "gas")
            cuda = base in ("cu", "cuga")  # the CUDA C++ kernel (kernels/cuda/w4a16_gemv.cu)
            cu_opts, cu_split = None, {"qkv": 8, "o": 16, "gate_up": 4, "down": 22}
            if cuda:
                from lmkiln.kernels import w4a16_cuda

                keys = {"u": "unroll", "f": "flush", "pre": "preload", "pipe": "pipe", "w": "warps",
                        "tc": "tc", "ks": "ksplit"}
                kw: dict = {}
                per_kw: dict = {n: {} for n in ORDER}  # NAME.KEY=VAL: that shape alone (o.w=1, gate_up.ks=4)
                for item in filter(None, variant.split(":", 1)[1].split(",") if ":" in variant else []):
                    key, val = item.split("=", 1)
                    target = kw
                    if "." in key:
                        shape, key = key.split(".", 1)
                        target = per_kw[shape]
                    if key == "D":  # a -D macro of the CUDA source: D=LMKILN_CHAINS=2, D=LMKILN_NOMATH
                        target["defines"] = (*target.get("defines", ()), val)
                    elif key in keys:
                        target[keys[key]] = bool(int(val)) if key in ("pre", "pipe", "tc") else int(val)
                    else:
                        cu_split[key] = int(val)
                cu_opts = {n: w4a16_cuda.CudaGemvOptions(**{**kw, **per_kw[n]}) for n in ORDER}
                gu_atomic = base == "cuga"
            silu_kernel = base == "gas"  # gate/up atomic, then a SiLU kernel that consumes its accumulator
            h = torch.empty(1, LLAMA2_7B_SHAPES["gate_up"][1] // 2, device=dev, dtype=torch.float16)
            if ":" in variant and not cuda:  # NAME=SPLIT,... after s: (ship), ga:, smem:, smem0: or a variant
                for item in filter(None, variant.split(":", 1)[1].split(",")):
                    name, split = item.split("=")
                    vc[name] = mod.KernelConfig.from_dict({**vc[name].to_dict(), "split_k": int(split)})

            smem = variant.split(":")[0] in ("smem", "smem0")
            if smem:
                try:
                    from lmkiln.kernels.fma_smem import fma_smem
                except ImportError as e:
                    raise RuntimeError(
                        "the smem variants need kernels/fma_smem.py: "
                        "git show a2514d4:kernels/fma_smem.py > kernels/fma_smem.py"
                    ) from e
            gu_atomic = gu_atomic or smem

            def call(name: str, w, _m=mod, _s=scratch, _c=vc, _ga=gu_atomic) -> None:
                if cuda:
                    if name == "gate_up" and not _ga:
                        last[name] = w4a16_cuda.gemv(xs[name], w.qweight, w.sz, w.zeros, cu_split[name],
                                                     reduce="ordered", silu=True, scratch=_s,
                                                     options=cu_opts[name])
                    else:
                        w4a16_cuda.gemv(xs[name], w.qweight, w.sz, w.zeros, cu_split[name], out=accs[name],
                                        options=cu_opts[name])
                elif smem:  # the Gluon kernel, copies in flight (smem: chunk by chunk; smem0: whole slice)
                    c = _c[name]
                    fma_smem(xs[name], w.qweight, w.sz, w.zeros, accs[name], c.block_n, c.num_warps,
                             c.split_k, pipe=variant.split(":")[0] == "smem")
                elif name == "gate_up" and not _ga:
                    last[name] = _m.fma(xs[name], w.qweight, w.sz, w.zeros, _c[name], scratch=_s, silu=True)
                else:
                    _m.fma(xs[name], w.qweight, w.sz, w.zeros, _c[name], out=accs[name], reduce="atomic")
                    if name == "gate_up" and silu_kernel:
                        n_out = h.shape[1]
                        _silu_consume_kernel[(triton.cdiv(n_out, 1024),)](accs[name], h, n_out, BLOCK=1024,
                                                                          PDL=on, num_warps=4,
                                                                          **pdl.launch_opts(on))
                        last["gate_up_silu"] = h

        same_math = VARIANTS.get(variant.split(":")[0], ("",))[0] in ("", "r64", "r96")  # (gas, ga, s too)
        if same_math and not variant.startswith("read"):  # check against the shipped kernel and float64
            errs = {}
            for name in ORDER:
                accs[name].zero_()
                call(name, weights[name][0])
                gas = name == "gate_up" and variant.startswith("gas:")
                silu = name == "gate_up" and (gas or not variant.startswith(("ga:", "smem", "cuga")))
                got = (last["gate_up_silu"] if gas else last[name] if silu else accs[name]).float().clone()
                if variant == "ship" or name not in ref:
                    ref[name] = got
                if got.shape == ref[name].shape:
                    errs[name] = float((got - ref[name]).abs().max() / ref[name].abs().max())
                if not silu:  # against float64 x @ W
                    exact = (xs[name].double() @ weights[name][0].dequant(torch.float64)).float()
                    errs[f"{name}_vs_fp64"] = float((got - exact).abs().max() / exact.abs().max())
            print(variant, "max |diff| / max |ship| (and vs fp64)", errs, flush=True)
            report.setdefault("errors", {})[variant] = errs

        def chain(_call=call) -> None:
            for li in range(args.layers):
                for name in ORDER:
                    _call(name, weights[name][li])

        row: dict = {"chain_ms": _graph_ms(chain, args.rep_ms)}
        for name in ORDER:
            def one(_call=call, _name=name) -> None:
                for w in weights[_name]:
                    _call(_name, w)

            row[f"{name}_us"] = _graph_ms(one, args.rep_ms) / args.layers * 1e3
        print(variant, {k: round(v, 3) for k, v in row.items()}, flush=True)
        if variant.startswith("cu"):
            row["split_k"] = dict(cu_split)
        elif not variant.startswith("read"):
            row["split_k"] = {n: c.split_k for n, c in vc.items()}
        report["variants"][variant] = row
    for variant in args.variants:
        try:
            run_variant(variant)
        except Exception as e:  # a variant that fails to compile or run: recorded, the others go on
            report["variants"][variant] = {"error": repr(e)[:2000]}
            print(variant, "FAILED", repr(e)[:2000], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv_ablation.json").write_text(json.dumps(report, indent=1))
    print("floor_us", {k: round(v, 2) for k, v in floor_us.items()}, "codes", {k: round(v, 2) for k, v in
                                                                              code_us.items()})


if __name__ == "__main__":
    main()
