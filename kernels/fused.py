"""Fused Triton kernels for a decoder layer's small ops: (residual add +) RMSNorm, rotary, SiLU·mul.

Each replaces a chain of eager torch kernels in :mod:`lmkiln.models.llama` (its torch code is the reference;
the tests compare against it) by one launch, and mirrors the reference's arithmetic op by op: every torch op
on fp16/bf16 tensors computes in fp32 and rounds to the tensor's dtype, and so do the kernels, with IEEE
division, ``expf`` (``libdevice``) and FMA contraction off on the GPU. What can still differ is the order of
the fp32 sum of squares in RMSNorm (torch's reduction tree vs ``tl.sum``): a last-bit difference on a few
elements in fp32, rarely one ulp after the cast in fp16/bf16. Rotary and SiLU·mul are bit-identical on the
GPU; the interpreter uses numpy's ``exp``, so there SiLU matches to ~1 ulp.

* ``rmsnorm(x, weight, eps)`` / ``add_rmsnorm(x, residual, weight, eps) -> (normed, x + residual)``: one
  program per row (token), the row in registers (hidden <= 65536).
* ``rotary_(q, k, cos, sin)``: in place on ``q [T, Hq, D]`` and ``k [T, Hk, D]``, which may be strided views
  (e.g. of a fused qkv output; only the last dim must be contiguous); ``cos``/``sin [T, D]``, rotate-half
  convention (first half / second half).
* ``silu_mul(gate_up)`` (``[T, 2I]``, gate first) or ``silu_mul(gate, up)`` (two ``[T, I]``, strided views
  allowed) -> ``silu(gate) * up`` ``[T, I]``.

All launchers validate their inputs (:class:`lmkiln.errors.KernelInputError`), never synchronise with the
host and size grids from shapes only, so they can be captured in CUDA graphs. fp16, bf16 and fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmkiln.kernels import pdl
from lmkiln.kernels.pdl import interpreting
from triton.language.extra import libdevice

from lmkiln.errors import KernelInputError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 65536


def _warps(block: int) -> int:
    """Liger-Kernel's rule: more warps for wider rows."""
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def _launch_opts(on_pdl: bool) -> dict:
    # FMA contraction would fuse a rounded product into the next add (fp32) and break bit-equality
    return {} if interpreting() else {"enable_fp_fusion": False, **pdl.launch_opts(on_pdl)}


