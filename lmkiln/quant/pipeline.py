"""The quantize pipeline's steps, shared by the CLI and the Snakemake rules (one implementation)."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkiln.errors import ArtifactError
from lmkiln.models.checkpoint import Checkpoint
from lmkiln.quant.awq import AWQConfig, awq_quantize
from lmkiln.quant.calibrate import calibrate, load_act_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibSpec:
    dataset: str = "ptb"
    samples: int = 128
    seqlen: int = 1024
    seed: int = 0
    text_dir: Path | None = None


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    from lmkiln.errors import ModelError

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {model_dir} ({e}); the directory needs "
                         "tokenizer.json or tokenizer.model with tokenizer_config.json") from e


def calib_tokens(model_dir: str | Path, spec: CalibSpec) -> tuple[torch.Tensor, dict]:
    """Deterministic calibration windows ``[samples, seqlen]`` and a description of where they came from."""
    from lmkiln.data.calib import calib_token_windows, load_text

    ckpt_cfg = Checkpoint(model_dir).config
    text = load_text(spec.dataset, spec.text_dir)
    tokens = calib_token_windows(load_tokenizer(model_dir), text, spec.samples, spec.seqlen, spec.seed,
                                 ckpt_cfg.max_position_embeddings)
    meta = {"dataset": spec.dataset, "seed": spec.seed,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    return tokens, meta


def run_calibrate(model_dir: str | Path, spec: CalibSpec, out_path: str | Path,
                  device: str | None = None) -> Path:
    tokens, meta = calib_tokens(model_dir, spec)
    return calibrate(model_dir, tokens, out_path, meta, device)


def run_awq(model_dir: str | Path, stats_path: str | Path, out_dir: str | Path, cfg: AWQConfig,
            text_dir: Path | None = None, device: str | None = None) -> Path:
    """AWQ from a calibration artifact: its header says which windows to rebuild."""
    _, header = load_act_stats(stats_path)
    spec = CalibSpec(header["dataset"], header["samples"], header["seqlen"], header["seed"], text_dir)
    tokens, meta = calib_tokens(model_dir, spec)
    if meta["text_sha256"] != header.get("text_sha256"):
        raise ArtifactError(f"the calibration text {spec.dataset!r} changed since {stats_path} was "
                            "computed; re-run calibrate")
    return awq_quantize(model_dir, stats_path, tokens, out_dir, cfg, device)


def auto_awq(model_dir: str | Path, spec: CalibSpec, out_dir: str | Path, cfg: AWQConfig,
             stats_path: str | Path | None = None, device: str | None = None) -> Path:
    """LMDeploy's ``lite auto_awq``: calibrate, then AWQ, in one call."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(stats_path) if stats_path else Path(tmp) / "act_stats.safetensors"
        run_calibrate(model_dir, spec, stats, device)
        out = run_awq(model_dir, stats, out_dir, cfg, spec.text_dir, device)
    log.info("auto_awq finished in %.1f s", time.perf_counter() - t0)
    return out
