"""Experiment: the Triton kernels compiled (or loaded from Triton's disk cache) during each turn of an
interactive session on the synthetic 7B model, with each turn's TTFT (``lmkiln.bench.engine.bench_session``'s
workload).

Session 9 measured TTFT 1,459.5 ms at turn 1 and 996.8 ms at turn 2 against ~53 ms from turn 3 on; the
question is which launches of turn 2 were new. A ``triton.knobs.runtime.jit_cache_hook`` records every
in-memory cache miss of a ``@triton.jit`` function with the argument specialisation that caused it.

Session 10, H100, int4, a cold cache each: turn 1 took 4.2 s (6 misses: two ``mma_t`` configs, the KV
write, the paged attention, the norm, SiLU·mul). Turn 2 took 2,045 ms with the attention kernel specialised
on the block-table width (misses: the attention again, and the ``mma_t`` config of 65 tokens, the first
turn's last output token plus 64 new ones) and 994 ms with ``do_not_specialize`` (the ``mma_t`` only).
Turns 3-10: 32-133 ms, no misses.

Session 11, H100, int4, cold cache: turn 1 5,245.5 ms (6 misses), turn 2 1,216.8 ms (the ``mma_t`` config of
65 tokens). With the engine's start-up warm-up (``LLMEngine.warm_up``): engine start 22.6 s, then turn 1 40.8
ms, turn 2 47.4 ms and no miss in any turn.

Run on a GPU (see notes/kernels.md "Running on the device"), with a fresh ``TRITON_CACHE_DIR`` for a cold
start: ``python scripts/experiments/session_compiles.py --out DIR [--workdir W] [--weights int4|bf16]``;
writes ``session_compiles.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"))
    p.add_argument("--weights", choices=("int4", "bf16"), default="int4")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    a = p.parse_args()

    import torch
    import triton

    from lmkiln.bench.engine import _engine, _prompts, build_synthetic
    from lmkiln.engine import SamplingParams
    from lmkiln.engine.loader import load_model

    hf_dir, packed = build_synthetic(a.workdir)
    model = packed if a.weights == "int4" else hf_dir
    loaded = load_model(model, torch.device("cuda"), "float16" if a.weights == "int4" else "bfloat16")
    session_len = a.turns * (a.turn_len + a.output_len) + 8
    t0 = time.perf_counter()
    eng = _engine(model, loaded, "cuda", 1, session_len)  # captures the decode graphs and warms up (prefill)
    start_s = time.perf_counter() - t0
    print(f"engine start (graphs, warm-up): {start_s:.1f} s", flush=True)

    misses: list[str] = []

    def hook(*args: object, **kw: object) -> bool:
        misses.append(str(kw.get("repr", args[0] if args else "?"))[:400])
        return False  # compile (or load from the disk cache) as usual

    triton.knobs.runtime.jit_cache_hook = hook
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    rows = []
    for i, prompt in enumerate(_prompts(a.turns, a.turn_len, loaded.config.vocab_size, 11)):
        before = len(misses)
        t0 = time.perf_counter()
        rid = eng.add_request(prompt, params, session_id="s")
        ttft = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.request_id == rid and o.token_ids and ttft is None:
                    ttft = time.perf_counter() - t0
        rows.append({"turn": i + 1, "ttft_ms": 1000 * (ttft or float("nan")), "new_kernels": misses[before:]})
        n_new = len(misses) - before
        print(f"turn {i + 1}: TTFT {rows[-1]['ttft_ms']:.1f} ms, {n_new} cache misses", flush=True)
        for m in misses[before:]:
            print("   ", m[:200], flush=True)
    triton.knobs.runtime.jit_cache_hook = None
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "weights": a.weights, "device": torch.cuda.get_device_name()}
    report["start_s"] = start_s
    report["turns"] = rows
    (a.out / "session_compiles.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
