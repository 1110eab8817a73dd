"""The packed int4 layout: exact pack/unpack, fusion, the ``packed/`` artifact and its loader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.errors import ArtifactError, QuantConfigError
from lmkiln.quant.awq_format import dequantize_awq, pack_awq
from lmkiln.quant.pack import (
    LAYOUT,
    LAYOUT_VERSION,
    dequantize_packed,
    fuse_awq_along_n,
    load_packed,
    pack,
    pack_checkpoint,
    unpack,
    words_to_codes,
)


def _awq(k: int, n: int, g: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // g, n), generator=gen)
    scales = (torch.rand((k // g, n), generator=gen) * 0.05 + 1e-4).half()
    return pack_awq(codes, zeros, scales)


@settings(max_examples=25, deadline=None)
@given(
    kc=st.integers(1, 3), nb=st.integers(1, 4), g=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16)
)
def test_unpack_pack_is_exact(kc: int, nb: int, g: int, seed: int) -> None:
    a = _awq(128 * kc, 32 * nb, g, seed)
    qw, qz, s = unpack(pack(a["qweight"], a["qzeros"], a["scales"]))
    assert torch.equal(qw, a["qweight"]) and torch.equal(qz, a["qzeros"]) and torch.equal(s, a["scales"])


def test_layout_places_nibbles_as_documented() -> None:
    a = _awq(256, 64, 64, seed=3)
    p = pack(a["qweight"], a["qzeros"], a["scales"])
    from lmkiln.quant.awq_format import unpack_awq

    codes = unpack_awq(a["qweight"], a["qzeros"], a["scales"])[0]
    w = p["qweight"]
    for k, n in [(0, 0), (1, 0), (37, 5), (128 + 97, 33), (255, 63)]:
        chunk, within = divmod(k, 128)
        slice_, row = divmod(within, 32)
        r, e = divmod(row, 2)
        t = slice_ + 4 * e
        word = int(w[n // 32, chunk * 16 + r, n % 32])
        assert (word >> (4 * t)) & 0xF == int(codes[k, n])
    assert torch.equal(words_to_codes(w), codes)


def test_dequant_matches_awq() -> None:
    a = _awq(256, 96, 32, seed=1)
    p = pack(a["qweight"], a["qzeros"], a["scales"])
    ref = dequantize_awq(a["qweight"], a["qzeros"], a["scales"])
    # W = q*s + m with m = fp16(-z*s): equal to (q - z)*s up to the rounding of m
    assert float((dequantize_packed(p["qweight"], p["sz"]) - ref).abs().max()) <= 2e-3 * float(
        ref.abs().max()
    )


def test_fuse_along_n_is_exact() -> None:
    parts = [_awq(128, n, 64, seed=n) for n in (64, 32, 96)]
    fused = fuse_awq_along_n([(p["qweight"], p["qzeros"], p["scales"]) for p in parts])
    want = torch.cat([dequantize_awq(p["qweight"], p["qzeros"], p["scales"]) for p in parts], dim=1)
    assert torch.equal(dequantize_awq(*fused), want)
    with pytest.raises(QuantConfigError, match="different in_features"):
        fuse_awq_along_n(
            [(parts[0]["qweight"], parts[0]["qzeros"], parts[0]["scales"]), tuple(_awq(256, 32, 64).values())]
        )


@pytest.mark.parametrize(
    ("k", "n", "g", "match"),
    [
        (192, 32, 64, "multiple of the layout's K chunk 128"),
        (128, 48, 16, "group size 16 is not supported"),
        (128, 40, 64, "multiple of the layout's column block 32"),
    ],
)
def test_pack_refuses_bad_shapes(k: int, n: int, g: int, match: str) -> None:
    a = _awq(k, n, g)
    with pytest.raises(QuantConfigError, match=match):
        pack(a["qweight"], a["qzeros"], a["scales"])


# ----------------------------------------------------------------------------------------------------------
# Checkpoint level
# ----------------------------------------------------------------------------------------------------------

LINEARS = {  # name -> (K, N) for hidden 128, intermediate 256, 4 heads / 2 kv heads of 32
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (128, 64),
    "self_attn.v_proj": (128, 64),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (128, 256),
    "mlp.up_proj": (128, 256),
    "mlp.down_proj": (256, 128),
}


def _awq_dir(root: Path, bias: bool = False) -> Path:
    from safetensors.torch import save_file

    from lmkiln.artifact import write_manifest

    root.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(320, 128).half(),
        "model.norm.weight": torch.ones(128).half(),
        "lm_head.weight": torch.randn(320, 128).half(),
    }
    for i in range(2):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(128).half()
        for j, (name, (k, n)) in enumerate(LINEARS.items()):
            for key, v in _awq(k, n, 64, seed=10 * i + j).items():
                tensors[f"model.layers.{i}.{name}.{key}"] = v
            if bias and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                tensors[f"model.layers.{i}.{name}.bias"] = torch.randn(n).half()
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "awq"}})
    )
    (root / "tokenizer.json").write_text("{}")
    write_manifest(root, kind="awq", info={"group_size": 64})
    return root


def test_pack_checkpoint_roundtrip_and_reproducible(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    awq = _awq_dir(tmp_path / "awq", bias=True)
    out = pack_checkpoint(awq, tmp_path / "packed")
    tensors, manifest = load_packed(out)
    assert manifest["layout"] == LAYOUT and manifest["layout_version"] == LAYOUT_VERSION
    assert manifest["group_size"] == 64 and manifest["fused_sizes"]["self_attn.qkv_proj"] == [128, 64, 64]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    src = load_file(str(awq / "model.safetensors"))
    for i in range(2):
        base = f"model.layers.{i}"
        qkv = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"{base}.self_attn.qkv_proj.")}
        qw, _, _ = unpack(qkv)
        parts = [src[f"{base}.self_attn.{p}_proj.qweight"] for p in "qkv"]
        assert torch.equal(qw, torch.cat(parts, dim=1))
        assert torch.equal(qkv["bias"], torch.cat([src[f"{base}.self_attn.{p}_proj.bias"] for p in "qkv"]))
        assert f"{base}.mlp.gate_up_proj.qweight" in tensors and f"{base}.mlp.down_proj.sz" in tensors
        assert not any(".q_proj." in k for k in tensors)
    assert torch.equal(tensors["lm_head.weight"], src["lm_head.weight"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    out2 = pack_checkpoint(awq, tmp_path / "packed2")
    assert {p.name: p.read_bytes() for p in out2.iterdir()} == first


def test_load_packed_refuses_bad_hash_and_other_versions(tmp_path: Path) -> None:
    out = pack_checkpoint(_awq_dir(tmp_path / "awq"), tmp_path / "packed")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "layout_version": LAYOUT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="version"):
        load_packed(out)
    manifest_path.write_text(json.dumps({**manifest, "layout": "some-other-layout"}))
    with pytest.raises(ArtifactError, match="some-other-layout"):
        load_packed(out)
    manifest_path.write_text(json.dumps(manifest))
    load_packed(out)
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="sha256"):
        load_packed(out)


def test_pack_checkpoint_needs_an_awq_manifest(tmp_path: Path) -> None:
    awq = _awq_dir(tmp_path / "awq")
    (awq / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        pack_checkpoint(awq, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_gate_up_interleave_reorders_whole_column_blocks() -> None:
    """Blocks [g0, u0, g1, u1, ...] of 32 columns: the dequantized weight is the original's columns in that
    order, exactly; N must hold whole (gate, up) block pairs."""
    from lmkiln.quant.pack import gate_up_interleave, pack_codes

    g = torch.Generator().manual_seed(0)
    k, n = 128, 192
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // 64, n), generator=g, dtype=torch.uint8)
    scales = (torch.rand((k // 64, n), generator=g) * 0.02 + 0.004).half()
    p = pack_codes(codes, zeros, scales)
    bias = torch.arange(n, dtype=torch.float16)
    q, sz, z, b = gate_up_interleave(p["qweight"], p["sz"], p["zeros"], bias)
    order = torch.cat([torch.arange(c * 32, c * 32 + 32) for c in (0, 3, 1, 4, 2, 5)])
    assert torch.equal(dequantize_packed(q, sz), dequantize_packed(p["qweight"], p["sz"])[:, order])
    assert torch.equal(z, p["zeros"][:, order]) and torch.equal(b, bias[order])
    odd = pack_codes(codes[:, :96], zeros[:, :96], scales[:, :96])
    with pytest.raises(QuantConfigError, match="multiple of 64"):
        gate_up_interleave(odd["qweight"], odd["sz"], odd["zeros"])
