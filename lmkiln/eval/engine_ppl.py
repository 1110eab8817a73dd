"""Perplexity through the serving engine: the paged forward, KV cache (fp / int8 / int4) and all.

Same protocol as :mod:`lmkiln.eval.ppl` (non-overlapping windows, each scored alone, ``exp(mean NLL)``), but
every window is prefilled through :class:`~lmkiln.engine.model_runner.ModelRunner` in chunks of at most
``chunk`` tokens, so later chunks attend over K/V read back from the paged cache, quantized when
``quant_policy`` is 8 or 4. So the int4 artifact's ppl through the engine can be compared with
``results/<model>/eval/ppl.json`` and the KV quantization's cost measured. Quantized caches keep each
window's position 0 exact in an attention-sink entry, as the scheduler does for requests
(``kv_sink_entries``; 0 scores without them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmkiln.engine.config import EngineConfig
from lmkiln.engine.errors import CacheMemoryError
from lmkiln.engine.llm_engine import LLMEngine
from lmkiln.engine.loader import LoadedModel, load_model
from lmkiln.engine.outputs import ScheduledSequence, SchedulerOutput
from lmkiln.engine.sampling_params import SamplingParams
from lmkiln.engine.sequence import Sequence
from lmkiln.errors import QualityGateError

log = logging.getLogger(__name__)

# Allowed ppl increases: the engine's kv0 ppl vs eval/ppl.json, and KV int8 / int4 vs kv0.
TOLERANCES = {"engine_vs_eval": 0.01, "kv8": 0.005, "kv4": 0.03}


@torch.inference_mode()
def engine_perplexity(
    engine: LLMEngine, windows: torch.Tensor, chunk: int = 128, step_tokens: int = 1024
) -> float:
    """``exp(mean NLL)`` of ``windows [n, L]`` through the engine's paged forward (the engine must be idle).

    Each window is prefilled in chunks of at most ``chunk`` tokens; windows go through together, up to
    ``step_tokens`` tokens a step and as many as the KV cache holds. With attention sinks (a quantized
    cache with sink entries), each window takes an entry for its first token, as the scheduler would.
    """
    if engine.has_unfinished_requests():
        raise CacheMemoryError("engine_perplexity needs an idle engine (requests are running)")
    runner, bm = engine.runner, engine.block_manager
    sinks = engine.scheduler.sinks  # the engine's table (None for an fp cache or kv_sink_entries=0)
    n, length = windows.shape
    chunk = max(1, min(chunk, length))
    per_window = bm.blocks_for(length)
    batch = min(n, bm.num_free_blocks // per_window, max(1, step_tokens // chunk))
    if batch < 1:
        raise CacheMemoryError(
            f"a window of {length} tokens needs {per_window} KV blocks, the cache has {bm.num_free_blocks} "
            "free; raise cache_max_entry_count or use shorter windows"
        )
    params = SamplingParams(max_tokens=1)
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        rows = windows[i : i + batch]
        seqs = [Sequence(-1 - j, f"ppl-{i + j}", w.tolist(), params) for j, w in enumerate(rows)]
        try:
            for s in seqs:
                if not bm.allocate(s, length):
                    raise CacheMemoryError("the KV cache ran out of blocks while scoring (engine bug)")
                if sinks is not None:
                    s.sink = sinks.acquire(s.token_ids[0], True)
            for start in range(0, length, chunk):
                step = min(chunk, length - start)
                out = SchedulerOutput([ScheduledSequence(s, start, step, False, s.sink) for s in seqs])
                logits = runner.prompt_logits(out).view(len(seqs), step, -1)
                # position p predicts token p + 1; the window's last position predicts nothing
                target = rows[:, start + 1 : start + step + 1].to(logits.device)
                pred = logits[:, : target.shape[1]].float().flatten(0, 1)
                nll += F.cross_entropy(pred, target.reshape(-1), reduction="sum").item()
                count += target.numel()
        finally:
            for s in seqs:
                bm.free(s)
                if sinks is not None and s.sink >= 0:
                    sinks.release(s.sink)
                s.sink = -1
    return math.exp(nll / count)


def evaluate_engine(
    model_dir: str | Path,
    windows: dict[str, torch.Tensor],
    quant_policies: Seq[int] = (0, 8, 4),
    device: str = "auto",
    dtype: str = "auto",
    chunk: int = 128,
    reference: dict[str, Any] | None = None,
    loaded: LoadedModel | None = None,
    kv_sink_entries: int = 64,
) -> dict[str, Any]:
    """Engine ppl of each text for each KV ``quant_policy``; with ``reference`` (an ``eval/ppl.json``
    report) also the relative differences and the :data:`TOLERANCES` checks. ``kv_sink_entries``: attention
    sinks of the quantized caches (0: none)."""
    loaded = loaded or load_model(model_dir, device, dtype)
    longest = max(w.shape[1] for w in windows.values())
    results: dict[str, dict[str, float]] = {name: {} for name in windows}
    for q in quant_policies:
        blocks = 16 * -(-longest // 64)
        cfg = EngineConfig(
            model_dir, device=str(loaded.device), block_size=64, cache_max_entry_count=blocks, quant_policy=q,
            max_num_seqs=16, session_len=longest + 1, eager=True, verify_artifact=False,
            kv_sink_entries=kv_sink_entries,
        )
        engine = LLMEngine(cfg, loaded=loaded)
        for name, w in windows.items():
            results[name][f"kv{q}"] = engine_perplexity(engine, w, chunk)
            log.info("engine ppl %-22s quant_policy %d: %.4f", name, q, results[name][f"kv{q}"])
        del engine
    report: dict[str, Any] = {
        "model": str(model_dir),
        "kind": loaded.kind,
        "int4_linears": loaded.int4,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "chunk": chunk,
        "kv_sink_entries": kv_sink_entries,
        "protocol": {
            n: {"windows": int(w.shape[0]), "window_len": int(w.shape[1])} for n, w in windows.items()
        },
        "results": results,
    }
    report["checks"] = _checks(results, reference, "awq" if loaded.kind in ("awq", "packed") else "reference")
    return report


def _checks(results: dict[str, dict[str, float]], reference: dict | None, ref_key: str) -> dict[str, Any]:
    checks: dict[str, Any] = {"tolerances": TOLERANCES, "failures": []}
    for name, r in results.items():
        row: dict[str, float] = {}
        base = r.get("kv0")
        ref = ((reference or {}).get("results") or {}).get(name, {}).get(ref_key)
        if base is not None and ref is not None:
            row[f"eval_{ref_key}"] = ref
            row["rel_diff_vs_eval"] = base / ref - 1
            if abs(row["rel_diff_vs_eval"]) > TOLERANCES["engine_vs_eval"]:
                checks["failures"].append(
                    f"{name}: engine ppl {base:.4f} differs from eval/ppl.json {ref_key} {ref:.4f} by "
                    f"{row['rel_diff_vs_eval']:+.2%} (allowed {TOLERANCES['engine_vs_eval']:.0%})"
                )
        for q in ("kv8", "kv4"):
            if base is not None and q in r:
                row[f"{q}_increase"] = r[q] / base - 1
                if row[f"{q}_increase"] > TOLERANCES[q]:
                    checks["failures"].append(
                        f"{name}: {q} KV cache raises ppl by {row[f'{q}_increase']:+.2%} "
                        f"(allowed {TOLERANCES[q]:.1%})"
                    )
        checks[name] = row
    checks["passed"] = not checks["failures"]
    return checks


def check_report(report: dict[str, Any], out_json: str | Path) -> None:
    """Raise :class:`QualityGateError` if the report's checks failed."""
    failures = report["checks"]["failures"]
    if failures:
        raise QualityGateError(
            f"engine perplexity checks failed: {'; '.join(failures)} (details in {out_json})"
        )


