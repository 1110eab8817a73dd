"""Kernel tests run the Triton kernels through the interpreter on machines without CUDA.

``TRITON_INTERPRET`` must be set before ``lmkiln.kernels.w4a16`` is imported (``triton.jit`` reads it when a
kernel is defined), so it is set here, at collection time. GPU tests are marked ``gpu`` and skipped without
CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def interpreted() -> None:
    """Skip unless the Triton interpreter runs the kernels on CPU tensors (CUDA machines: gpu tests)."""
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter test; the gpu-marked tests cover the kernels on this CUDA machine")
    pytest.importorskip("triton")
    from lmkiln.kernels import w4a16

    if not isinstance(w4a16._mma_kernel, __import__("triton").runtime.interpreter.InterpretedFunction):
        pytest.skip("lmkiln.kernels.w4a16 was imported before TRITON_INTERPRET=1 was set")


def random_packed(
    k: int, n: int, group_size: int, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Packed tensors of a random ``[K, N]`` int4 weight (codes, zeros and fp16 scales drawn uniformly)."""
    from lmkiln.quant.pack import pack_codes

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g, dtype=torch.uint8)
    scales = (torch.rand((k // group_size, n), generator=g) * 0.02 + 0.004).half()
    return {key: v.to(device) for key, v in pack_codes(codes, zeros, scales).items()}


@pytest.fixture()
def make_packed():
    """``make_packed(k, n, group_size, seed=0, device="cpu") -> {"qweight", "sz", "zeros"}``."""
    return random_packed
