"""``Int4Linear``: loading from packed tensors, the CPU reference path and the CUDA op path."""

from __future__ import annotations

import pytest
import torch
from lmkiln.kernels.reference import w4a16_matmul_ref

from lmkiln.errors import ArtifactError, QuantConfigError
from lmkiln.layers import Int4Linear


def test_from_packed_cpu_forward_any_leading_dims(make_packed) -> None:
    p = make_packed(256, 96, 64)
    bias = torch.randn(96).half()
    lin = Int4Linear.from_packed({f"l.{k}": v for k, v in p.items()} | {"l.bias": bias}, "l")
    assert (lin.in_features, lin.out_features, lin.group_size) == (256, 96, 64)
    x = torch.randn(2, 3, 256).half()
    y = lin(x)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float16
    torch.testing.assert_close(y, w4a16_matmul_ref(x, p["qweight"], p["sz"]) + bias)
    assert set(lin.state_dict()) == {"qweight", "sz", "zeros", "bias"}


def test_from_packed_errors(make_packed) -> None:
    p = make_packed(128, 64, 128)
    with pytest.raises(ArtifactError, match=r"no l\.sz"):
        Int4Linear.from_packed({"l.qweight": p["qweight"]}, "l")
    with pytest.raises(QuantConfigError, match="bias"):
        Int4Linear(p["qweight"], p["sz"], p["zeros"], torch.zeros(3))
    with pytest.raises(QuantConfigError, match="sz"):
        Int4Linear(p["qweight"], p["sz"].float(), p["zeros"])


def test_matmul_acc_is_the_plain_forward_off_cuda(make_packed) -> None:
    """Only the CUDA decode GEMV leaves its output pending in the float32 accumulator."""
    p = make_packed(256, 64, 64)
    lin = Int4Linear(p["qweight"], p["sz"], p["zeros"])
    x = torch.randn(2, 256).half()
    y, pending = lin.matmul_acc(x)
    assert not pending and torch.equal(y, lin(x)) and lin.acc is None


@pytest.mark.gpu
def test_matmul_acc_on_cuda(make_packed, monkeypatch) -> None:
    """A batch-1 fp16 decode row: the float32 accumulator holds ``x @ W`` (as forward, up to the order of the
    split-K sum) until add_rmsnorm consumes and zeroes it; more rows and LMKILN_ATOMIC_SPLITK=0 take the
    plain path."""
    from lmkiln.kernels.fused import add_rmsnorm

    p = make_packed(4096, 4096, 128, device="cuda")
    lin = Int4Linear(p["qweight"], p["sz"], p["zeros"]).cuda()
    w = torch.ones(4096, device="cuda", dtype=torch.float16)
    for _ in range(3):
        x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        y, pending = lin.matmul_acc(x)
        assert pending and y.dtype == torch.float32 and y.data_ptr() == lin.acc.data_ptr()
        want = lin(x)
        assert float((y.half().double() - want.double()).norm() / want.double().norm()) < 1e-3
        r = torch.randn_like(want)
        _, got_h = add_rmsnorm(y, r, w, 1e-5, consume=True)
        assert float((got_h.double() - (want + r).double()).norm() / (want + r).double().norm()) < 1e-3
        assert not lin.acc.any()
    for m in (2, 64):
        y, pending = lin.matmul_acc(torch.randn(m, 4096, device="cuda", dtype=torch.float16))
        assert not pending and y.dtype == torch.float16
    monkeypatch.setenv("LMKILN_ATOMIC_SPLITK", "0")
    assert not lin.matmul_acc(torch.randn(1, 4096, device="cuda", dtype=torch.float16))[1]


@pytest.mark.gpu
def test_cuda_forward_matches_reference(make_packed) -> None:
    p = make_packed(4096, 12288, 128, device="cuda")
    lin = Int4Linear(p["qweight"], p["sz"], p["zeros"], torch.randn(12288, device="cuda").half())
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        ref = w4a16_matmul_ref(x.float(), p["qweight"], p["sz"]).double() + lin.bias.double()
        y = lin(x)
        assert float((y.double() - ref).norm() / ref.norm()) < 2e-3, m


@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_up_silu_returns_the_mlp_activation(make_packed, with_bias) -> None:
    """``Int4GateUpSiLU.from_gate_up`` of a fused gate/up: forward is ``silu(gate) * up`` of the original
    linear's output (CPU reference path; the bias is added before the SiLU)."""
    from lmkiln.layers import Int4GateUpSiLU

    p = make_packed(256, 128, 64)
    bias = torch.randn(128) if with_bias else None
    lin = Int4Linear(p["qweight"], p["sz"], p["zeros"], bias)
    act = Int4GateUpSiLU.from_gate_up(lin)
    assert act.applies_silu and act.in_features == 256
    x = torch.randn(3, 256)
    gate, up = lin(x).chunk(2, dim=-1)
    torch.testing.assert_close(act(x), torch.nn.functional.silu(gate) * up)