def run(
    model_dir: Path,
    texts: Seq[str],
    out: Path,
    quant_policies: Seq[int] = (0, 8, 4),
    text_dir: Path = Path("resources/text"),
    tokens: int = 20000,
    window: int = 512,
    add_bos: bool = False,
    device: str = "auto",
    chunk: int = 128,
    reference: Path | None = None,
    strict: bool = False,
    kv_sink_entries: int = 64,
) -> dict[str, Any]:
    """``lmkiln eval ppl-engine``: tokenize the texts as ``eval ppl`` does, score, write ``out``."""
    import json

    from lmkiln.artifact import write_json_atomic
    from lmkiln.data.calib import eval_token_windows, load_text
    from lmkiln.errors import ArtifactError
    from lmkiln.quant.pipeline import load_tokenizer

    ref = None
    if reference is not None:
        try:
            ref = json.loads(Path(reference).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(
                f"cannot read the reference {reference} ({e}); run `lmkiln eval ppl` first"
            ) from e
    tok = load_tokenizer(model_dir)
    windows = {
        name: eval_token_windows(tok, load_text(name, text_dir), tokens, window, add_bos) for name in texts
    }
    report = evaluate_engine(model_dir, windows, quant_policies, device, chunk=chunk, reference=ref,
                             kv_sink_entries=kv_sink_entries)
    report["reference"] = str(reference) if reference is not None else None
    write_json_atomic(out, report)
    if strict:
        check_report(report, out)
    return report


def format_table(report: dict[str, Any]) -> str:
    cols = sorted({k for r in report["results"].values() for k in r}, key=lambda k: int(k[2:]))
    lines = [f"{'text':<22} " + " ".join(f"{c:>10}" for c in cols)]
    for name, r in report["results"].items():
        lines.append(f"{name:<22} " + " ".join(f"{r[c]:>10.4f}" for c in cols))
    return "\n".join(lines)
