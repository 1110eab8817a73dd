"""The CUDA C++ GEMV's dispatch and build, without a GPU (its numerics: ``test_w4a16_cuda_gpu.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from lmkiln.errors import KernelInputError, QuantConfigError


def test_tuned_cuda_entry_falls_back_where_the_kernel_is_unavailable(tmp_path, monkeypatch):
    """A ``cuda`` entry with its measured ``fallback``: on a device where the CUDA kernel cannot run (here the
    CPU; on a GPU, no NVRTC or ``LMKILN_CUDA_GEMV=0``) the dispatcher takes the fallback, not the heuristic;
    a ``cuda`` entry without one falls to the heuristic ``fma``."""
    pytest.importorskip("triton")
    from lmkiln.kernels import dispatch

    fma = {"kind": "fma", "block_m": 1, "block_n": 64, "split_k": 3, "num_warps": 2, "chunks": 2, "flush": 1}
    cuda = {"kind": "cuda", "block_n": 128, "split_k": 8, "num_warps": 4, "num_stages": 1, "chunks": 1}
    entry = {"k": 128, "group_size": 128, "dtype": "float16", "m_max": 1}
    table = {
        "device": "cpu",
        "entries": [
            {**entry, "n": 64, "config": cuda, "fallback": fma},
            {**entry, "n": 128, "config": cuda},
        ],
    }
    (tmp_path / "cpu.json").write_text(json.dumps(table))
    monkeypatch.setattr(dispatch, "TUNED_DIR", tmp_path)
    dispatch.load_tuned.cache_clear()
    try:
        cpu = torch.device("cpu")
        cfg = dispatch.choose_config(1, 64, 128, 128, torch.float16, cpu)
        assert (cfg.kind, cfg.block_n, cfg.split_k, cfg.chunks) == ("fma", 64, 3, 2)
        assert dispatch.choose_config(1, 128, 128, 128, torch.float16, cpu).kind == "fma"  # heuristic
        assert dispatch.load_tuned("cpu")[0].fallback == fma
    finally:
        dispatch.load_tuned.cache_clear()


def test_heuristic_cuda_splits_for_the_7b_shapes():
    """About three 8-warp CTAs an SM, one 32-column block each: the splits measured best on the H100
    (notes/kernels.md, session 14)."""
    pytest.importorskip("triton")
    from lmkiln.kernels import dispatch, w4a16_cuda

    shapes = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
    got = {}
    for name, (k, n) in shapes.items():
        cfg = dispatch.heuristic_config(1, n, k, 128, 132, cuda=True)
        assert (cfg.kind, cfg.num_warps, cfg.ksplit, cfg.block_n, cfg.zfold) == ("cuda", 1, 8, 32, True)
        got[name] = w4a16_cuda.plan(k // 128, cfg.split_k)[0]
    assert got == {"qkv": 1, "o": 3, "gate_up": 1, "down": 3}
    assert dispatch.heuristic_config(1, 4096, 4096, 128, 132).kind == "fma"  # without the CUDA kernel
    assert dispatch.heuristic_config(2, 4096, 4096, 128, 132, cuda=True).kind != "cuda"


def test_plan_leaves_no_split_empty():
    from lmkiln.kernels import w4a16_cuda

    assert w4a16_cuda.plan(86, 22) == (22, 4)
    assert w4a16_cuda.plan(32, 25) == (16, 2)
    assert w4a16_cuda.plan(5, 100) == (5, 1)
    assert w4a16_cuda.plan(10, 0) == (1, 10)
    for chunks in range(1, 40):
        for split in range(1, 45):
            n, per = w4a16_cuda.plan(chunks, split)
            assert (n - 1) * per < chunks <= n * per and n <= split


def test_switch_and_option_validation(monkeypatch):
    from lmkiln.kernels import w4a16_cuda

    cpu = torch.device("cpu")
    assert not w4a16_cuda.enabled(cpu)
    monkeypatch.setenv(w4a16_cuda.ENABLE_ENV, "yes")
    with pytest.raises(QuantConfigError, match="LMKILN_CUDA_GEMV"):
        w4a16_cuda.enabled(cpu)
    with pytest.raises(QuantConfigError, match="unroll"):
        w4a16_cuda.CudaGemvOptions(unroll=3)
    with pytest.raises(QuantConfigError, match="fp16 activations on a CUDA device"):
        x = torch.zeros(1, 128, dtype=torch.float16)
        w4a16_cuda.gemv(x, torch.zeros(1, 16, 32, dtype=torch.int32), None, None, 1)


def test_kernel_source_compiles_where_nvrtc_loads():
    """Every template instance the dispatcher and tests use builds (NVRTC needs no GPU; skipped where PyTorch
    has no CUDA build, as on CI)."""
    from lmkiln.kernels import cuda_jit, w4a16_cuda

    if not cuda_jit.available():
        pytest.skip("no NVRTC here (a CPU build of PyTorch)")
    src = cuda_jit.read_source(w4a16_cuda.SOURCE)
    for g in (32, 64, 128):
        for reduce in (0, 1, 2):
            for tc, ksplit in (("true", 1), ("false", 1), ("true", 4)):
                cubin, name = cuda_jit.compile_cubin(
                    src,
                    f"w4a16_gemv<{g}, 1, 1, {reduce}, true, false, 4, {tc}, {ksplit}>",
                    "sm_90",
                    w4a16_cuda.OPTIONS,
                )
                assert cubin[:4] == b"\x7fELF" and name.startswith("_Z10w4a16_gemv")
    with pytest.raises(RuntimeError, match="could not compile"):
        cuda_jit.compile_cubin(src, "w4a16_gemv<128, 1, 1, 2, true, false, 1, true, 1>", "sm_90")  # odd warps


def test_missing_nvrtc_is_reported(monkeypatch):
    from lmkiln.kernels import cuda_jit

    monkeypatch.setenv(cuda_jit.NVRTC_ENV, "/nonexistent/libnvrtc.so.99")
    cuda_jit.nvrtc.cache_clear()
    try:
        assert not cuda_jit.available()
        with pytest.raises(cuda_jit.NvrtcUnavailable, match="LMKILN_NVRTC"):
            cuda_jit.nvrtc()
        with pytest.raises(KernelInputError, match="CUDA device"):
            cuda_jit.kernel(
                "w4a16_gemv.cu", "w4a16_gemv<128, 1, 1, 0, true, false, 4, true, 1>", torch.device("cpu")
            )
    finally:
        cuda_jit.nvrtc.cache_clear()
