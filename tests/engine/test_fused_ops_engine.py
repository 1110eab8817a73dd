"""The engine with the fused Triton small ops (``LMKILN_FUSED=1``, run by the Triton interpreter on the CPU)
gives the same greedy tokens and logprobs as with the torch ops, with separate and fused q/k/v and gate/up
linears (the fused ones hand the kernels strided views)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkiln.engine import LLMEngine, SamplingParams

PROMPTS = [list(range(3, 14)), [7, 8], [*range(40, 45), 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)


@pytest.fixture(autouse=True)
def _interpreted() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-interpreter test; tests/engine/test_engine_gpu.py runs the fused ops on CUDA")
    triton = pytest.importorskip("triton")
    from lmkiln.kernels import fused

    if not isinstance(fused._rmsnorm_kernel, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip("lmkiln.kernels.fused was imported before TRITON_INTERPRET=1 was set")


def _fuse_linears(model: nn.Module) -> None:
    """Swap every layer's q/k/v and gate/up for one fused nn.Linear each (outputs concatenated along N)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        fused = []
        for parts in (qkv, gate_up):
            w = torch.cat([p.weight for p in parts])
            lin = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, dtype=w.dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
            fused.append(lin)
        layer.fuse(fused[0], attn.o_proj, fused[1], mlp.down_proj)


def _count_calls(monkeypatch) -> dict[str, int]:
    """Count the fused launchers' calls (the model imports them from the module at call time)."""
    from lmkiln.kernels import fused

    calls = dict.fromkeys(("rmsnorm", "add_rmsnorm", "rotary_", "silu_mul"), 0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(fused, name, counted(name, getattr(fused, name)))
    return calls


def _run(path, monkeypatch, fused_ops: bool, fuse_linears: bool, **kw):
    monkeypatch.setenv("LMKILN_FUSED", "1" if fused_ops else "0")
    calls = _count_calls(monkeypatch)
    eng = LLMEngine.from_pretrained(path, block_size=4, cache_max_entry_count=32, session_len=64, **kw)
    if fuse_linears:
        _fuse_linears(eng.runner.model)
    outs = eng.generate(PROMPTS, GREEDY)
    n = eng.model_config.num_layers
    if fused_ops:  # per forward: one rmsnorm (layer 0's input), 2n add_rmsnorm, n rotary, n silu_mul
        steps = calls["rmsnorm"]
        assert steps >= 8 and calls["add_rmsnorm"] == 2 * n * steps
        assert calls["rotary_"] == calls["silu_mul"] == n * steps
    else:
        assert not any(calls.values())
    monkeypatch.undo()
    return outs


@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", "float32"), ("qwen2", "float32"), ("llama", "float16")]
)
@pytest.mark.parametrize("fuse_linears", [False, True])
def test_fused_ops_same_greedy_tokens(tmp_path, make_tiny_model, monkeypatch, family, dtype, fuse_linears):
    path = make_tiny_model(tmp_path / family, family, hidden_size=64, intermediate_size=96)
    want = _run(path, monkeypatch, False, fuse_linears, dtype=dtype)
    got = _run(path, monkeypatch, True, fuse_linears, dtype=dtype)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(got, want, strict=True):
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=tol)
