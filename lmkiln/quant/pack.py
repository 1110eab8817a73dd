"""The packed W4A16 kernel layout (``lmkiln-w4-tiled`` version 1): pack / unpack and the ``packed/`` artifact.

One linear ``y = x @ W`` with ``W`` of shape ``[K, N]`` (``K`` = in_features) is stored as three tensors::

    qweight  int32    [N // 32, K // 8, 32]   4-bit codes, column-blocked and K-interleaved (below)
    sz       float16  [K // G, N, 2]          per (group, column) the pair (s, m) with m = fp16(-z * s)
    zeros    uint8    [K // G, N]             integer zero points (exact unpack; small-M kernels fold them)

    W[k, n] = q[k, n] * s[k // G, n] + m[k // G, n]          (one FMA; exact in float32)

``qweight[b, r, c]`` holds column ``n = 32 * b + c``. Inside one int32 word, nibble ``t`` (bits ``4t..4t+3``)
holds row ``k = 128 * (r // 16) + 32 * (t % 4) + 2 * (r % 16) + t // 4``: a run of 16 word-rows covers one
*chunk* of 128 rows, split into four 32-row *slices*; nibbles ``t`` and ``t + 4`` of a word are the adjacent
rows ``k, k + 1`` of slice ``t % 4``. So

* a kernel tile of 128 rows x ``BN`` columns (``BN`` a multiple of 32) is ``BN / 32`` contiguous runs of
  2 KiB each, loaded with 16-byte vector loads;
* ``(word >> 4t) & 0x000F000F | 0x64006400`` turns one word into a half2 ``(1024 + q[k], 1024 + q[k+1])`` with
  two bit operations: exactly the pair of consecutive-k values that one register of an MMA B fragment holds,
  and the four slices of a chunk are plain ``[32, BN]`` tiles (one ``tl.dot`` each, or joined into one).

See ``docs/layout.md`` for a diagram. ``pack`` / ``unpack`` convert one linear (or several fused along N with
:func:`fuse_awq_along_n`) between the AutoAWQ GEMM tensors and this layout; ``unpack(pack(x)) == x`` exactly.
:func:`pack_checkpoint` turns a whole AWQ checkpoint into a ``packed/`` artifact directory and
:func:`load_packed` reads one back, refusing other layouts, versions or hashes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmkiln.errors import ArtifactError, QuantConfigError
from lmkiln.quant.awq_format import pack_int4_columns, unpack_awq

log = logging.getLogger(__name__)

LAYOUT = "lmkiln-w4-tiled"
LAYOUT_VERSION = 1
PACK_N = 32  # columns per contiguous column block
PACK_K = 128  # rows per K chunk (the nibble-interleave period)
GATE_UP_BLOCK = PACK_N  # gate_up_interleave: columns per gate (then up) block
SLICE_K = (
    PACK_K // 4
)  # rows per slice (32): nibbles (t, t + 4) of word-row r are rows (2r, 2r + 1) of slice t
WORD_ROWS = PACK_K // 8  # word-rows per chunk (16)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
PACKED_SUFFIXES = ("qweight", "sz", "zeros")
MODEL_FILE = "model.safetensors"

# q/k/v and gate/up are fused along N, so each decoder layer needs 2 + 2 GEMMs.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
SINGLE_LINEARS: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")


def layout_info() -> dict[str, Any]:
    """What a ``packed`` manifest records about the layout (compared again by :func:`load_packed`)."""
    return {
        "layout": LAYOUT,
        "layout_version": LAYOUT_VERSION,
        "tile": {
            "pack_n": PACK_N,
            "pack_k": PACK_K,
            "word": "int32",
            "nibble_rows": "k = 128*(r//16) + 32*(t%4) + 2*(r%16) + t//4 for nibble t of word-row r",
            "fp16_magic": "0x64006400 (nibbles t, t+4 = rows k, k+1)",
        },
        "dequant": "W = q*s + m with (s, m=-z*s) fp16 pairs",
        "dtypes": {"qweight": "int32", "sz": "float16", "zeros": "uint8"},
    }


def check_packable(k: int, n: int, group_size: int) -> None:
    """Raise :class:`QuantConfigError` unless a ``[K, N]`` weight with this group size fits the layout."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantConfigError(
            f"group size {group_size} is not supported by the {LAYOUT} layout; use one of "
            f"{SUPPORTED_GROUP_SIZES} when quantizing (quant.group_size in config.yaml)"
        )
    if k % PACK_K or k % group_size:
        raise QuantConfigError(
            f"in_features K={k} must be a multiple of the layout's K chunk {PACK_K} and of the group size "
            f"{group_size}; this model's shape cannot use the packed int4 kernels"
        )
    if n % PACK_N:
        raise QuantConfigError(
            f"out_features N={n} must be a multiple of the layout's column block {PACK_N}; "
            "this model's shape cannot use the packed int4 kernels"
        )


