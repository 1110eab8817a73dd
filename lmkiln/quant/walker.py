"""Run calibration tokens through a checkpoint one decoder layer at a time.

Only one decoder layer's weights are resident at any moment; the hidden states of all calibration
sequences move from layer to layer. Calibration and AWQ both walk the model this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.llama import DecoderLayer, Rotary


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LayerStep:
    index: int
    layer: DecoderLayer
    x: torch.Tensor  # [S, T, H] layer input (fp32)
    cos: torch.Tensor
    sin: torch.Tensor


class LayerWalker:
    """Yield each decoder layer with its input; the caller sets ``step.x`` to the layer's output."""

    def __init__(self, ckpt: Checkpoint, tokens: torch.Tensor, device: torch.device,
                 batch_size: int = 8) -> None:
        self.ckpt, self.device, self.batch_size = ckpt, device, batch_size
        if device.type == "cuda":  # TF32 matmuls: ample precision for statistics and loss comparisons
            torch.set_float32_matmul_precision("high")
        embed = ckpt.get("model.embed_tokens.weight", torch.float32)
        self.x = torch.nn.functional.embedding(tokens, embed).to(device)
        del embed
        t = tokens.shape[1]
        rotary = Rotary(ckpt.config).to(device)
        self.cos, self.sin = rotary(torch.arange(t, device=device).unsqueeze(0), torch.float32)

    @torch.no_grad()
    def forward(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        """Layer output for many sequences, in batches to bound the attention's memory."""
        outs = [layer(x[i : i + self.batch_size], self.cos, self.sin)
                for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(outs)

    def __iter__(self) -> Iterator[LayerStep]:
        for i in range(self.ckpt.config.num_layers):
            layer = DecoderLayer.from_checkpoint(self.ckpt, i, torch.float32, self.device)
            layer.requires_grad_(False)
            step = LayerStep(i, layer, self.x, self.cos, self.sin)
            yield step
            self.x = step.x
            del layer, step
