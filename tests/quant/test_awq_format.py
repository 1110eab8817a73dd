"""AutoAWQ GEMM format: our packer against an independent bit-by-bit reading of the format."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.models import CausalLM, Checkpoint
from lmkiln.quant.awq_format import dequantize_awq, pack_int4_columns, unpack_int4_columns

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def reference_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing written out plainly: nibble i of int32 j holds column 8j + ORDER[i]."""
    rows, cols = codes.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for j in range(cols // 8):
        for i in range(8):
            out[:, j] |= codes[:, 8 * j + ORDER[i]].long() << (4 * i)
    return ((out + 2**31) % 2**32 - 2**31).to(torch.int32)  # reinterpret as signed int32


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), groups8=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_matches_reference_and_roundtrips(rows, groups8, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, groups8 * 8), generator=g, dtype=torch.uint8)
    packed = pack_int4_columns(codes)
    assert packed.dtype == torch.int32
    torch.testing.assert_close(packed, reference_pack(codes), rtol=0, atol=0)
    torch.testing.assert_close(unpack_int4_columns(packed), codes, rtol=0, atol=0)


def test_known_value():
    codes = torch.arange(8, dtype=torch.uint8).view(1, 8)  # column c holds code c
    # nibbles in order 0,2,4,6,1,3,5,7 -> hex digits from low to high: 0 2 4 6 1 3 5 7
    assert pack_int4_columns(codes).item() == 0x75316420


def test_checkpoint_made_elsewhere_reads_back(tmp_path, tiny_llama_dir):
    """An AWQ dir packed by the independent reference (as AutoAWQ would) loads as the right weights."""
    from safetensors.torch import load_file, save_file

    gs = 64
    src = load_file(str(tiny_llama_dir / "model.safetensors"))
    out, expect = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, t in src.items():
        if name.endswith("_proj.weight"):
            prefix = name[: -len(".weight")]
            k, n = t.shape[1], t.shape[0]
            codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
            zeros = torch.randint(0, 16, (k // gs, n), generator=g, dtype=torch.uint8)
            scales = (torch.rand(k // gs, n, generator=g) * 0.01 + 0.001).half()
            out[f"{prefix}.qweight"] = reference_pack(codes)
            out[f"{prefix}.qzeros"] = reference_pack(zeros)
            out[f"{prefix}.scales"] = scales
            w = (codes.float() - zeros.float().repeat_interleave(gs, 0)) * scales.float().repeat_interleave(
                gs, 0
            )
            expect[name] = w.t()
        else:
            out[name] = t.half()
    d = tmp_path / "autoawq"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"))
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": gs,
        "zero_point": True,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    model = CausalLM.from_checkpoint(Checkpoint(d))
    got = dict(model.named_parameters())
    for name, w in expect.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0)


def test_inconsistent_shapes_rejected():
    from lmkiln.errors import QuantConfigError

    with pytest.raises(QuantConfigError, match="inconsistent AWQ tensors"):
        dequantize_awq(
            torch.zeros(128, 2, dtype=torch.int32),
            torch.zeros(2, 3, dtype=torch.int32),
            torch.zeros(2, 16, dtype=torch.float16),
        )