def _codes_to_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[K, N]`` -> int32 words ``[N/32, K/8, 32]`` (see module docstring)."""
    k, n = codes.shape
    # k = 128*chunk + 32*tp + 2*rr + e, nibble = 4*e + tp
    c = codes.to(torch.int64).reshape(k // PACK_K, 4, WORD_ROWS, 2, n // PACK_N, PACK_N)
    c = c.permute(4, 0, 2, 5, 3, 1).reshape(n // PACK_N, k // PACK_K, WORD_ROWS, PACK_N, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (c << shifts).sum(dim=-1)  # < 2**32, fits int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32 two's complement
    return words.to(torch.int32).reshape(n // PACK_N, k // 8, PACK_N).contiguous()


def words_to_codes(words: torch.Tensor) -> torch.Tensor:
    """int32 words ``[N/32, K/8, 32]`` -> uint8 codes ``[K, N]`` (inverse of the packing order)."""
    nb, kw, pn = words.shape
    k, n = kw * 8, nb * pn
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # [b, K/8, c, nibble]
    nib = nib.reshape(nb, k // PACK_K, WORD_ROWS, pn, 2, 4)  # [b, chunk, rr, c, e, tp]
    return nib.permute(1, 5, 2, 4, 0, 3).reshape(k, n).to(torch.uint8)


def pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of one linear -> ``{"qweight", "sz", "zeros"}`` in the packed layout."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise QuantConfigError(
            f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}; "
            "is this an AutoAWQ GEMM checkpoint?"
        )
    if scales.dtype != torch.float16:
        raise QuantConfigError(f"AWQ scales must be float16, got {scales.dtype}")
    codes, zeros, s, _ = unpack_awq(qweight.cpu(), qzeros.cpu(), scales.cpu())
    return pack_codes(codes, zeros, s)


def pack_codes(codes: torch.Tensor, zeros: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer codes ``[K, N]``, zeros and fp16 scales ``[K/G, N]`` -> packed tensors (any device)."""
    k, n = codes.shape
    if zeros.shape != s.shape or zeros.shape[1] != n or zeros.shape[0] == 0 or k % zeros.shape[0]:
        raise QuantConfigError(
            f"codes {tuple(codes.shape)}, zeros {tuple(zeros.shape)} and scales {tuple(s.shape)} do not match"
        )
    group_size = k // zeros.shape[0]
    check_packable(k, n, group_size)
    s32 = s.float()
    if not torch.isfinite(s32).all():
        raise QuantConfigError("AWQ scales contain inf/NaN; re-run the AWQ step (the checkpoint is broken)")
    m = (-zeros.float() * s32).to(torch.float16)
    if not torch.isfinite(m).all():
        raise QuantConfigError("the fused zero term -z*s overflows float16; re-run AWQ with smaller scales")
    # small-M kernels recover z = rint(-m / s) from the pair; make sure that is exact for every group
    recovered = (-m.float() / s32 - zeros.float()).abs() < 0.25
    if not (recovered | (s32 == 0)).all():
        raise QuantConfigError(
            "some AWQ scales are too small for the zero point to be recovered from (s, -z*s) in float16; "
            "re-run the awq step (scales should be >= 1e-5)"
        )
    return {
        "qweight": _codes_to_words(codes),
        "sz": torch.stack([s.to(torch.float16), m], dim=-1).contiguous(),
        "zeros": zeros.to(torch.uint8).contiguous(),
    }


