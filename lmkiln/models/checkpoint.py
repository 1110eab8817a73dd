"""Lazy access to the tensors of an HF checkpoint (single or sharded safetensors, mmap'd).

A decoder layer's tensors are read only when asked for, so a checkpoint larger than host RAM is never
held in memory at once. AWQ checkpoints (``qweight``/``qzeros``/``scales``) read back as dequantized
weights through :meth:`Checkpoint.linear_weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmkiln.artifact import sha256_file
from lmkiln.errors import ModelError
from lmkiln.models.config import ModelConfig


class Checkpoint:
    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.dir)
        self._files = self._weight_files()
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        from safetensors import safe_open

        for f in self._files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError is not importable under one stable name
                raise ModelError(
                    f"{f} is not a readable safetensors file ({e}); the download or conversion is "
                    "corrupt: re-create the checkpoint"
                ) from e
            self._handles[f] = h
            for name in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self._index[name] = f
        raw = json.loads((self.dir / "config.json").read_text())
        self.quantization_config: dict | None = raw.get("quantization_config")

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise ModelError(f"{index} is unreadable or has no weight_map: {e}") from e
            files = sorted({self.dir / v for v in weight_map.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            bins = list(self.dir.glob("*.bin")) + list(self.dir.glob("*.pt"))
            hint = (
                " (found PyTorch .bin weights: convert them to safetensors first)" if bins else ""
            )
            raise ModelError(f"no *.safetensors weights in {self.dir}{hint}")
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"shards listed in the index are missing: {', '.join(map(str, missing))}")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def keys(self) -> list[str]:
        return sorted(self._index)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        f = self._index.get(name)
        if f is None:
            raise ModelError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        try:
            t = self._handles[f].get_tensor(name)
        except Exception as e:
            raise ModelError(f"cannot read tensor {name!r} from {f} ({e}): the file is corrupt") from e
        return t.to(dtype) if dtype is not None else t

    def is_awq(self, prefix: str) -> bool:
        return f"{prefix}.qweight" in self._index

    def linear_weight(self, prefix: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``nn.Linear``-shaped weight ``[out, in]``, dequantized if the checkpoint stores AWQ tensors."""
        if self.is_awq(prefix):
            from lmkiln.quant.awq_format import dequantize_awq

            w = dequantize_awq(self.get(f"{prefix}.qweight"), self.get(f"{prefix}.qzeros"),
                               self.get(f"{prefix}.scales"), dtype=dtype)
            return w.t().contiguous()
        return self.get(f"{prefix}.weight", dtype)

    def source_hash(self) -> str:
        """sha256 over config.json and the weight files (names and contents)."""
        import hashlib

        h = hashlib.sha256()
        for f in [self.dir / "config.json", *self._files]:
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        return h.hexdigest()

    @property
    def weight_files(self) -> list[Path]:
        return list(self._files)
