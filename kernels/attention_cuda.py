"""Launcher of the CUDA decode attention with this step's K/V (``kernels/cuda/decode_attention.cu``, built by
:mod:`cuda_jit`): :func:`paged_attention.paged_decode` with ``new_kv`` takes it where :func:`usable` says so
(fp16 cache and activations, head dim 64 or 128, up to :data:`MAX_GROUP` query heads a KV head), the Triton
kernel otherwise. Same contract and results as the Triton ``new_kv`` path (the cache bit for bit, the output
up to float32 summation order; ``kernels/attention_ref.py`` is the oracle of both).

Why a second kernel: at batch 1 the decode attention is a latency chain, not a bandwidth problem (~10 us a
layer of a 7B decode step, ~0.3 ms of ~2 ms, for ~1.4 us of KV bytes). This one reads the block table, the
first 64 cached keys and values of each split and the rotary's cos / sin before its programmatic-launch wait
(they are older than the previous kernel), and merges the splits of a (sequence, KV head) in a thread-block
cluster (each split pushes its softmax state into the first CTA's shared memory, one cluster barrier) instead
of global partials and a counter.
"""

from __future__ import annotations

import math

import torch
from lmkiln.kernels import cuda_jit, pdl

from lmkiln.errors import KernelInputError

SOURCE = "decode_attention.cu"
ENABLE_ENV = "LMKILN_CUDA_ATTENTION"
# no FMA contraction: the rotary rounds as kernels/fused.py's rotate_halves (Triton, fp fusion off)
OPTIONS = ("--fmad=false",)
MAX_SPLITS = 8  # the splits of a (sequence, KV head) are one cluster: 8 CTAs is the portable maximum
MAX_GROUP = 4  # query heads a KV head (registers: ~245 at 4 with head dim 128)
HEAD_DIMS = (64, 128)
THREADS = 128


def enabled(device: torch.device) -> bool:
    """Whether :func:`paged_attention.paged_decode` may take this kernel on ``device``: CUDA, compute
    capability >= 9 (clusters, ``griddepcontrol``), NVRTC loadable, ``LMKILN_CUDA_ATTENTION`` not 0 (an A/B
    switch, read at every call)."""
    return cuda_jit.enabled(device, ENABLE_ENV, KernelInputError)


def usable(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    new_kv: tuple[torch.Tensor, ...],
    consume: bool,
) -> bool:
    """Whether this kernel serves a (validated) ``paged_decode(q, ..., new_kv=new_kv, consume=consume)``."""
    k, v, _, cos, sin = new_kv
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[2]
    act = torch.float32 if consume else torch.float16
    return (
        enabled(q.device)
        and d in HEAD_DIMS
        and hq // hk <= MAX_GROUP
        and k_cache.dtype == torch.float16
        and q.dtype == act
        and k.dtype == act
        and v.dtype == act
        and cos.dtype == torch.float16
        and sin.dtype == torch.float16
        and cos.stride(1) == 1
        and sin.stride(1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
    )


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    new_kv: tuple[torch.Tensor, ...],
    consume: bool,
    splits: int,
) -> torch.Tensor:
    """The launch (inputs validated by ``paged_decode`` and :func:`usable`): ``splits`` (1..8) CTAs a
    (sequence, KV head), one cluster."""
    k, v, slots, cos, sin = new_kv
    b, hq, d = q.shape
    hk, page = k_cache.shape[2], k_cache.shape[1]
    if not 1 <= splits <= MAX_SPLITS:
        raise KernelInputError(f"the CUDA decode attention takes 1 to {MAX_SPLITS} splits, got {splits}")
    if out.dtype != torch.float16:
        raise KernelInputError(f"the CUDA decode attention writes fp16, got out {out.dtype}")
    name = (
        f"decode_attn<{d}, {hq // hk}, {splits}, {str(consume).lower()}, "
        f"{str(slots.dtype == torch.int64).lower()}>"
    )
    kern = cuda_jit.kernel(SOURCE, name, q.device, OPTIONS)
    kern(
        (splits, b * hk),
        (THREADS,),
        [
            q,
            k,
            v,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos,
            sin,
            cos.stride(0),
            sin.stride(0),
            k_cache,
            v_cache,
            slots,
            k_cache.shape[0] * page,
            block_tables,
            block_tables.stride(0),
            block_tables.shape[1],
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            hk,
            int(math.log2(page)),
            float(scale * math.log2(math.e)),
        ],
        pdl=pdl.enabled(q.device),
    )
    return out
