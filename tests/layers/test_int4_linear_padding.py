"""K not a multiple of the layout's chunk (SmolLM2: hidden 576): the packer pads, Int4Linear pads x."""

from __future__ import annotations

import pytest
import torch

from lmkiln.errors import QuantConfigError
from lmkiln.layers import Int4Linear
from lmkiln.quant.awq_format import dequantize_awq
from lmkiln.quant.pack import dequantize_packed, pack_state_dict
from lmkiln.quant.rtn import QuantSpec, to_awq_tensors


def _awq_layer(k: int, hidden: int, inter: int, g: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    spec = QuantSpec(4, g)
    shapes = {"self_attn.q_proj": (hidden, k), "self_attn.k_proj": (64, k), "self_attn.v_proj": (64, k),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, k), "mlp.up_proj": (inter, k),
              "mlp.down_proj": (hidden, inter)}
    out = {}
    for name, (n, kk) in shapes.items():
        for key, t in to_awq_tensors(torch.randn(n, kk), spec).items():
            out[f"model.layers.0.{name}.{key}"] = t
    return out


def test_padded_k_matches_the_unpadded_weights():
    tensors = _awq_layer(k=576, hidden=576, inter=1536)
    packed, info = pack_state_dict(tensors)
    assert info["padded_in_features"] == {"self_attn.qkv_proj": 576, "mlp.gate_up_proj": 576,
                                          "self_attn.o_proj": 576}
    x = torch.randn(3, 576)
    lin = Int4Linear.from_packed(packed, "model.layers.0.self_attn.o_proj", in_features=576)
    prefix = "model.layers.0.self_attn.o_proj"
    w = dequantize_packed(packed[f"{prefix}.qweight"], packed[f"{prefix}.sz"])
    assert w.shape == (640, 576) and not w[576:].any()  # the padded rows are exactly zero
    torch.testing.assert_close(lin(x), x @ w[:576], rtol=1e-5, atol=1e-5)
    # and the padded layer is the AWQ weight up to the fp16 rounding of m = -z*s
    w_awq = dequantize_awq(*(tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales")))
    torch.testing.assert_close(w[:576], w_awq, rtol=0, atol=2e-3)
    with pytest.raises(QuantConfigError, match="expects 576 input features"):
        lin(torch.randn(3, 640))
