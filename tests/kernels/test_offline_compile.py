"""The KV-write kernel compiled for an H100 (sm_90) on any machine: the CPU interpreter accepts code that
the GPU compiler refuses (a jit function reading a plain global, reassigning a constexpr), so CI compiles
the kernel's int8 and int4 variants ahead of time, in a subprocess without ``TRITON_INTERPRET`` (the
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

bits = int(sys.argv[1])
sig = {
    "k_ptr": "*fp16", "v_ptr": "*fp16", "kc_ptr": "*u8", "vc_ptr": "*u8", "ksz_ptr": "*fp16",
    "vsz_ptr": "*fp16", "slot_ptr": "*i64", "koff_ptr": "*fp32", "num_slots": "i32", "stride_kt": "i32",
    "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32", "Hk": "i32", "D": "i32",
    "BITS": "constexpr", "HAS_OFF": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr",
    "INTERP": "constexpr",
}
consts = {"BITS": bits, "HAS_OFF": True, "BLOCK_H": 16, "BLOCK_D": 64 if bits == 4 else 128, "INTERP": False}
try:
    k = triton.compile(ASTSource(_write_kv_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options={"enable_fp_fusion": False})
except FileNotFoundError as e:  # no ptxas
    print("SKIP", e); sys.exit(0)
print("PTX" if ".entry _write_kv_kernel" in k.asm["ptx"] else "NO ENTRY")
"""


@pytest.mark.parametrize("bits", [8, 4])
def test_write_kv_compiles_for_sm90(bits) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(bits)], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0 and r.stdout.strip() == "PTX", r.stderr[-3000:]
