"""The engine end to end on tiny random checkpoints: greedy equals transformers token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmkiln.engine import EngineConfigError, LLMEngine, RequestError, SamplingParams, load_model
from lmkiln.errors import ArtifactError, ModelError

GREEDY = SamplingParams(temperature=0, max_tokens=10)
PROMPTS = [  # mixed lengths; the last ones share a prefix of several 4-token blocks with the first
    list(range(3, 24)),
    [7, 8],
    list(range(40, 53)),
    [*range(3, 19), 200, 201, 202],
    [5],
    [*range(3, 24), 99],
]


def _engine(path: Path, **kw) -> LLMEngine:
    kw = {
        "block_size": 4,
        "cache_max_entry_count": 64,
        "max_prefill_token_num": 8,
        "max_num_batched_tokens": 10,
        **kw,
    }
    return LLMEngine.from_pretrained(path, **kw)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("mistral", {"sliding_window": None}),
        ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    ],
)
@pytest.mark.parametrize("prefix", [False, True])
def test_greedy_matches_transformers(tmp_path, make_tiny_model, hf_greedy, family, overrides, prefix) -> None:
    path = make_tiny_model(tmp_path / family, family, **overrides)
    eng = _engine(path, enable_prefix_caching=prefix)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy(path, PROMPTS, 10)
    assert all(o.finished for o in outs)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    if prefix:
        assert outs[-1].num_cached_tokens == 20 and outs[3].num_cached_tokens >= 12
    else:
        assert all(o.num_cached_tokens == 0 for o in outs)


def test_preemption_under_a_small_cache_keeps_outputs(tiny_llama_dir, hf_greedy) -> None:
    eng = _engine(
        tiny_llama_dir, cache_max_entry_count=14, max_num_batched_tokens=64, max_prefill_token_num=64
    )
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == hf_greedy(tiny_llama_dir, PROMPTS, 16)
    assert eng.block_manager.num_free_blocks == 14


def test_requests_join_a_running_batch(tiny_llama_dir, hf_greedy) -> None:
    eng = _engine(tiny_llama_dir)
    a = eng.add_request(PROMPTS[0], GREEDY)
    final = {}
    for step in range(200):
        if step == 3:
            b = eng.add_request(PROMPTS[2], GREEDY)
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.token_ids
        if len(final) == 2:
            break
    assert [final[a], final[b]] == hf_greedy(tiny_llama_dir, [PROMPTS[0], PROMPTS[2]], 10)


def test_session_turn_two_prefills_only_new_tokens(tiny_llama_dir, drain) -> None:
    eng = _engine(tiny_llama_dir, max_prefill_token_num=64, max_num_batched_tokens=64)
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rid = eng.add_request(PROMPTS[0], p, session_id="chat")
    out1 = drain(eng)[rid]
    new = [60, 61, 62, 63, 64]
    rid2 = eng.add_request(new, p, session_id="chat")
    outs = eng.step()
    assert eng.last_schedule.num_new_tokens(eng.scheduler.requests[rid2].seq_id) == len(new) + 1
    out2 = {**{o.request_id: o for o in outs}, **drain(eng)}[rid2]
    assert out2.num_cached_tokens == len(PROMPTS[0]) + 6 - 1
    fresh = eng.generate([PROMPTS[0] + out1.token_ids + new], p)[0]
    assert out2.token_ids == fresh.token_ids
    assert eng.end_session("chat")
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks



def test_stop_strings_and_stop_token_ids(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    free = eng.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    words = free.text.split()
    assert len(words) == 12
    stop = f"{words[4]} {words[5]}"  # a stop string of two tokens
    first = free.text.index(stop)
    out = eng.generate(
        [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:first]
    tok = free.token_ids[3]
    out = eng.generate(
        [PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[tok])
    )[0]
    k = free.token_ids.index(tok)
    assert out.token_ids == free.token_ids[: k + 1] and out.stop_reason == tok
    assert free.text.startswith(out.text) and out.text.split() == words[:k]  # without the stop token's text
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_streamed_deltas_add_up(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    rid = eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, logprobs=2))
    text, ids, last = "", [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            text, ids, last = text + o.delta_text, ids + o.delta_token_ids, o
    assert last is not None and last.request_id == rid and last.finished
    assert text == last.text and ids == last.token_ids
    assert len(last.logprobs) == len(ids) and all(len(lp.top) == 2 for lp in last.logprobs)


def test_abort_frees_blocks_at_once(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    ids = [eng.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in PROMPTS]
    for _ in range(4):
        eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    assert all(eng.abort_request(i) for i in ids)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.has_unfinished_requests() and eng.step() == []


def test_seeded_sampling_is_reproducible(tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    a = eng.generate([PROMPTS[0]], p)[0].token_ids
    b = eng.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [p, SamplingParams(), SamplingParams()])[
        0
    ].token_ids
    assert a == b


def test_bad_input_is_refused_clearly(tmp_path, tiny_llama_dir) -> None:
    eng = _engine(tiny_llama_dir, session_len=16)
    with pytest.raises(RequestError, match="prompt has 21 tokens but session_len is 16"):
        eng.add_request(PROMPTS[0])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request([1, 100000])
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([])
    with pytest.raises(EngineConfigError, match="power of two"):
        _engine(tiny_llama_dir, block_size=6)
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="unsupported architecture"):
        LLMEngine.from_pretrained(bad)
    (bad / "manifest.json").write_text(json.dumps({"kind": "calib"}))
    with pytest.raises(ArtifactError, match="'calib' artifact"):
        load_model(bad)


def test_cache_sizing(tiny_llama_dir) -> None:
    from lmkiln.engine import CacheMemoryError
    from lmkiln.engine.kv_cache import KVCache

    eng = LLMEngine.from_pretrained(tiny_llama_dir)  # defaults: 0.8 of the CPU budget, 64-token blocks
    cfg = eng.model_config
    per_block = KVCache.bytes_per_block(cfg.num_layers, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32, 0)
    # a fraction is capped at what max_num_seqs full-length sessions could ever use
    assert eng.block_manager.num_blocks == min(int((1 << 30) * 0.8) // per_block, 256 * (512 // 64))
    assert eng.runner.kv_cache.nbytes() == eng.block_manager.num_blocks * per_block
    with pytest.raises(CacheMemoryError, match=r"a block of 64 tokens takes 0\.1 MiB"):
        LLMEngine.from_pretrained(tiny_llama_dir, cpu_cache_bytes=1000)


# --------------------------------------------------------------------------------------- AWQ and packed


def _rtn_awq_dir(src: Path, out: Path) -> Path:
    from lmkiln.models import Checkpoint
    from lmkiln.quant.awq import write_quantized_dir
    from lmkiln.quant.rtn import QuantSpec, to_awq_tensors

    ckpt = Checkpoint(src)
    spec = QuantSpec(group_size=64)
    tensors = {}
    for name in ckpt.keys():  # noqa: SIM118 (a Checkpoint, not a dict)
        t = ckpt.get(name)
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            for k, v in to_awq_tensors(t, spec).items():
                tensors[name[: -len("weight")] + k] = v
        else:
            tensors[name] = t.half()
    return write_quantized_dir(ckpt, tensors, out, spec, {})


def _own_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_awq_and_packed_dirs_load(tmp_path, make_tiny_model) -> None:
    src = make_tiny_model(tmp_path / "qwen", "qwen2")
    awq = _rtn_awq_dir(src, tmp_path / "awq")
    loaded = load_model(awq)
    assert loaded.kind == "awq"
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = _engine(awq).generate(PROMPTS[:3], p)
    assert [o.token_ids for o in got] == [_own_greedy(loaded.model, q, 8) for q in PROMPTS[:3]]

    from lmkiln.quant.pack import pack_checkpoint

    packed = pack_checkpoint(awq, tmp_path / "packed")
    lp = load_model(packed, verify=True)
    assert lp.kind == "packed"
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(lp.model(ids), loaded.model(ids), atol=1e-3, rtol=1e-3)
    assert [o.token_ids for o in _engine(packed).generate(PROMPTS[:3], p)] == [o.token_ids for o in got]

    manifest = json.loads((packed / "manifest.json").read_text())
    (packed / "manifest.json").write_text(json.dumps({**manifest, "layout_version": 99}))
    with pytest.raises(ArtifactError, match="version"):
        load_model(packed)
