"""Experiment (session 9): where a throughput run's GPU time goes, kernel by kernel.

The engine of ``lmkiln bench engine``'s throughput run (synthetic 7B int4, ``max_num_seqs`` 256, prompts 512
/ outputs 256, all submitted at once) steps ``--warm-steps`` times, then ``--steps`` steps run under
``torch.profiler``; the report lists the kernels by their summed device time (the profiler sees the kernels
of CUDA-graph replays too: with the defaults, the profiled steps are batch-256 decode-only replays).
``--record-shapes`` logs what layer 0's attention gets, for eager (mixed) steps only. Written against the
bench's helpers as they have been since session 4, so an older tree can run it for an A/B.

Session 9, H100, int8 KV (``--quant-policy 8``), ms a step: session 4's tree 49.9 (attention kernel 28.1,
SiLU·mul 0.22), before the fixes 58.3 (attention 37.7: the int8 decode kernel spilled; SiLU·mul 3.43: a
program per 32 columns), with ``LMKILN_PDL=0`` the same.

``python scripts/experiments/throughput_profile.py --out DIR [--quant-policy 8] [--requests 400]``
(on a GPU; see notes/kernels.md "Running on the device"), results to ``throughput_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lmkiln-bench-engine"))
    p.add_argument("--quant-policy", type=int, default=8)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warm-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--record-shapes", action="store_true", help="layer 0's attention inputs, step by step")
    a = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lmkiln.bench.engine import _engine, _prompts, build_synthetic
    from lmkiln.engine import SamplingParams
    from lmkiln.engine.loader import load_model

    _, packed = build_synthetic(a.workdir)
    loaded = load_model(packed, torch.device("cuda"), "float16")
    session_len = 968  # the bench's: 10 session turns of 64 + 32 tokens, + 8
    eng = _engine(packed, loaded, "cuda", min(a.requests, 256), session_len, a.quant_policy)
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    for prompt in _prompts(a.requests, 512, loaded.config.vocab_size, 7):
        eng.add_request(prompt, params)
    for _ in range(a.warm_steps):
        eng.step()
    torch.cuda.synchronize()
    shapes: list[dict[str, int]] = []
    if a.record_shapes:  # layer 0's attention inputs in each eager step (a host sync each: timing only)
        from lmkiln.engine.attention import TritonAttentionBackend

        attend = TritonAttentionBackend._attend

        calls = [0]
        layers = loaded.config.num_layers

        def record(self, q, cache, meta, *args, _attend=attend, **kw):
            calls[0] += 1
            if calls[0] % layers == 1:
                lens = meta.seq_lens.tolist()
                shapes.append({"tokens": q.shape[0], "seqs": len(lens), "keys": sum(lens),
                               "max_query_len": meta.max_query_len})
            return _attend(self, q, cache, meta, *args, **kw)

        TritonAttentionBackend._attend = record
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            eng.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:120]]
            k[0] += ev.device_time_total / 1000.0  # ms
            k[1] += 1
    rows = [{"kernel": n, "ms": v[0], "count": v[1]} for n, v in kernels.items()]
    rows.sort(key=lambda r: -r["ms"])
    report = {
        "device": torch.cuda.get_device_name(), "quant_policy": a.quant_policy, "requests": a.requests,
        "warm_steps": a.warm_steps, "steps": a.steps, "wall_ms_per_step": 1000 * wall / a.steps,
        "device_ms_per_step": sum(r["ms"] for r in rows) / a.steps, "kernels": rows[: a.top],
        "attention_inputs": shapes,
    }
    if shapes:
        print("layer-0 attention: tokens, seqs, keys per step:",
              [(x["tokens"], x["seqs"], x["keys"]) for x in shapes])
    print(f"wall {report['wall_ms_per_step']:.2f} ms a step, kernels {report['device_ms_per_step']:.2f} ms")
    for r in rows[: a.top]:
        print(f"{r['ms'] / a.steps:9.3f} ms/step {r['count']:6d}  {r['kernel']}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "throughput_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
