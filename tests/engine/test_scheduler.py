"""Scheduler with a scripted model step: budgets, chunked prefill, preemption, abort, sessions, no leaks."""

from __future__ import annotations

import pytest

from lmkiln.engine.errors import RequestError
from lmkiln.engine.sequence import SequenceStatus


def _counts(out) -> dict[str, int]:
    return {i.seq.request_id: i.num_new_tokens for i in out.scheduled}


def test_chunked_prefill_splits_a_long_prompt(make_scheduler) -> None:
    fs = make_scheduler(max_prefill_token_num=8, max_num_batched_tokens=8)
    seq = fs.add(list(range(20)), max_tokens=3)
    assert [_counts(fs.step()) for _ in range(3)] == [{"r0": 8}, {"r0": 8}, {"r0": 4}]
    assert seq.num_output_tokens == 1  # sampled only after the last chunk
    fs.run()
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_output_tokens == 3
    assert fs.scheduler.block_manager.num_free_blocks == 32


def test_prefill_chunks_fuse_with_decodes_within_the_budget(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=64, max_prefill_token_num=6, max_num_batched_tokens=8)
    a = fs.add([1, 2, 3], max_tokens=20)
    fs.step()  # a's prompt
    fs.add(list(range(30)), max_tokens=2, request_id="long")
    out = fs.step()
    assert _counts(out) == {"r0": 1, "long": 6}  # decode first, then a chunk of the new prompt
    while fs.scheduler.has_unfinished():
        out = fs.step()
        assert out.num_batched_tokens <= 8 and out.num_prefill_tokens <= 6
    assert a.num_output_tokens == 20
    assert fs.scheduler.block_manager.num_free_blocks == 64


def test_new_requests_join_between_steps(make_scheduler) -> None:
    fs = make_scheduler()
    fs.add([1, 2], max_tokens=5)
    fs.step()
    fs.add([3, 4, 5], max_tokens=2)
    assert _counts(fs.step()) == {"r0": 1, "r1": 3}
    fs.run()


def test_max_num_seqs_limits_the_batch(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=64, max_num_seqs=2)
    for _ in range(5):
        fs.add([1, 2, 3], max_tokens=3)
    while fs.scheduler.has_unfinished():
        assert len(fs.step().scheduled) <= 2
    assert fs.scheduler.block_manager.num_free_blocks == 64


def _outputs(fs, prompts, max_tokens):
    seqs = [fs.add(p, max_tokens=max_tokens) for p in prompts]
    fs.run()
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_recomputes_and_gives_the_same_tokens(make_scheduler, prefix, caplog) -> None:
    prompts = [list(range(i, i + 5 + 3 * i)) for i in range(6)]
    big = make_scheduler(num_blocks=200, prefix=prefix)
    small = make_scheduler(num_blocks=12, prefix=prefix)
    expected = _outputs(big, prompts, 16)
    with caplog.at_level("WARNING", logger="lmkiln.engine.scheduler"):
        got = _outputs(small, prompts, 16)
    assert got == expected
    n = small.scheduler.num_preemptions
    assert n > 0 and big.scheduler.num_preemptions == 0
    assert small.scheduler.block_manager.num_free_blocks == 12
    # under load the log gets one warning for the first preemption and one per hundred, not one per request
    warnings = [r for r in caplog.records if "preemptions so far" in r.getMessage()]
    assert len(warnings) == 1 + n // 100


def test_a_sequence_outgrowing_the_cache_finishes_with_length(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=3, block_size=4)
    a = fs.add([1, 2, 3], max_tokens=50)
    b = fs.add([4, 5], max_tokens=50)
    fs.run(max_steps=200)
    assert a.status is SequenceStatus.FINISHED_LENGTH and b.status is SequenceStatus.FINISHED_LENGTH
    assert a.num_tokens == b.num_tokens == 13  # 12 cached tokens, then the token sampled from them
    assert fs.scheduler.block_manager.num_free_blocks == 3


