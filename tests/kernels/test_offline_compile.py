"""The decode step's kernels compiled for an H100 (sm_90) on any machine.

The CPU interpreter accepts code that the GPU compiler refuses (a jit function reading a plain global,
reassigning a constexpr, a branch the compiler cannot type), and it never runs the GPU-only paths (inline
PTX, programmatic dependent launch). So CI compiles, ahead of time and all with PDL on: the write kernel's
int8 and int4 variants (with the fused rotary), the int4 decode kernel (with attention sinks and the
in-kernel split merge), the int8 decode kernel of large batches, the fp16-cache decode kernel that writes the
step's K/V itself from a float32 accumulator, the fp16 ``fma`` GEMV with its SiLU epilogue and L2 prefetch,
the norm kernel consuming a float32 accumulator, the swapped-operand tensor-core GEMM (whose weights must
reach ``wgmma`` from registers), and the rotary kernel; in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces the jit functions at import). The quantized decode kernels
and the GEMM must also compile without register spills (``ptxas -v``): a spilling int8 decode kernel made
the batch-256 steps of a throughput run a third slower (session 9). Skipped where Triton has no CUDA
backend or ptxas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP", e); sys.exit(0)
from lmkiln.kernels.fused import _rmsnorm_kernel, _rotary_kernel
from lmkiln.kernels.kv_cache import _write_kv_kernel
from lmkiln.kernels.paged_attention import _paged_attn_kernel
from lmkiln.kernels.w4a16 import _fma_kernel, _mma_t_kernel

kind = sys.argv[1]
options = {"num_warps": 2}
div16 = []  # integer arguments a real launch passes as multiples of 16 (Triton specialises on that)
if kind == "fma":  # M=1 fp16 gate/up with the SiLU epilogue, split-K 4, PDL with an L2 prefetch
    fn, name = _fma_kernel, "_fma_kernel"
    ptrs = {"x_ptr": "*fp16", "xp_ptr": "*i32", "qw_ptr": "*i32", "sz_ptr": "*fp16", "szp_ptr": "*i32",
            "zp_ptr": "*u8", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    ints = ["M", "N", "KW", "n_chunks", "stride_xm", "stride_ym", "SPLIT_K"]
    consts = {"GROUP": 128, "BLOCK_M": 1, "BLOCK_N": 64, "SUB": 4, "CPI": 2, "FLUSH": 1, "NUM_STAGES": 2,
              "PACK_N_": 32, "F16ASM": True, "ACT": 1, "SPLIT_P2": 4, "PDL": True, "PF_ROWS": 16,
              "REDUCE": 0}
    sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
    options["enable_fp_fusion"] = False
elif kind in ("mma_t16", "mma_t128"):
    # swapped-operand tensor-core GEMM: 16 tokens x 128 columns, one warpgroup, one dot per group (decode
    # batches <= 16), and 128 x 256 over two warpgroups (the batch-256 decode / prefill tile)
    fn, name = _mma_t_kernel, "_mma_t_kernel"
    ptrs = {"a_ptr": "*fp16", "qw_ptr": "*i32", "sz_ptr": "*fp16", "c_ptr": "*fp16", "ws_ptr": "*fp32",
            "cnt_ptr": "*i32"}
    ints = ["M", "N", "KW", "n_chunks", "stride_am", "stride_cm", "SPLIT_K"]
    big = kind == "mma_t128"
    consts = {"GROUP": 128, "BLOCK_M": 128 if big else 16, "BLOCK_N": 256 if big else 128, "JOIN": True,
              "PACK_N_": 32, "NUM_STAGES": 3, "DOT_F32": False, "USE_ASM": True, "PDL": True}
    sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
    options["num_warps"] = 8 if big else 4
    div16 = ["N", "KW", "stride_am", "stride_cm"]  # every Llama shape: N, K / 8 and the row strides
elif kind == "norm":  # add + RMSNorm, hidden 4096, consuming a float32 split-K accumulator
    fn, name = _rmsnorm_kernel, "_rmsnorm_kernel"
    ptrs = {"x_ptr": "*fp32", **{k: "*fp16" for k in ("r_ptr", "w_ptr", "y_ptr", "ro_ptr")}}
    ints = {k: "i32" for k in ("stride_x", "stride_r", "stride_y", "stride_ro", "N")}
    consts = {"HAS_RES": True, "BLOCK_N": 4096, "INTERP": False, "PDL": True, "CONSUME": True}
    sig = {**ptrs, **ints, "inv_n": "fp32", "eps": "fp32", **{k: "constexpr" for k in consts}}
elif kind == "rotary":
    fn, name = _rotary_kernel, "_rotary_kernel"
    ints = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_ct", "stride_st", "Hq", "Hk", "D2"]
    consts = {"BLOCK_H": 32, "HALF": 64, "PDL": True}
    sig = {**{k: "*fp16" for k in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr")}, **{k: "i32" for k in ints},
           **{k: "constexpr" for k in consts}}
elif kind in ("attn4", "attn8", "attn16"):
    # attn4: int4 decode (2 splits), fp16, GQA 4, with attention sinks; attn8: int8 decode, MHA, one split,
    # with sinks (the large-batch variant; 2 warps, as the launcher picks for quantized caches); attn16: fp16
    # cache, MHA, 4 splits, writing this step's rotated K/V itself (new_kv), q / k / v read from (and zeroed
    # in) a float32 accumulator
    fn, name = _paged_attn_kernel, "_paged_attn_kernel"
    new = kind == "attn16"
    bits = {"attn4": 4, "attn8": 8, "attn16": 0}[kind]
    cache, acc = ("*fp16", "*fp32") if new else ("*u8", "*fp16")
    ptrs = {"q_ptr": acc, "k_ptr": cache, "v_ptr": cache, "ksz_ptr": "*fp16", "vsz_ptr": "*fp16",
            "o_ptr": "*fp16", "ws_ptr": "*fp32", "ml_ptr": "*fp32", "tables_ptr": "*i32", "qsl_ptr": "*i32",
            "lens_ptr": "*i32", "sink_ptr": "*fp16", "sidx_ptr": "*i32", "cnt_ptr": "*i32",
            "kn_ptr": acc, "vn_ptr": acc, "cos_ptr": "*fp16", "sin_ptr": "*fp16", "slot_ptr": "*i64"}
    ints = ["stride_knt", "stride_knh", "stride_vnt", "stride_vnh", "stride_ct", "stride_st", "num_slots"]
    ints2 = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt", "max_blocks", "Hk", "DH"]
    consts = {"G": 4 if bits == 4 else 1, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_DH": 64, "PAGE": 64,
              "BITS": bits, "SPLITS": {4: 2, 8: 1, 0: 4}[bits], "DECODE": True,
              "CT": triton.language.float16, "F32": False, "NUM_STAGES": 2, "HAS_SINK": not new, "PDL": True,
              "NEW_KV": new, "CONSUME": new}
    sig = {**ptrs, **{k: "i32" for k in ints}, "qk_scale": "fp32", **{k: "i32" for k in ints2},
           **{k: "constexpr" for k in consts}}
    options["num_warps"] = 4 if new else 2
else:
    bits = int(kind)
    fn, name, options = _write_kv_kernel, "_write_kv_kernel", {"enable_fp_fusion": False}
    sig = {
        "k_ptr": "*fp16", "v_ptr": "*fp16", "q_ptr": "*fp16", "cos_ptr": "*fp16", "sin_ptr": "*fp16",
        "kc_ptr": "*u8", "vc_ptr": "*u8", "ksz_ptr": "*fp16", "vsz_ptr": "*fp16", "slot_ptr": "*i64",
        "koff_ptr": "*fp32", "sink_ptr": "*fp16", "sslot_ptr": "*i64",
        "num_slots": "i32", "num_sinks": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
        "stride_vh": "i32", "stride_qt": "i32", "stride_qh": "i32", "stride_ct": "i32", "stride_st": "i32",
        "Hq": "i32", "Hk": "i32", "D": "i32", "BITS": "constexpr", "HAS_OFF": "constexpr",
        "HAS_SINK": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr", "INTERP": "constexpr",
        "PDL": "constexpr", "ROTARY": "constexpr", "BLOCK_HQ": "constexpr", "HALF": "constexpr",
    }
    consts = {"BITS": bits, "HAS_OFF": True, "HAS_SINK": True, "BLOCK_H": 16,
              "BLOCK_D": 64 if bits == 4 else 128, "INTERP": False, "PDL": True, "ROTARY": True,
              "BLOCK_HQ": 64, "HALF": 64}
try:
    # 16-byte aligned pointers, as torch allocates them (the register counts then match a real launch)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n][0] == "*" or n in div16}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
except FileNotFoundError as e:  # no ptxas
    print("SKIP", e); sys.exit(0)
ptx = k.asm["ptx"]
if f".entry {name}" not in ptx:
    print("NO ENTRY")
elif "griddepcontrol.wait" not in ptx or "griddepcontrol.launch_dependents" not in ptx:
    print("NO PDL")
elif kind == "fma" and "prefetch.global.L2" not in ptx:
    print("NO PREFETCH")
elif kind.startswith("mma_t") and ("wgmma.mma_async" not in ptx or not all(
    # wgmma's A operand (the weights) a register list, not a shared-memory descriptor
    line.split("}, ", 1)[1].startswith("{") for line in ptx.splitlines() if "wgmma.mma_async" in line
)):
    print("NO WGMMA WITH THE WEIGHTS IN REGISTERS")
elif kind in ("attn4", "attn8") or kind.startswith("mma_t"):  # no spills (attention: session 9)
    import re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.ptx", "w").write(ptx)
        r = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.o"],
                           capture_output=True, text=True)
    spills = re.findall(r"(\\d+) bytes spill stores", r.stderr)
    print("PTX" if spills and int(spills[0]) == 0 else f"SPILLS {spills} {r.stderr[-500:]}")
else:
    print("PTX")
"""


@pytest.mark.parametrize(
    "kind", ["8", "4", "attn4", "attn8", "attn16", "fma", "mma_t16", "mma_t128", "norm", "rotary"]
)
def test_kernels_compile_for_sm90(kind) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind], env=env, capture_output=True, text=True, timeout=300
    )
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip() == "PTX", r.stderr[-3000:]
