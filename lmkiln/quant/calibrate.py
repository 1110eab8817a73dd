"""Calibration: per-channel activation statistics of every linear layer's input.

Output (``act_stats.safetensors``): for decoder layer ``i`` and linear ``name`` (HF naming),
``model.layers.{i}.{name}.absmean`` and ``.absmax`` (fp32, one value per input channel), plus a JSON
metadata header (model hash, dataset, samples, seqlen, seed, token count). AWQ reads its ``x_mean``
from here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmkiln.artifact import save_safetensors_atomic
from lmkiln.errors import ArtifactError
from lmkiln.models.checkpoint import Checkpoint
from lmkiln.quant.walker import LayerWalker, pick_device

log = logging.getLogger(__name__)


class _Stats:
    """Running sum of |x| and max |x| per channel of a linear's input."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.count = 0

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs()
        s, m = x.sum(0, dtype=torch.float64), x.amax(0)
        self.sum = s if self.sum is None else self.sum + s
        self.max = m if self.max is None else torch.maximum(self.max, m)
        self.count += x.shape[0]


@torch.no_grad()
def collect_act_stats(ckpt: Checkpoint, tokens: torch.Tensor, device: str | None = None,
                      progress: bool = True) -> dict[str, torch.Tensor]:
    dev = pick_device(device)
    walker = LayerWalker(ckpt, tokens, dev)
    out: dict[str, torch.Tensor] = {}
    for step in tqdm(walker, total=ckpt.config.num_layers, desc="calibrate", disable=not progress):
        stats = {name: _Stats() for name in step.layer.named_linears()}
        handles = [lin.register_forward_pre_hook(stats[name].hook)
                   for name, lin in step.layer.named_linears().items()]
        step.x = walker.forward(step.layer, step.x)
        for h in handles:
            h.remove()
        for name, st in stats.items():
            key = f"model.layers.{step.index}.{name}"
            out[f"{key}.absmean"] = (st.sum / st.count).float().cpu()
            out[f"{key}.absmax"] = st.max.cpu()
    return out


def calibrate(model_dir: str | Path, tokens: torch.Tensor, out_path: str | Path, meta: dict,
              device: str | None = None) -> Path:
    """Collect statistics for ``tokens`` ([samples, seqlen]) and write them atomically to ``out_path``."""
    ckpt = Checkpoint(model_dir)
    stats = collect_act_stats(ckpt, tokens, device)
    header = {
        "model_hash": ckpt.source_hash(),
        "samples": int(tokens.shape[0]),
        "seqlen": int(tokens.shape[1]),
        "tokens": int(tokens.numel()),
        **meta,
    }
    save_safetensors_atomic(out_path, stats, metadata={"lmkiln": json.dumps(header, sort_keys=True)})
    log.info("wrote %d statistics over %d tokens to %s", len(stats), tokens.numel(), out_path)
    return Path(out_path)


def load_act_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Statistics and their header; a clear error if the file is not a calibration artifact."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"calibration statistics {path} not found; run the calibrate step first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        raise ArtifactError(f"{path} is not a readable safetensors file ({e}); re-run calibrate") from e
    if "lmkiln" not in meta:
        raise ArtifactError(f"{path} has no lmkiln header: it was not written by `lmkiln calibrate`")
    return tensors, json.loads(meta["lmkiln"])
