"""The KV-write and paged-attention kernels compiled for an H100 (sm_90) on any machine: the CPU interpreter
accepts code that the GPU compiler refuses (a jit function reading a plain global, reassigning a constexpr,
a branch the compiler cannot type), so CI compiles the write kernel's int8 and int4 variants and the int4
decode kernel (with attention sinks) ahead of time, in a subprocess without ``TRITON_INTERPRET`` (the
interpreter replaces the jit functions at import). Skipped where Triton has no CUDA backend or ptxas."""

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
from lmkiln.kernels.kv_cache import _write_kv_kernel
from lmkiln.kernels.paged_attention import _paged_attn_kernel

kind = sys.argv[1]
if kind == "attn4":  # int4 decode (2 splits), fp16, GQA 4, with attention sinks
    fn, name, options = _paged_attn_kernel, "_paged_attn_kernel", {"num_warps": 2}
    ptrs = {"q_ptr": "*fp16", "k_ptr": "*u8", "v_ptr": "*u8", "ksz_ptr": "*fp16", "vsz_ptr": "*fp16",
            "o_ptr": "*fp16", "ws_ptr": "*fp32", "ml_ptr": "*fp32", "tables_ptr": "*i32", "qsl_ptr": "*i32",
            "lens_ptr": "*i32", "sink_ptr": "*fp16", "sidx_ptr": "*i32", "qk_scale": "fp32"}
    ints = ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_bt", "max_blocks", "Hk", "DH"]
    consts = {"G": 4, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_DH": 64, "PAGE": 64, "BITS": 4, "SPLITS": 2,
              "DECODE": True, "CT": triton.language.float16, "F32": False, "NUM_STAGES": 2, "HAS_SINK": True}
    sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
else:
    bits = int(kind)
    fn, name, options = _write_kv_kernel, "_write_kv_kernel", {"enable_fp_fusion": False}
    sig = {
        "k_ptr": "*fp16", "v_ptr": "*fp16", "kc_ptr": "*u8", "vc_ptr": "*u8", "ksz_ptr": "*fp16",
        "vsz_ptr": "*fp16", "slot_ptr": "*i64", "koff_ptr": "*fp32", "sink_ptr": "*fp16", "sslot_ptr": "*i64",
        "num_slots": "i32", "num_sinks": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
        "stride_vh": "i32", "Hk": "i32", "D": "i32", "BITS": "constexpr", "HAS_OFF": "constexpr",
        "HAS_SINK": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr", "INTERP": "constexpr",
    }
    consts = {"BITS": bits, "HAS_OFF": True, "HAS_SINK": True, "BLOCK_H": 16,
              "BLOCK_D": 64 if bits == 4 else 128, "INTERP": False}
try:
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
except FileNotFoundError as e:  # no ptxas
    print("SKIP", e); sys.exit(0)
print("PTX" if f".entry {name}" in k.asm["ptx"] else "NO ENTRY")
"""


@pytest.mark.parametrize("kind", ["8", "4", "attn4"])
def test_kernels_compile_for_sm90(kind) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind], env=env, capture_output=True, text=True, timeout=300
    )
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip() == "PTX", r.stderr[-3000:]
