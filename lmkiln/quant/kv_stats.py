"""Calibrated K statistics for quantized KV caches: ``kv_stats.safetensors`` in AWQ and packed directories.

What it holds: for decoder layer ``i``, ``model.layers.{i}.self_attn.k_mean``, the mean of the keys after
RoPE over the calibration tokens, ``[num_kv_heads, head_dim]`` float32. The engine subtracts it from K before
quantizing an int8 / int4 cache (see :mod:`lmkiln.engine.kv_cache`): attention is unchanged (each query's
scores move by one constant) while the per-token ranges shrink, because K's channels carry large means.
LMDeploy's ``lite calibrate`` kept offline KV parameters the same way (``kv_qparams``).

The AWQ step measures it on the calibration windows through the *quantized* layers (the model that will be
served) and writes the file beside the weights; ``pack`` copies it. A directory without the file (an RTN
build, a plain HF checkpoint) serves an uncentered cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lmkiln.artifact import save_safetensors_atomic
from lmkiln.errors import ArtifactError

log = logging.getLogger(__name__)

KV_STATS_FILE = "kv_stats.safetensors"
FILE_SUFFIX = "self_attn.k_mean"  # key suffix in kv_stats.safetensors


class KMeanHook:
    """Forward hook on a ``k_proj``: running sum of K after RoPE, per KV head and channel.

    ``cos``/``sin`` ``[1, T, head_dim]`` are the positions of the calibration windows (every batch holds
    whole windows of ``T`` tokens, starting at position 0)."""

    def __init__(self, num_kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.hk, self.d, self.cos, self.sin = num_kv_heads, head_dim, cos, sin
        self.sum: torch.Tensor | None = None
        self.count = 0

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        from lmkiln.models.llama import apply_rotary

        b, t, _ = out.shape
        k = out.detach().float().reshape(b, t, self.hk, self.d).transpose(1, 2)
        k = apply_rotary(k, self.cos[:, :t].float(), self.sin[:, :t].float())
        s = k.sum(dim=(0, 2), dtype=torch.float64)
        self.sum = s if self.sum is None else self.sum + s
        self.count += b * t

    def mean(self) -> torch.Tensor:
        if self.sum is None:
            raise ArtifactError("the K statistics saw no tokens (empty calibration set)")
        return (self.sum / self.count).float().cpu()


def file_key(layer: int) -> str:
    return f"model.layers.{layer}.{FILE_SUFFIX}"


def write_kv_stats(directory: str | Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """Write ``kv_stats.safetensors`` into ``directory`` (atomic; the same inputs give the same bytes)."""
    path = Path(directory) / KV_STATS_FILE
    meta = {"lmkiln": json.dumps({"what": "mean of K after RoPE per KV head and channel", **header},
                                 sort_keys=True)}
    save_safetensors_atomic(path, dict(sorted(tensors.items())), metadata=meta)
    return path


def load_kv_stats(
    model_dir: str | Path, num_layers: int, num_kv_heads: int, head_dim: int
) -> list[torch.Tensor] | None:
    """Per-layer K means ``[num_kv_heads, head_dim]`` from ``model_dir``, or None if it has no stats file."""
    from safetensors.torch import load_file

    path = Path(model_dir) / KV_STATS_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); rebuild the artifact") from e
    out = []
    for i in range(num_layers):
        t = tensors.get(file_key(i))
        if t is None or t.shape != (num_kv_heads, head_dim):
            got = "missing" if t is None else f"of shape {list(t.shape)}"
            raise ArtifactError(
                f"{path}: {file_key(i)} is {got}, the model needs [{num_kv_heads}, {head_dim}]; it was made "
                "for another model, rebuild the artifact (or delete the file to serve without K centering)"
            )
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: {file_key(i)} holds non-finite values; rebuild the artifact")
        out.append(t.float())
    return out
