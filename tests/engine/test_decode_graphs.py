"""The CUDA-graph decode path's logic on the CPU: bucket sizes, padding, and the padded static-buffer
forward giving the same tokens as the plain one (graphs themselves are covered by the gpu tests)."""

from __future__ import annotations

import pytest
import torch

from lmkiln.engine import EngineConfigError, LLMEngine, SamplingParams
from lmkiln.engine.attention import TorchAttentionBackend
from lmkiln.engine.model_runner import StepInputs, graph_batch_sizes, pad_decode_inputs, pick_bucket


def test_graph_batch_sizes_and_buckets() -> None:
    sizes = graph_batch_sizes(256)
    assert sizes[:8] == [1, 2, 4, 8, 16, 24, 32, 40] and sizes[-1] == 256 and len(sizes) == 35
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(3) == [1, 2, 3] and graph_batch_sizes(1) == [1]
    with pytest.raises(EngineConfigError):
        graph_batch_sizes(0)
    s = graph_batch_sizes(20)
    assert [pick_bucket(s, n) for n in (1, 3, 5, 16, 17, 20)] == [1, 4, 8, 16, 20, 20]
    assert pick_bucket(s, 21) is None and pick_bucket(s, 0) is None


def test_pad_decode_inputs() -> None:
    step = StepInputs([11, 12], [5, 9], [5, 13], [0, 1, 2], [6, 10], [[0], [2, 3]], [0, 1])
    p = pad_decode_inputs(step, 4, 3)
    assert p.input_ids == [11, 12, 0, 0] and p.positions == [5, 9, 0, 0]
    assert p.slot_mapping == [5, 13, -1, -1] and p.seq_lens == [6, 10, 0, 0]
    assert p.query_start_loc == [0, 1, 2, 3, 4] and p.logits_rows == [0, 1]
    assert p.block_tables == [[0, -1, -1], [2, 3, -1], [-1, -1, -1], [-1, -1, -1]]
    with pytest.raises(EngineConfigError, match="max_blocks"):
        pad_decode_inputs(step, 4, 1)
    with pytest.raises(EngineConfigError, match="decode batch"):
        pad_decode_inputs(step, 1, 3)
    prefill = StepInputs([1, 2, 3], [0, 1, 2], [0, 1, 2], [0, 3], [3], [[0]], [2])
    with pytest.raises(EngineConfigError):
        pad_decode_inputs(prefill, 4, 3)


class PadSkippingBackend(TorchAttentionBackend):
    """The reference attention with the graph contract: slots < 0 are not written; counts its decode
    calls with pad rows (``seq_len`` 0)."""

    def __init__(self) -> None:
        self.padded_calls = 0

    def forward(self, q, k, v, cache, meta, scale, rope=None, pending=False):
        from lmkiln.kernels.attention_ref import paged_attention_ref, write_kv_ref

        if rope is not None:  # the model's fused path (LMKILN_FUSED=1)
            from lmkiln.kernels.fused import rotary_

            rotary_(q, k, *rope)

        keep = meta.slot_mapping >= 0
        self.padded_calls += int((meta.seq_lens == 0).any())
        has_sink = cache.sink is not None and meta.sink_idx is not None and meta.sink_slot is not None
        sink_slot = meta.sink_slot[keep] if has_sink else None
        write_kv_ref(k[keep], v[keep], cache.k, cache.v, meta.slot_mapping[keep], cache.k_sz, cache.v_sz,
                     cache.bits, cache.k_offset, cache.sink if has_sink else None, sink_slot)
        args = (cache.k, cache.v, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
                cache.k_sz, cache.v_sz, cache.bits)
        return paged_attention_ref(q, *args, *((cache.sink, meta.sink_idx) if has_sink else ()))


@pytest.mark.parametrize("quant_policy", [0, 8])
def test_padded_decode_path_matches_eager(tiny_llama_dir, quant_policy) -> None:
    prompts = [list(range(3, 24)), [7, 8], [*range(40, 53), 5]]  # 3 sequences -> bucket 4 (one pad row)
    p = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=1)
    kw = dict(block_size=4, cache_max_entry_count=64, max_num_seqs=6, session_len=64,
              quant_policy=quant_policy)
    ref = LLMEngine.from_pretrained(tiny_llama_dir, **kw)
    want = ref.generate(prompts, p)
    eng = LLMEngine.from_pretrained(tiny_llama_dir, **kw)
    runner = eng.runner
    assert runner.decode_graphs is None  # the CPU never captures
    runner.backend = PadSkippingBackend()
    runner.enable_decode_graphs(capture=False)
    graphs = runner.decode_graphs
    assert graphs.sizes == [1, 2, 4, 6] and graphs.block_tables.shape == (6, 16)
    got = eng.generate(prompts, p)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want, strict=True):
        assert [x.logprob for x in a.logprobs] == pytest.approx([x.logprob for x in b.logprobs], abs=1e-5)
    assert runner.backend.padded_calls >= 8 * eng.model_config.num_layers  # decode steps ran padded
    assert torch.equal(graphs.slot_mapping[3:], torch.full((3,), -1))


def test_side_copies_switch_is_validated(tiny_llama_dir, monkeypatch) -> None:
    """``LMKILN_SIDE_COPIES``: 0 / 1 / unset; anything else is an error naming the choices. On the CPU there
    is no side stream either way (the copies go straight into the buffers)."""
    monkeypatch.setenv("LMKILN_SIDE_COPIES", "yes")
    with pytest.raises(EngineConfigError, match="LMKILN_SIDE_COPIES='yes'"):
        LLMEngine.from_pretrained(tiny_llama_dir, cache_max_entry_count=16, session_len=64)
    monkeypatch.setenv("LMKILN_SIDE_COPIES", "1")
    eng = LLMEngine.from_pretrained(tiny_llama_dir, cache_max_entry_count=16, session_len=64)
    assert not eng.runner.side_copies
