"""Perplexity on held-out text, and the quality gate of ``snakemake quantize``.

Protocol (the same for every model compared): the first ``n_tokens`` tokens of each text, tokenized
without special tokens, cut into non-overlapping windows of ``window`` tokens, each scored alone (optionally
with a BOS token in front); ``ppl = exp(mean NLL)`` over all predicted tokens, in fp32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmkiln.artifact import write_json_atomic
from lmkiln.errors import QualityGateError
from lmkiln.models.checkpoint import Checkpoint
from lmkiln.models.llama import CausalLM
from lmkiln.quant.rtn import QuantSpec, fake_quantize

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model: CausalLM, windows: torch.Tensor, batch_size: int = 4, desc: str = "ppl",
               progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``windows`` [n, L]: every token but each window's first is predicted."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch)[:, :-1].float()
        target = batch[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def rtn_model(model: CausalLM, spec: QuantSpec) -> CausalLM:
    """Fake-quantize every decoder linear of ``model`` in place with round-to-nearest."""
    for layer in model.model.layers:
        for lin in layer.named_linears().values():
            lin.weight.data = fake_quantize(lin.weight.data.float(), spec).to(lin.weight.dtype)
    return model


@dataclass(frozen=True)
class GateConfig:
    max_ppl_increase: float = 0.25  # AWQ ppl may exceed the reference by at most this fraction

    def check(self, results: dict[str, dict[str, float]]) -> list[str]:
        """Failures, each a sentence; empty when the gate passes."""
        failures = []
        for text, r in results.items():
            if r["awq"] >= r["rtn"]:
                failures.append(f"{text}: AWQ ppl {r['awq']:.3f} is not below RTN {r['rtn']:.3f}")
            bound = r["reference"] * (1 + self.max_ppl_increase)
            if r["awq"] > bound:
                failures.append(
                    f"{text}: AWQ ppl {r['awq']:.3f} exceeds reference {r['reference']:.3f} "
                    f"by more than {self.max_ppl_increase:.0%} (bound {bound:.3f})"
                )
        return failures


def evaluate(model_dir: str | Path, awq_dir: str | Path, windows: dict[str, torch.Tensor],
             out_json: str | Path, gate: GateConfig, device: str = "cpu", progress: bool = True) -> dict:
    """Perplexity of the reference, RTN and AWQ models on each text; write JSON; enforce the gate."""
    ref_ckpt, awq_ckpt = Checkpoint(model_dir), Checkpoint(awq_dir)
    qc = awq_ckpt.quantization_config or {}
    spec = QuantSpec(qc.get("bits", 4), qc.get("group_size", 128))
    results: dict[str, dict[str, float]] = {name: {} for name in windows}
    loaders = {
        "reference": lambda: CausalLM.from_checkpoint(ref_ckpt, torch.float32, device),
        "rtn": lambda: rtn_model(CausalLM.from_checkpoint(ref_ckpt, torch.float32, device), spec),
        "awq": lambda: CausalLM.from_checkpoint(awq_ckpt, torch.float32, device),
    }
    for kind, load in loaders.items():
        model = load()
        for name, w in windows.items():
            results[name][kind] = perplexity(model, w, desc=f"{kind}/{name}", progress=progress)
            log.info("ppl %-10s %-22s %.4f", kind, name, results[name][kind])
        del model
    for r in results.values():
        gap = r["rtn"] - r["reference"]
        r["gap_closed"] = (r["rtn"] - r["awq"]) / gap if gap > 0 else float("nan")
    failures = gate.check(results)
    report = {
        "protocol": {name: {"windows": int(w.shape[0]), "window_len": int(w.shape[1])}
                     for name, w in windows.items()},
        "group_size": spec.group_size,
        "results": results,
        "gate": {"max_ppl_increase": gate.max_ppl_increase, "passed": not failures, "failures": failures},
    }
    write_json_atomic(out_json, report)
    if failures:
        raise QualityGateError("quality gate failed: " + "; ".join(failures) +
                               f" (details in {out_json}); try --search-scale, more calibration "
                               "samples, or a smaller group size")
    return report


def format_table(report: dict) -> str:
    lines = [f"{'text':<22} {'reference':>10} {'rtn':>10} {'awq':>10} {'gap closed':>11}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<22} {r['reference']:>10.3f} {r['rtn']:>10.3f} {r['awq']:>10.3f} "
                     f"{r['gap_closed']:>10.0%}")
    return "\n".join(lines)