def unpack(packed: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed tensors -> AutoAWQ ``(qweight, qzeros, scales)``: the exact inverse of :func:`pack`."""
    check_packed_tensors(packed["qweight"], packed["sz"], packed.get("zeros"))
    codes = words_to_codes(packed["qweight"])
    zeros = packed["zeros"]
    return (
        pack_int4_columns(codes),
        pack_int4_columns(zeros.to(torch.int32)),
        packed["sz"][..., 0].contiguous(),
    )


def check_packed_tensors(
    qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor | None = None
) -> tuple[int, int, int]:
    """Validate a packed linear's tensors; return ``(K, N, group_size)``."""
    if qweight.dtype != torch.int32 or qweight.dim() != 3 or qweight.shape[2] != PACK_N:
        raise ArtifactError(
            f"packed qweight must be int32 [N/{PACK_N}, K/8, {PACK_N}], got {qweight.dtype} "
            f"{tuple(qweight.shape)}; the file was not written by this lmkiln's pack step, rebuild it"
        )
    n, k = qweight.shape[0] * PACK_N, qweight.shape[1] * 8
    if sz.dtype != torch.float16 or sz.dim() != 3 or sz.shape[1:] != (n, 2) or sz.shape[0] == 0:
        raise ArtifactError(
            f"packed sz must be float16 [K/G, {n}, 2] for qweight {tuple(qweight.shape)}, got {sz.dtype} "
            f"{tuple(sz.shape)}; rebuild the packed artifact"
        )
    if k % sz.shape[0]:
        raise ArtifactError(
            f"K={k} is not a multiple of the {sz.shape[0]} groups in sz; rebuild the artifact"
        )
    group_size = k // sz.shape[0]
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (sz.shape[0], n)):
        raise ArtifactError(
            f"packed zeros must be uint8 [{sz.shape[0]}, {n}], got {zeros.dtype} {tuple(zeros.shape)}"
        )
    try:
        check_packable(k, n, group_size)
    except QuantConfigError as e:
        raise ArtifactError(f"packed tensors have an unsupported shape: {e}") from e
    return k, n, group_size


