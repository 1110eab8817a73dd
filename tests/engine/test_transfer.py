"""Host lists to the device: ``to_device`` and the decode graphs' ``StagedCopy``."""

from __future__ import annotations

import pytest
import torch

from lmkiln.engine.transfer import StagedCopy, to_device


def _buffers(device: str) -> list[torch.Tensor]:
    return [
        torch.full((4,), -7, dtype=torch.long, device=device),
        torch.full((4, 3), -7, dtype=torch.int32, device=device),
    ]


def test_staged_copy_fills_buffer_prefixes_on_cpu() -> None:
    bufs = _buffers("cpu")
    staged = StagedCopy(bufs)
    staged.copy([[1, 2], [[1, 2, 3], [4, 5, 6]]])
    assert bufs[0].tolist() == [1, 2, -7, -7]
    assert bufs[1].tolist() == [[1, 2, 3], [4, 5, 6], [-7, -7, -7], [-7, -7, -7]]
    staged.copy([[9, 8, 7, 6], [[0, 0, 0]] * 4])
    assert bufs[0].tolist() == [9, 8, 7, 6] and not bufs[1].any()
    staged.copy([[5], []])  # an empty list leaves its buffer as it was
    assert bufs[0].tolist() == [5, 8, 7, 6] and not bufs[1].any()
    with pytest.raises(ValueError, match="1 value lists for 2 buffers"):
        staged.copy([[1]])
    assert to_device([3, 4], torch.int32, torch.device("cpu")).tolist() == [3, 4]


@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [False, True])
def test_staged_copy_on_cuda_never_overwrites_a_set_still_being_copied(side_stream) -> None:
    """Steps queued behind a busy stream: each step's values arrive whole and are not overwritten before
    the step's reader (a snapshot queued behind a sleep, then :meth:`release`) ran, although the host refills
    each pinned set two steps later and, with a side stream, the copies run beside the readers; after the
    first steps no pinned block is allocated (torch's host allocator statistics, where torch has them)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bufs = _buffers("cuda")
    staged = StagedCopy(bufs, side_stream=side_stream)
    stats = getattr(torch.cuda, "host_memory_stats", None)
    staged.copy([[0], [[0] * 3]])
    staged.release()
    torch.cuda.synchronize()
    before = stats().get("num_host_alloc", 0) if stats is not None else None
    torch.cuda._sleep(100_000_000)  # ~60 ms: every copy below waits in the stream
    snaps = []
    for step in range(1, 7):
        staged.copy([[step * 10 + i for i in range(4)], [[step] * 3] * 4])
        torch.cuda._sleep(5_000_000)  # a slow reader: the next step's copy must wait for it
        snaps.append((bufs[0].clone(), bufs[1].clone()))
        staged.release()
    torch.cuda.synchronize()
    if before is not None:  # read first: .tolist() / .item() below take pinned blocks themselves
        assert stats().get("num_host_alloc", 0) == before
    for step, (ids, tables) in enumerate(snaps, start=1):
        assert ids.tolist() == [step * 10 + i for i in range(4)] and tables.eq(step).all()
