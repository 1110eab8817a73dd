"""Host lists to the device without making the host wait for the GPU."""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied asynchronously on CUDA.

    The list goes to pinned host memory first (torch's caching host allocator keeps the block until the copy
    is done): a copy from pageable memory, even with ``non_blocking=True``, makes the host wait until the
    stream reaches it, i.e. for all the work queued before, which defeats async scheduling."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
