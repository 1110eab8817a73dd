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


class StagedCopy:
    """Host lists into fixed device buffers (a decode graph's inputs) through pinned host twins of them.

    :func:`to_device` takes a pinned block from torch's caching host allocator for every list; this keeps
    two sets of twins for the life of the buffers and uses them in turn, so a step allocates no pinned memory.
    A set is refilled two steps after its copies were queued, and only once they are done (an event; with at
    most one step in flight, already the case). On the CPU the lists go straight into the buffers.

    ``side_stream`` (CUDA): the copies run on a stream of their own instead of the caller's. They wait only
    for the buffers' last readers (marked by :meth:`release`), not for everything queued since, so they
    overlap the caller's later work (a decode step's lm_head and sampler), and the caller's stream waits for
    them only where the next reader starts. On the caller's stream each copy is a copy-engine round trip that
    every kernel behind it waits for."""

    def __init__(self, buffers: list[torch.Tensor], side_stream: bool = False) -> None:
        self.buffers = buffers
        self._cuda = bool(buffers) and buffers[0].device.type == "cuda"
        self._sets: list[list[torch.Tensor]] = []
        self._events: list[torch.cuda.Event] = []
        self._stream: torch.cuda.Stream | None = None
        self._released: torch.cuda.Event | None = None
        if self._cuda:
            self._sets = [
                [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in buffers] for _ in range(2)
            ]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
            if side_stream:
                self._stream = torch.cuda.Stream(buffers[0].device)
                self._released = torch.cuda.Event()
        self._turn = 0

    def copy(self, values: list[list]) -> None:
        """``buffers[i][: len(values[i])] = values[i]`` for every buffer, asynchronously on CUDA: work queued
        on the current stream after this call sees the new values."""
        if len(values) != len(self.buffers):
            raise ValueError(
                f"{len(values)} value lists for {len(self.buffers)} buffers: pass one per buffer, in order"
            )
        if not self._cuda:
            for buf, vals in zip(self.buffers, values, strict=True):
                if vals:
                    buf[: len(vals)].copy_(torch.tensor(vals, dtype=buf.dtype))
            return
        k, self._turn = self._turn, self._turn ^ 1
        self._events[k].synchronize()  # the copies out of this set (two steps ago) are done
        caller = torch.cuda.current_stream(self.buffers[0].device)
        stream = self._stream or caller
        if self._released is not None:
            stream.wait_event(self._released)  # the buffers' readers so far are done with them
        with torch.cuda.stream(stream):
            for buf, host, vals in zip(self.buffers, self._sets[k], values, strict=True):
                n = len(vals)
                if n:
                    host[:n].copy_(torch.tensor(vals, dtype=host.dtype))
                    buf[:n].copy_(host[:n], non_blocking=True)
            self._events[k].record(stream)
        if stream is not caller:
            caller.wait_event(self._events[k])

    def release(self) -> None:
        """Mark the work queued so far on the current stream as the buffers' last readers: the next
        :meth:`copy` overwrites them after that work only (a no-op without a side stream, where stream order
        already says so). Call it after each reader, e.g. a graph replay."""
        if self._released is not None:
            self._released.record(torch.cuda.current_stream(self.buffers[0].device))