def test_abort_frees_every_block_at_once(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=16, max_prefill_token_num=4)
    fs.add(list(range(10)), max_tokens=30, request_id="run")
    fs.add(list(range(30, 52)), max_tokens=30, request_id="chunked")
    for _ in range(3):
        fs.step()
    fs.add([7, 7], request_id="waiting")
    assert fs.scheduler.block_manager.num_free_blocks < 16
    assert fs.scheduler.abort("run") and fs.scheduler.abort("chunked") and fs.scheduler.abort("waiting")
    assert not fs.scheduler.abort("run")
    assert fs.scheduler.block_manager.num_free_blocks == 16 and not fs.scheduler.has_unfinished()
    fs.scheduler.block_manager.check()


def test_prefix_cache_hits_skip_prefill(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=32, block_size=4, prefix=True)
    fs.add(list(range(13)), max_tokens=2)
    fs.run()
    seq = fs.add([*range(12), 99, 98], max_tokens=2)
    out = fs.step()
    assert _counts(out) == {seq.request_id: 2} and seq.num_cached_tokens == 12
    fs.run()
    assert fs.scheduler.block_manager.num_free_blocks == 32


def test_session_turn_prefills_only_its_new_tokens(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=32, block_size=4)
    t1 = fs.add(list(range(10)), max_tokens=3, session_id="chat")
    fs.run()
    held = fs.scheduler.sessions.num_blocks_held
    assert held == 3 and fs.scheduler.block_manager.num_free_blocks == 32 - held  # KV kept: 12 computed
    t2 = fs.add([50, 51, 52], max_tokens=2, session_id="chat")
    assert t2.token_ids[:13] == t1.token_ids
    out = fs.step()
    assert _counts(out) == {t2.request_id: 4}  # the last reply token (never computed) + 3 new
    assert t2.num_cached_tokens == 12
    fs.run()
    assert fs.scheduler.end_session("chat")
    assert fs.scheduler.block_manager.num_free_blocks == 32 and len(fs.scheduler.sessions) == 0


def test_busy_session_and_too_long_prompts_are_refused(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=8, block_size=4, session_len=20)
    fs.add([1, 2, 3], max_tokens=3, session_id="s")
    with pytest.raises(RequestError, match="already running"):
        fs.add([4], session_id="s")
    with pytest.raises(RequestError, match="session_len is 20"):
        fs.add(list(range(20)))
    fs2 = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(RequestError, match="whole cache has 2"):
        fs2.add(list(range(9)))


def test_idle_sessions_are_evicted_when_memory_is_needed(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=8, block_size=4)
    first = fs.add(list(range(14)), max_tokens=2, session_id="old")
    fs.run()
    assert fs.scheduler.sessions.num_blocks_held == 4
    fs.add(list(range(100, 120)), max_tokens=4)  # needs 6 blocks: the idle session must go
    fs.run()
    assert fs.scheduler.sessions.num_blocks_held == 0 and fs.scheduler.num_preemptions == 0
    # the evicted session still works: its next turn recomputes the history
    t2 = fs.add([7], max_tokens=2, session_id="old")
    assert t2.token_ids[:16] == first.token_ids and t2.num_computed_tokens == 0
    fs.run()
    fs.scheduler.end_session("old")
    assert fs.scheduler.block_manager.num_free_blocks == 8


def test_aborted_turn_and_end_session_leave_no_blocks(make_scheduler) -> None:
    fs = make_scheduler(num_blocks=16, block_size=4)
    fs.add(list(range(9)), max_tokens=2, session_id="s")
    fs.run()
    history = fs.scheduler.sessions.history("s")
    turn = fs.add([1, 2], max_tokens=20, session_id="s", request_id="t2")
    fs.step()
    fs.scheduler.abort("t2")
    assert turn.status is SequenceStatus.FINISHED_ABORTED
    assert fs.scheduler.sessions.history("s") == history  # an aborted turn is not part of the history
    assert fs.scheduler.block_manager.num_free_blocks == 16
    fs.add([3], max_tokens=20, session_id="s", request_id="t3")
    fs.step()
    assert fs.scheduler.end_session("s")  # aborts the running turn too
    assert not fs.scheduler.has_unfinished() and fs.scheduler.block_manager.num_free_blocks == 16