def _check(x: torch.Tensor, name: str, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise KernelInputError(f"{name} must be fp16, bf16 or fp32, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise KernelInputError(f"{name} must have {dim} dims, got shape {list(x.shape)}")
    if x.dim() == 0 or (x.numel() and x.stride(-1) != 1):
        raise KernelInputError(
            f"{name} must have a contiguous last dim, got shape {list(x.shape)} strides {x.stride()}"
        )
    if x.device.type != "cuda" and not interpreting():
        raise KernelInputError(
            f"Triton kernels need a CUDA device ({name} is on {x.device}); use the torch path on the CPU or "
            "set TRITON_INTERPRET=1 before importing lmkiln.kernels"
        )


def _same(tensors: dict[str, torch.Tensor], what: str) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) != 1:
        raise KernelInputError(f"{what} tensors must share one device, got {sorted(devices)}")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        listing = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise KernelInputError(f"{what} tensors must share one dtype, got {listing}: cast them first")


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x [..., N]`` as a 2-D ``[rows, N]`` view (a copy only when the leading dims cannot be merged)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.numel() and x2.stride(-1) != 1:
        raise KernelInputError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    return x2


# ------------------------------------------------------------------------------------------------ RMSNorm


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    ro_ptr,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    N,
    inv_n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERP: tl.constexpr,
    PDL: tl.constexpr,
    CONSUME: tl.constexpr = False,
):
    DT: tl.constexpr = y_ptr.dtype.element_ty  # x's dtype, or the residual's where CONSUME
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    pdl.trigger(PDL)
    # the weight (no kernel writes it) before the wait: its load left the critical path after the row's sum
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    pdl.wait(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if CONSUME:  # x: a float32 split-K accumulator, rounded as the GEMM's output would be (zeroed below)
        x = x.to(DT)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(DT)  # x + residual, in x's dtype
        tl.store(ro_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) * inv_n  # torch's mean: sum * (1/N)
    if CONSUME:  # every thread has its part of the row (the sum needed all): zero it for the GEMM
        tl.debug_barrier()
        tl.store(x_ptr + row * stride_x + offs, tl.zeros((BLOCK_N,), tl.float32), mask=mask)
    # rsqrtf as torch's CUDA rsqrt; the interpreter (no libdevice) does 1 / sqrt, as torch's CPU rsqrt
    inv = tl.math.rsqrt(ms + eps) if INTERP else libdevice.rsqrt(ms + eps)
    xn = (xf * inv).to(DT)
    y = w.to(tl.float32) * xn.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(x, "x")
    if consume and (residual is None or x.dtype != torch.float32 or not x.is_contiguous()):
        raise KernelInputError(
            "add_rmsnorm(consume=True) reads and zeroes a float32 split-K accumulator: x must be a "
            f"contiguous float32 tensor and a residual is needed, got x {x.dtype} strides {x.stride()}"
        )
    _check(weight, "weight", dim=1)
    n = x.shape[-1]
    if weight.shape[0] != n:
        raise KernelInputError(f"weight has {weight.shape[0]} elements but x rows have {n} (hidden size)")
    if not 0 < n <= MAX_HIDDEN:
        raise KernelInputError(
            f"rmsnorm keeps a row in registers: hidden size must be 1..{MAX_HIDDEN}, got {n}"
        )
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        _check(residual, "residual")
        if residual.shape != x.shape:
            raise KernelInputError(
                f"residual {list(residual.shape)} and x {list(x.shape)} must have the same shape"
            )
        tensors["residual"] = residual
    dt = x.dtype
    if consume and residual is not None:  # x is float32, the rest in the activation dtype
        if x.device != residual.device:
            raise KernelInputError(f"rmsnorm tensors must share one device: {x.device}, {residual.device}")
        del tensors["x"]
        dt = residual.dtype
    _same(tensors, "rmsnorm")
    x2 = _rows(x, "x")
    r2 = _rows(residual, "residual") if residual is not None else x2
    y = torch.empty(x.shape, dtype=dt, device=x.device)
    ro = torch.empty(x.shape, dtype=dt, device=x.device) if residual is not None else y
    rows = x2.shape[0]
    if rows == 0:
        return y, (ro if residual is not None else None)
    block = triton.next_power_of_2(n)
    on = pdl.enabled(x.device)
    _rmsnorm_kernel[(rows,)](
        x2,
        r2,
        weight,
        y,
        ro,
        x2.stride(0),
        r2.stride(0),
        n,
        n,
        n,
        1.0 / n,
        eps,
        HAS_RES=residual is not None,
        BLOCK_N=block,
        INTERP=interpreting(),
        PDL=on,
        CONSUME=consume,
        num_warps=_warps(block),
        **_launch_opts(on),
    )
    return y, (ro if residual is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x², -1) + eps)).to(x.dtype)`` (fp32 inside), as ``RMSNorm.forward``."""
    return _norm(x, None, weight, eps)[0]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (in the input dtype); returns ``(rmsnorm(h, weight, eps), h)``. ``consume``: ``x``
    is a float32 split-K accumulator (``Int4Linear.matmul_acc``): it is rounded to the residual's dtype
    first, as the GEMM's own output would be, and zeroed for the GEMM's next launch; outputs take the
    residual's dtype."""
    y, h = _norm(x, residual, weight, eps, consume)
    return y, h  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- rotary


