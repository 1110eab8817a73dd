"""The engine on a CUDA GPU: CUDA-graph decode against transformers and against the eager oracle, and a
packed dir served through the W4A16 kernels (Int4Linear over fused q/k/v and gate/up)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmkiln.engine import LLMEngine, SamplingParams, load_model
from lmkiln.engine.config import EngineConfig

pytestmark = pytest.mark.gpu

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
]
N_TOKENS = 64
# EOS is masked for N_TOKENS steps, as transformers' min_new_tokens does (ignore_eos would let the engine
# pick EOS where transformers may not, a false mismatch at the first EOS position)
GREEDY = SamplingParams(temperature=0, max_tokens=N_TOKENS, min_tokens=N_TOKENS)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    return [smollm2_tokenizer(t)["input_ids"] for t in TEXTS]


def _engine(model_dir: Path, loaded=None, **kw) -> LLMEngine:
    cfg = EngineConfig(model_dir, device="cuda", dtype="float16", max_num_seqs=8, session_len=256,
                       cache_max_entry_count=0.2, **kw)
    return LLMEngine(cfg, loaded=loaded)


def _hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=N_TOKENS,
                                 min_new_tokens=N_TOKENS, do_sample=False)
            out.append(ids[0, len(p):].tolist())
    del model
    torch.cuda.empty_cache()
    return out


def test_graphs_match_transformers_and_eager(smollm2_dir, prompts) -> None:
    eng = _engine(smollm2_dir)
    graphs = eng.runner.decode_graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8], "decode graphs were not captured"
    got = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    assert got == _hf_greedy(smollm2_dir, prompts)
    eager = _engine(smollm2_dir, loaded=eng.loaded, eager=True)
    assert eager.runner.decode_graphs is None
    assert [o.token_ids for o in eager.generate(prompts, GREEDY)] == got
    # 3 sequences replay the batch-4 graph with a pad row (slot -1, seq_len 0)
    assert [o.token_ids for o in eng.generate(prompts[:3], GREEDY)] == got[:3]


def _rtn_packed(model_dir: Path, tmp: Path) -> Path:
    """``model_dir`` quantized (RTN, int4, group 64) and packed under ``tmp``."""
    from lmkiln.quant.awq import rtn_quantize
    from lmkiln.quant.pack import pack_checkpoint
    from lmkiln.quant.rtn import QuantSpec

    rtn = rtn_quantize(model_dir, tmp / "rtn", QuantSpec(4, 64), progress=False)
    return pack_checkpoint(rtn, tmp / "packed")


@pytest.fixture(scope="module")
def smollm2_packed(smollm2_dir, tmp_path_factory) -> Path:
    return _rtn_packed(smollm2_dir, tmp_path_factory.mktemp("smol-int4"))


def test_packed_int4_on_gpu(smollm2_packed, prompts) -> None:
    on = load_model(smollm2_packed, "cuda", "float16")  # auto: int4 linears on CUDA
    assert on.int4 and type(on.model.model.layers[0].mlp.gate_up_proj).__name__ == "Int4Linear"
    off = load_model(smollm2_packed, "cuda", "float16", int4="off")
    ids = torch.tensor([prompts[0]], device="cuda")
    with torch.no_grad():
        a, b = on.model(ids).float(), off.model(ids).float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a[0, -1].argmax() == b[0, -1].argmax()).item()
    eng = _engine(smollm2_packed, loaded=on)
    assert eng.runner.decode_graphs is not None
    got = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    eager = _engine(smollm2_packed, loaded=on, eager=True)
    assert [o.token_ids for o in eager.generate(prompts, GREEDY)] == got
    ref = [o.token_ids for o in _engine(smollm2_packed, loaded=off, eager=True).generate(prompts, GREEDY)]
    agree = sum(x == y for g, r in zip(got, ref, strict=True) for x, y in zip(g[:16], r[:16], strict=True))
    assert agree >= 0.9 * 16 * len(prompts)  # int4 kernels vs dequantized fp16: rounding may flip one


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_decode_step_kernels_match_the_torch_oracle(tiny_llama_dir, monkeypatch, quant_policy) -> None:
    """Without any downloaded model: the tiny random Llama (GQA 4/2) in fp32, decoding with everything the GPU
    path adds (CUDA graphs, the Triton attention backend with the rotary inside the KV write and split-KV
    decode merged by its last split, the fused small ops, programmatic dependent launch), gives the greedy
    tokens of the eager engine on the torch reference ops. A 300-token prompt makes the decode kernel split
    its keys (batch 1 over 2 KV heads)."""
    prompts = [list(range(2, 302)), [5, 6, 7], [9] * 40]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", max_num_seqs=4, session_len=512, cache_max_entry_count=64,
              quant_policy=quant_policy)
    monkeypatch.setenv("LMKILN_ATTENTION", "torch")
    monkeypatch.setenv("LMKILN_FUSED", "0")
    want = LLMEngine(EngineConfig(tiny_llama_dir, eager=True, **kw)).generate(prompts, params)
    monkeypatch.delenv("LMKILN_ATTENTION")
    monkeypatch.delenv("LMKILN_FUSED")
    eng = LLMEngine(EngineConfig(tiny_llama_dir, **kw))
    assert eng.runner.decode_graphs is not None
    assert type(eng.runner.backend).__name__ == "TritonAttentionBackend"
    got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    single = eng.generate(prompts[:1], params)  # batch 1: the most splits
    assert single[0].token_ids == want[0].token_ids


@pytest.fixture(scope="module")
def tiny_packed(tiny_llama_dir, tmp_path_factory) -> Path:
    return _rtn_packed(tiny_llama_dir, tmp_path_factory.mktemp("tiny-int4"))


def test_atomic_split_k_decode_on_the_tiny_int4_llama(tiny_packed, monkeypatch) -> None:
    """Batch 1: the int4 decode GEMVs of qkv_proj, o_proj and down_proj add their split-K partials with
    atomics into float32 accumulators that the decode attention kernel and the next RMSNorm read and zero:
    greedy tokens agree with the ordered reduction (``LMKILN_ATOMIC_SPLITK=0``; the sum order may flip a near
    tie), and every accumulator is zero between steps, through the CUDA graph and eager prefill alike."""
    prompts = [list(range(2, 70)), [5, 6, 7], [9] * 20]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = dict(device="cuda", dtype="float16", max_num_seqs=4, session_len=256, cache_max_entry_count=32)

    def one_by_one(eng: LLMEngine) -> list[list[int]]:  # batch-1 decode steps
        return [eng.generate([p], params)[0].token_ids for p in prompts]

    monkeypatch.setenv("LMKILN_ATOMIC_SPLITK", "0")
    want = one_by_one(LLMEngine(EngineConfig(tiny_packed, **kw)))
    monkeypatch.delenv("LMKILN_ATOMIC_SPLITK")
    eng = LLMEngine(EngineConfig(tiny_packed, **kw))
    assert eng.runner.decode_graphs is not None
    got = one_by_one(eng)
    attn_mlp = [(layer.self_attn, layer.mlp) for layer in eng.runner.model.model.layers]
    linears = [m for a, mlp in attn_mlp for m in (a.qkv_proj, a.o_proj, mlp.down_proj)]
    # the batch-1 graph's warm-up made the accumulators; its replays added into them and their consumers
    # zeroed them again
    assert all(lin.acc is not None for lin in linears), "the batch-1 decode did not take the atomic path"
    assert all(not lin.acc.any() for lin in linears)
    agree = sum(x == y for g, w in zip(got, want, strict=True) for x, y in zip(g, w, strict=True))
    assert agree >= 0.9 * 24 * len(prompts)
