"""The persistent batch-1 layer kernel (``kernels/persistent.py``) against a pure-torch chain.

Under the interpreter each phase is its own launch (barriers cannot run there); the gpu test runs the real
single launch with its grid barriers and L2 prefetches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lmkiln.kernels.reference import dequant_ref

EPS = 1e-5


def _norm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``kernels.fused``'s rounding: fp16(w * fp16(h * rsqrt(mean(h^2) + eps)))."""
    hf = h.float()
    inv = torch.rsqrt(hf.pow(2).mean() + EPS)
    return (w.float() * (hf * inv).half().float()).half()


def _mm(x: torch.Tensor, p: dict) -> torch.Tensor:
    return x.double() @ dequant_ref(p["qweight"], p["sz"], torch.float32).double()


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    y = gu.half().float().reshape(-1, 2, 32)
    g, u = y[:, 0], y[:, 1]
    return ((F.silu(g).half().float()) * u).half().reshape(-1)


def reference(weights: dict, attn, res, post_w, in_w, head_x=None):
    """The decode path's numbers for one layer tail (and the next layer's qkv), in float64 GEMMs."""
    out = {}
    if head_x is not None:
        out["qkv"] = _mm(_norm(head_x, in_w), weights["qkv"])
        return out
    o = _mm(attn, weights["o"])
    hmid = (o.half().float() + res.float()).half()
    act = _silu_mul(_mm(_norm(hmid, post_w), weights["gu"]).float())
    d = _mm(act, weights["dn"])
    h = (d.half().float() + hmid.float()).half()
    out.update(
        o=o, hmid=hmid, act=act, dn=d, h=h, qkv=_mm(_norm(h, in_w), weights["qkv"]), final=_norm(h, in_w)
    )
    return out


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().reshape(-1), ref.double().reshape(-1)
    assert torch.isfinite(y).all()
    return float((y - ref).norm() / ref.norm())


def _setup(make_packed, h, i, q, g, device, seed=0):
    torch.manual_seed(seed)
    w = {
        "o": make_packed(h, h, g, seed=seed + 1, device=device),
        "gu": make_packed(h, 2 * i, g, seed=seed + 2, device=device),
        "dn": make_packed(i, h, g, seed=seed + 3, device=device),
        "qkv": make_packed(h, q, g, seed=seed + 4, device=device),
    }
    t = {
        "attn": (torch.randn(h) * 0.5).half().to(device),
        "res": (torch.randn(h) * 2).half().to(device),
        "post_w": (torch.rand(h) + 0.5).half().to(device),
        "in_w": (torch.rand(h) + 0.5).half().to(device),
    }
    return w, t


def _run(kern, w, t, h, i, q, device, final=False, head=False):
    f32, f16 = torch.float32, torch.float16
    bufs = {
        "o_acc": torch.zeros(h, dtype=f32, device=device),
        "dn_acc": torch.zeros(h, dtype=f32, device=device),
        "bars": torch.zeros(8, dtype=torch.int32, device=device),
        "act": torch.zeros(i, dtype=f16, device=device),
        "hmid": torch.zeros(h, dtype=f16, device=device),
        "res_out": torch.zeros(h, dtype=f16, device=device),
        "out": torch.zeros(h, dtype=f16, device=device),
        "q_acc": torch.zeros(q, dtype=f32, device=device),
    }
    trip = {n: (p["qweight"], p["sz"], p["zeros"]) for n, p in w.items()}
    if head:
        kern.launch(
            first=4,
            last=5,
            final=False,
            head=True,
            attn=None,
            o=None,
            res=None,
            gu=None,
            post_w=t["post_w"],
            act=bufs["act"],
            hmid=bufs["hmid"],
            dn=None,
            hin=t["res"],
            qkv=trip["qkv"],
            in_w=t["in_w"],
            q_acc=bufs["q_acc"],
            res_out=None,
            out=None,
            o_acc=bufs["o_acc"],
            dn_acc=bufs["dn_acc"],
            bars=bufs["bars"],
            eps=EPS,
        )
    else:
        kern.launch(
            first=0,
            last=4 if final else 5,
            final=final,
            head=False,
            attn=t["attn"],
            o=trip["o"],
            res=t["res"],
            gu=trip["gu"],
            post_w=t["post_w"],
            act=bufs["act"],
            hmid=bufs["hmid"],
            dn=trip["dn"],
            hin=bufs["hmid"],
            qkv=None if final else trip["qkv"],
            in_w=t["in_w"],
            q_acc=None if final else bufs["q_acc"],
            res_out=bufs["res_out"],
            out=bufs["out"],
            o_acc=bufs["o_acc"],
            dn_acc=bufs["dn_acc"],
            bars=bufs["bars"],
            eps=EPS,
        )
    return bufs