@triton.jit
def rotate_heads(x_ptr, tok, stride_t, stride_h, H, head0, c1, c2, s1, s2, D2, BLOCK_H, HALF):
    """Rotate heads ``head0 .. head0 + BLOCK_H`` of token ``tok`` in place (rotate-half convention)."""
    offs_h = head0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    m = (offs_h[:, None] < H) & (offs_d[None, :] < D2)
    p = x_ptr + tok * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    o1, o2 = rotate_halves(tl.load(p, mask=m, other=0.0), tl.load(p + D2, mask=m, other=0.0), c1, c2, s1, s2)
    tl.store(p, o1, mask=m)
    tl.store(p + D2, o2, mask=m)


@triton.jit
def rotate_halves(x1, x2, c1, c2, s1, s2):
    """The rotary of a head's halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` in their dtype: ``x * cos +
    rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``, every product and sum rounded to that
    dtype as the torch code rounds (``c*``/``s*``: float32 cos / sin halves)."""
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (x1f * c1).to(dt).to(tl.float32) + (-x2f * s1).to(dt).to(tl.float32)
    o2 = (x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def cos_sin(cos_ptr, sin_ptr, tok, stride_ct, stride_st, D2, HALF: tl.constexpr):
    """Token ``tok``'s cos / sin, each as its two halves ``[1, HALF]`` in float32."""
    offs_d = tl.arange(0, HALF)
    dm = offs_d < D2
    cp = cos_ptr + tok * stride_ct + offs_d
    sp = sin_ptr + tok * stride_st + offs_d
    c1 = tl.load(cp, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cp + D2, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sp, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sp + D2, mask=dm, other=0.0).to(tl.float32)[None, :]
    return c1, c2, s1, s2


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    Hq,
    Hk,
    D2,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head0 = tl.program_id(1) * BLOCK_H
    c1, c2, s1, s2 = cos_sin(cos_ptr, sin_ptr, tok, stride_ct, stride_st, D2, HALF)
    rotate_heads(q_ptr, tok, stride_qt, stride_qh, Hq, head0, c1, c2, s1, s2, D2, BLOCK_H, HALF)
    rotate_heads(k_ptr, tok, stride_kt, stride_kh, Hk, head0, c1, c2, s1, s2, D2, BLOCK_H, HALF)


def check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Validate :func:`rotary_`'s inputs (also those of ``kv_cache.write_kv``'s fused rotary)."""
    for name, x in (("q", q), ("k", k)):
        _check(x, name, dim=3)
    for name, x in (("cos", cos), ("sin", sin)):
        _check(x, name, dim=2)
    _same({"q": q, "k": k, "cos": cos, "sin": sin}, "rotary")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise KernelInputError(
            f"k {list(k.shape)} must be [{t}, num_kv_heads, {d}] to match q {list(q.shape)}"
        )
    if d % 2:
        raise KernelInputError(f"rotate-half rotary needs an even head_dim, got {d}")
    for name, x in (("cos", cos), ("sin", sin)):
        if tuple(x.shape) != (t, d):
            raise KernelInputError(f"{name} must be [tokens, head_dim] = [{t}, {d}], got {list(x.shape)}")


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: ``q = q * cos + rotate_half(q) * sin``, same for ``k`` (``cos``/``sin [T, D]`` per token).

    ``q [T, Hq, D]`` and ``k [T, Hk, D]`` may be strided views (last dim contiguous) and must not overlap."""
    check_rotary(q, k, cos, sin)
    t, hq, d = q.shape
    hk = k.shape[1]
    if t == 0 or hq + hk == 0:
        return
    half = triton.next_power_of_2(d // 2)
    block_h = min(triton.next_power_of_2(max(hq, hk)), max(1, 4096 // half))
    grid = (t, triton.cdiv(max(hq, hk), block_h))
    on = pdl.enabled(q.device)
    _rotary_kernel[grid](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        hq,
        hk,
        d // 2,
        BLOCK_H=block_h,
        HALF=half,
        PDL=on,
        num_warps=4 if block_h * half >= 1024 else 2,
        **_launch_opts(on),
    )


# ------------------------------------------------------------------------------------------------ SiLU·mul


@triton.jit
def _silu_mul_kernel(
    g_ptr,
    u_ptr,
    o_ptr,
    stride_g,
    stride_u,
    stride_o,
    N,
    BLOCK_N: tl.constexpr,
    INTERP: tl.constexpr,
    PDL: tl.constexpr,
    IL: tl.constexpr = 0,
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    if IL > 0:  # one row [g_0, u_0, g_1, u_1, ...] of IL-column blocks (g_ptr == u_ptr)
        col = (offs // IL) * (2 * IL) + offs % IL
        g = tl.load(g_ptr + row * stride_g + col, mask=m, other=0.0)
        u = tl.load(u_ptr + row * stride_u + col + IL, mask=m, other=0.0)
    else:
        g = tl.load(g_ptr + row * stride_g + offs, mask=m, other=0.0)
        u = tl.load(u_ptr + row * stride_u + offs, mask=m, other=0.0)
    gf = g.to(tl.float32)
    # expf, as torch's CUDA silu (tl.exp is the approximate ex2); the interpreter has no libdevice
    e = tl.exp(-gf) if INTERP else libdevice.exp(-gf)
    s = tl.math.div_rn(gf, 1.0 + e).to(g.dtype)  # F.silu(gate), rounded to the dtype
    o = s.to(tl.float32) * u.to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, o.to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor, up: torch.Tensor | None = None, interleave: int = 0) -> torch.Tensor:
    """``silu(gate) * up`` -> a new contiguous ``[..., I]`` tensor.

    One argument: ``gate_up [..., 2I]`` holds gate then up (``chunk(2, -1)``), or with ``interleave=B``
    blocks of ``B`` gate columns and their ``B`` up columns in turn (``quant.pack.gate_up_interleave``); two:
    ``gate``, ``up [..., I]`` (strided views allowed)."""
    if interleave:
        if up is not None:
            raise KernelInputError("silu_mul(interleave=B) takes one gate_up tensor, not gate and up")
        _check(gate_up, "gate_up")
        if interleave < 1 or gate_up.shape[-1] % (2 * interleave):
            raise KernelInputError(
                f"gate_up's last dim ({gate_up.shape[-1]}) must be a multiple of 2 x interleave "
                f"({interleave})"
            )
        return _silu_mul_launch(gate_up, gate_up, gate_up.shape[-1] // 2, interleave)
    if up is None:
        _check(gate_up, "gate_up")
        if gate_up.shape[-1] % 2:
            raise KernelInputError(
                f"gate_up's last dim must be even (gate and up concatenated), got {gate_up.shape[-1]}"
            )
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        gate = gate_up
        _check(gate, "gate")
        _check(up, "up")
        if gate.shape != up.shape:
            raise KernelInputError(
                f"gate {list(gate.shape)} and up {list(up.shape)} must have the same shape"
            )
    _same({"gate": gate, "up": up}, "silu_mul")
    return _silu_mul_launch(gate, up, gate.shape[-1], 0)


def _silu_mul_launch(gate: torch.Tensor, up: torch.Tensor, n: int, il: int) -> torch.Tensor:
    """``out [..., n]`` from checked ``gate`` / ``up`` (one interleaved tensor, twice, when ``il``)."""
    out = torch.empty((*gate.shape[:-1], n), dtype=gate.dtype, device=gate.device)
    g2, u2 = _rows(gate, "gate"), _rows(up, "up")
    rows = g2.shape[0]
    if rows == 0 or n == 0:
        return out
    block = min(triton.next_power_of_2(n), 2048)
    on = pdl.enabled(gate.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        g2,
        u2,
        out,
        g2.stride(0),
        u2.stride(0),
        n,
        n,
        BLOCK_N=block,
        INTERP=interpreting(),
        PDL=on,
        IL=il,
        num_warps=_warps(block),
        **_launch_opts(on),
    )
    return out