def fuse_awq_along_n(
    linears: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate AWQ ``(qweight, qzeros, scales)`` of linears sharing an input along N (exact)."""
    if not linears:
        raise QuantConfigError("fuse_awq_along_n needs at least one linear")
    k, groups = linears[0][0].shape[0], linears[0][2].shape[0]
    for qw, qz, s in linears:
        if qw.shape[0] != k or s.shape[0] != groups or qz.shape[0] != groups:
            raise QuantConfigError(
                "cannot fuse linears with different in_features or group sizes: "
                + ", ".join(str((tuple(a.shape), tuple(b.shape), tuple(c.shape))) for a, b, c in linears)
            )
    return (
        torch.cat([t[0] for t in linears], dim=1),
        torch.cat([t[1] for t in linears], dim=1),
        torch.cat([t[2] for t in linears], dim=1),
    )


def check_gate_up_width(n: int) -> None:
    """An interleaved gate/up (weight or output) has ``2I`` columns: whole (gate, up) block pairs."""
    if n % (2 * GATE_UP_BLOCK):
        raise QuantConfigError(
            f"an interleaved gate/up has a multiple of {2 * GATE_UP_BLOCK} columns (whole gate and up blocks "
            f"of {GATE_UP_BLOCK}), got {n}"
        )


def gate_up_interleave(
    qweight: torch.Tensor, sz: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A fused gate/up linear (outputs ``[gate (I) | up (I)]``) with its columns reordered into blocks
    ``[g_0, u_0, g_1, u_1, ...]`` of :data:`GATE_UP_BLOCK` columns, so that a GEMM tile of 64 columns holds
    a gate block and its up block and can write ``silu(gate) * up`` itself (the engine's decode GEMV).

    Whole column blocks of the tiled layout move, so this is an index copy, exact. New tensors."""
    n = check_packed_tensors(qweight, sz, zeros)[1]
    check_gate_up_width(n)
    nb = n // (2 * GATE_UP_BLOCK)  # gate blocks (= up blocks)
    blocks = torch.stack([torch.arange(nb), nb + torch.arange(nb)], dim=1).reshape(-1)  # g0 u0 g1 u1 ...
    cols = (blocks[:, None] * GATE_UP_BLOCK + torch.arange(GATE_UP_BLOCK)).reshape(-1)
    q = qweight.index_select(0, blocks.to(qweight.device))
    cols = cols.to(sz.device)
    out_bias = None if bias is None else bias.index_select(0, cols.to(bias.device))
    return q, sz.index_select(1, cols), zeros.index_select(1, cols), out_bias


def dequantize_packed(qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """``W [K, N]`` in float32 (exact: ``q * s + m``)."""
    _, _, g = check_packed_tensors(qweight, sz)
    codes = words_to_codes(qweight).float()
    s = sz[..., 0].float().repeat_interleave(g, dim=0)
    m = sz[..., 1].float().repeat_interleave(g, dim=0)
    return codes * s + m


# ----------------------------------------------------------------------------------------------------------
# Checkpoint level
# ----------------------------------------------------------------------------------------------------------


def _layer_indices(names: Sequence[str]) -> list[int]:
    out = set()
    for name in names:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            out.add(int(parts[2]))
    return sorted(out)


def _awq_triple(tensors: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, ...]:
    try:
        return tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
    except KeyError as e:
        raise ArtifactError(
            f"the AWQ checkpoint has no {e.args[0]}; it is not a complete AutoAWQ GEMM checkpoint "
            "(re-run the awq step)"
        ) from None


def pack_state_dict(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pack every quantized linear of a decoder (fusing q/k/v and gate/up); pass the rest through."""
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    fused_sizes: dict[str, list[int]] = {}
    padded_in: dict[str, int] = {}
    group_size = None
    for i in _layer_indices(list(tensors)):
        base = f"model.layers.{i}"
        jobs: list[tuple[str, tuple[str, ...]]] = [(f, parts) for f, parts in FUSED_LINEARS.items()]
        jobs += [(s, (s,)) for s in SINGLE_LINEARS]
        for target, parts in jobs:
            triples = [_awq_triple(tensors, f"{base}.{p}") for p in parts]
            sizes = [t[2].shape[1] for t in triples]
            if len(parts) > 1:
                prev = fused_sizes.setdefault(target, sizes)
                if prev != sizes:
                    raise ArtifactError(f"layer {i} {target} parts have sizes {sizes}, layer 0 had {prev}")
            qw, qz, sc = fuse_awq_along_n(triples)
            k = qw.shape[0]
            if k % PACK_K:  # e.g. hidden 576: zero rows with zero (s, m) pairs contribute exactly 0
                padded_in[target] = k
                qw, qz, sc = pad_awq_k(qw, qz, sc, -k % PACK_K)
            packed = pack(qw, qz, sc)
            g = packed["qweight"].shape[1] * 8 // packed["sz"].shape[0]
            if group_size is None:
                group_size = g
            elif g != group_size:
                raise ArtifactError(f"{base}.{target} has group size {g}, others {group_size}")
            for key, value in packed.items():
                out[f"{base}.{target}.{key}"] = value
            biases = [tensors.get(f"{base}.{p}.bias") for p in parts]
            if any(b is not None for b in biases):
                if any(b is None for b in biases):
                    raise ArtifactError(f"{base}: some of {parts} have a bias and some do not")
                out[f"{base}.{target}.bias"] = torch.cat([b.to(torch.float16) for b in biases]).contiguous()
            for p in parts:
                consumed.update(f"{base}.{p}.{x}" for x in ("qweight", "qzeros", "scales", "bias"))
    for name, t in tensors.items():
        if name not in consumed:
            out[name] = t.contiguous()
    if group_size is None:
        raise ArtifactError("no quantized decoder layers (model.layers.N.*.qweight) found in the checkpoint")
    return out, {
        "group_size": group_size,
        "fused": {k: list(v) for k, v in FUSED_LINEARS.items()},
        "fused_sizes": fused_sizes,
        "padded_in_features": padded_in,
    }


def pad_awq_k(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``pad`` zero rows of K (code 0, zero 0, scale 0) to AWQ tensors: the added weights are 0.

    The layout needs K to be a multiple of its chunk; :class:`lmkiln.layers.Int4Linear` pads the
    activations with zeros to match (``in_features`` keeps the real K).
    """
    k, g = qweight.shape[0], qweight.shape[0] // scales.shape[0]
    if pad % g:
        raise QuantConfigError(f"cannot pad K={k} by {pad}: not a multiple of the group size {g}")
    return (
        torch.nn.functional.pad(qweight, (0, 0, 0, pad)),
        torch.nn.functional.pad(qzeros, (0, 0, 0, pad // g)),
        torch.nn.functional.pad(scales, (0, 0, 0, pad // g)),
    )


def pack_checkpoint(awq_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert an AWQ checkpoint directory into a ``packed`` artifact directory (atomic, reproducible)."""
    from safetensors.torch import load_file

    from lmkiln.artifact import (
        MANIFEST,
        read_manifest,
        save_safetensors_atomic,
        sha256_file,
        staged_dir,
        write_manifest,
    )

    awq_dir, out_dir = Path(awq_dir), Path(out_dir)
    awq_manifest = read_manifest(awq_dir, kind="awq")
    model_path = awq_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"{awq_dir} has no {MODEL_FILE}; re-run the awq step")
    tensors = load_file(str(model_path))
    packed, info = pack_state_dict(tensors)
    log.info(
        "packing %s: %d tensors -> %d (group size %d)", awq_dir, len(tensors), len(packed), info["group_size"]
    )

    with staged_dir(out_dir) as tmp:
        # one metadata key only: safetensors keeps metadata in a hash map, so several keys can be written
        # in a different order on every run (the layout is recorded in manifest.json instead)
        save_safetensors_atomic(tmp / MODEL_FILE, dict(sorted(packed.items())), metadata={"format": "pt"})
        for f in sorted(awq_dir.iterdir()):
            if f.is_file() and f.name not in (MANIFEST, MODEL_FILE) and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        write_manifest(
            tmp,
            kind="packed",
            info={
                "format": "lmkiln-packed",
                **layout_info(),
                "bits": 4,
                "group_size": info["group_size"],
                "fused": info["fused"],
                "fused_sizes": info["fused_sizes"],
                "padded_in_features": info["padded_in_features"],
                "source": {
                    "awq_model_sha256": sha256_file(model_path),
                    "awq_manifest_sha256": sha256_file(awq_dir / MANIFEST),
                    "awq_group_size": awq_manifest.get("group_size"),
                },
            },
        )
    return out_dir


def load_packed(packed_dir: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``packed`` artifact: ``(tensors, manifest)``; refuse other layouts, versions or bad hashes."""
    from safetensors.torch import load_file

    from lmkiln.artifact import read_manifest

    packed_dir = Path(packed_dir)
    manifest = read_manifest(packed_dir, kind="packed", verify=verify)
    if manifest.get("layout") != LAYOUT or manifest.get("layout_version") != LAYOUT_VERSION:
        raise ArtifactError(
            f"{packed_dir} uses layout {manifest.get('layout')!r} "
            f"version {manifest.get('layout_version')!r}, "
            f"but this lmkiln reads {LAYOUT!r} version {LAYOUT_VERSION}; rebuild it with "
            "`snakemake quantize` (the pack rule) or use the lmkiln version that wrote it"
        )
    tile = manifest.get("tile", {})
    if tile.get("pack_n") != PACK_N or tile.get("pack_k") != PACK_K:
        raise ArtifactError(
            f"{packed_dir} has tile {tile}, expected pack_n={PACK_N} pack_k={PACK_K}; rebuild it"
        )
    tensors = load_file(str(packed_dir / MODEL_FILE))
    for name in tensors:
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            _, _, g = check_packed_tensors(
                tensors[name], tensors[f"{prefix}.sz"], tensors.get(f"{prefix}.zeros")
            )
            if g != manifest.get("group_size"):
                raise ArtifactError(
                    f"{prefix} has group size {g} but the manifest says {manifest.get('group_size')}"
                )
    return tensors, manifest


def packed_summary(manifest: Mapping[str, Any]) -> str:
    """One line describing a packed manifest (for logs)."""
    return json.dumps({k: manifest.get(k) for k in ("layout", "layout_version", "group_size", "fused_sizes")})