def _check(bufs, ref, final, head, tol):
    if head:
        assert _rel(bufs["q_acc"], ref["qkv"]) < tol
        return
    assert _rel(bufs["o_acc"], ref["o"]) < tol
    assert _rel(bufs["hmid"], ref["hmid"]) < tol
    assert _rel(bufs["act"], ref["act"]) < tol
    assert _rel(bufs["dn_acc"], ref["dn"]) < tol
    if final:
        assert _rel(bufs["out"], ref["final"]) < tol
    else:
        assert _rel(bufs["res_out"], ref["h"]) < tol
        assert _rel(bufs["q_acc"], ref["qkv"]) < tol


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize(
    ("h", "i", "q", "g", "final", "head"),
    [(256, 384, 512, 128, False, False), (128, 256, 192, 64, True, False), (256, 384, 512, 64, False, True)],
)
def test_layer_phases_match_torch_chain(make_packed, h, i, q, g, final, head):
    from lmkiln.kernels.persistent import LayerKernel, LayerShape

    kern = LayerKernel(LayerShape(h, i, q, g), torch.device("cpu"), ctas_per_sm=2)
    w, t = _setup(make_packed, h, i, q, g, "cpu")
    bufs = _run(kern, w, t, h, i, q, "cpu", final=final, head=head)
    ref = reference(w, t["attn"], t["res"], t["post_w"], t["in_w"], head_x=t["res"] if head else None)
    _check(bufs, ref, final, head, 2e-3)
    assert int(kern.cnt.abs().sum()) == 0  # the ordered gate/up reduction leaves its counters zeroed


def test_plan_split_balances_rounds():
    from lmkiln.kernels.persistent import plan_split

    s = plan_split(22016, 4096, 528)  # 7B gate/up over 4 CTAs on 132 SMs
    assert s.n_tiles == 344 and s.per * s.split >= 32
    rounds = -(-s.items // 528)
    assert rounds * (s.per + 1) <= 24  # vs 33 unsplit (344 items of 32 chunks)
    one = plan_split(64, 256, 4)
    assert (one.n_tiles, one.split, one.per) == (1, 2, 1)


def test_layer_kernel_rejects_shapes():
    from lmkiln.kernels.persistent import LayerKernel, LayerShape

    from lmkiln.errors import KernelInputError

    with pytest.raises(KernelInputError, match="multiple of 128"):
        LayerKernel(LayerShape(576, 1536, 960, 128), torch.device("cpu"))
    with pytest.raises(KernelInputError, match="group size"):
        LayerKernel(LayerShape(256, 384, 512, 32), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("h", "i", "q", "g", "final", "head"),
    [
        (1024, 2816, 3072, 128, False, False),
        (1024, 2816, 3072, 64, True, False),
        (1024, 2816, 3072, 128, False, True),
    ],
)
def test_layer_launch_matches_torch_chain_gpu(make_packed, h, i, q, g, final, head):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from lmkiln.kernels.persistent import LayerKernel, LayerShape

    dev = torch.device("cuda")
    kern = LayerKernel(LayerShape(h, i, q, g), dev)
    w, t = _setup(make_packed, h, i, q, g, "cuda")
    ref = reference(w, t["attn"], t["res"], t["post_w"], t["in_w"], head_x=t["res"] if head else None)
    for _ in range(3):  # barriers and counters are reusable once zeroed
        bufs = _run(kern, w, t, h, i, q, dev, final=final, head=head)
        torch.cuda.synchronize()
        _check(bufs, ref, final, head, 5e-3)
    assert int(kern.cnt.abs().sum()) == 0
