"""The CUDA decode attention's switch and build, without a GPU (numerics: ``test_attention_cuda_gpu.py``)."""

from __future__ import annotations

import pytest
import torch

from lmkiln.errors import KernelInputError


def test_switch_validation_and_cpu(monkeypatch):
    from lmkiln.kernels import attention_cuda

    cpu = torch.device("cpu")
    assert not attention_cuda.enabled(cpu)
    monkeypatch.setenv(attention_cuda.ENABLE_ENV, "on")
    with pytest.raises(KernelInputError, match="LMKILN_CUDA_ATTENTION"):
        attention_cuda.enabled(cpu)
    monkeypatch.setenv(attention_cuda.ENABLE_ENV, "1")
    q = torch.zeros(1, 4, 64, dtype=torch.float16)
    k = torch.zeros(1, 2, 64, dtype=torch.float16)
    cache = torch.zeros(2, 16, 2, 64, dtype=torch.float16)
    cos = torch.zeros(1, 64, dtype=torch.float16)
    new_kv = (k, k, torch.zeros(1, dtype=torch.long), cos, cos)
    assert not attention_cuda.usable(q, cache, cache, new_kv, False)  # the CPU: the Triton / torch paths
    with pytest.raises(KernelInputError, match="1 to 8 splits"):
        attention_cuda.decode(q, cache, cache, None, None, 1.0, q, new_kv, False, 16)


def test_kernel_source_compiles_where_nvrtc_loads():
    """The instances the engine's models take build (NVRTC needs no GPU; skipped where PyTorch has no CUDA
    build, as on CI): head dims 64 / 128, GQA groups 1-4, 1-8 splits, consumed or fp16 q/k/v."""
    from lmkiln.kernels import attention_cuda, cuda_jit

    if not cuda_jit.available():
        pytest.skip("no NVRTC here (a CPU build of PyTorch)")
    src = cuda_jit.read_source(attention_cuda.SOURCE)
    for d, g, s, consume, slot64 in (
        (128, 1, 8, "true", "false"),
        (64, 3, 8, "false", "true"),
        (128, 4, 1, "true", "true"),
        (64, 2, 3, "false", "false"),
    ):
        cubin, name = cuda_jit.compile_cubin(
            src, f"decode_attn<{d}, {g}, {s}, {consume}, {slot64}>", "sm_90", attention_cuda.OPTIONS
        )
        assert cubin[:4] == b"\x7fELF" and name.startswith("_Z11decode_attn")
