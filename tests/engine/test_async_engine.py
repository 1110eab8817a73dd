"""AsyncEngine: concurrent streams, abort (explicit and by leaving the loop), sessions, refused requests."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from lmkiln.engine import AsyncEngine, LLMEngine, RequestError, SamplingParams

PROMPTS = [list(range(3, 24)), [7, 8], list(range(40, 53))]


@pytest.fixture()
def engine(tiny_llama_dir) -> AsyncEngine:
    return AsyncEngine(
        LLMEngine.from_pretrained(
            tiny_llama_dir, block_size=4, cache_max_entry_count=64, max_prefill_token_num=8
        )
    )


async def _collect(engine: AsyncEngine, prompt, params, **kw):
    outs = [o async for o in engine.generate(prompt, params, **kw)]
    return outs


def test_concurrent_streams_match_the_sync_engine(engine, tiny_llama_dir) -> None:
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def main():
        res = await asyncio.gather(*(_collect(engine, q, p) for q in PROMPTS))
        await engine.close()
        return res

    streams = asyncio.run(main())
    want = LLMEngine.from_pretrained(tiny_llama_dir, block_size=4, cache_max_entry_count=64).generate(
        PROMPTS, p
    )
    for outs, ref in zip(streams, want, strict=True):
        assert outs[-1].finished and sum(len(o.delta_token_ids) for o in outs) == 8
        assert outs[-1].token_ids == ref.token_ids
        assert "".join(o.delta_text for o in outs) == ref.text
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_and_leaving_the_stream_free_blocks(engine) -> None:
    long = SamplingParams(max_tokens=500, ignore_eos=True)

    async def main():
        bm = engine.engine.block_manager
        got = []

        async def consume(rid):
            async for o in engine.generate(PROMPTS[0], long, request_id=rid):
                got.append(o)
            return got[-1]

        task = asyncio.create_task(consume("a"))
        while not got:
            await asyncio.sleep(0.01)
        assert await engine.abort("a")
        last = await task
        assert last.finished and last.finish_reason == "abort"
        free_after_abort = await engine.run(lambda e: e.block_manager.num_free_blocks)

        async with contextlib.aclosing(engine.generate(PROMPTS[1], long, request_id="b")) as stream:
            async for _ in stream:
                break  # the consumer goes away: closing the stream aborts the request
        pending = await engine.run(lambda e: (e.num_unfinished_requests, e.block_manager.num_free_blocks))
        await engine.close()
        return bm.num_blocks, free_after_abort, pending

    total, free_after_abort, (unfinished, free) = asyncio.run(main())
    assert free_after_abort == total and unfinished == 0 and free == total


def test_refused_request_raises_in_the_caller(engine) -> None:
    async def main():
        with pytest.raises(RequestError, match="vocabulary"):
            await _collect(engine, [1, 10**6], SamplingParams())
        ok = await _collect(engine, PROMPTS[1], SamplingParams(max_tokens=2, ignore_eos=True))
        await engine.close()
        return ok

    assert asyncio.run(main())[-1].finished


def test_session_turns_and_end_session(engine) -> None:
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        await _collect(engine, PROMPTS[0], p, session_id="s")
        held = await engine.run(lambda e: e.scheduler.sessions.num_blocks_held)
        outs = await _collect(engine, [9, 9], p, session_id="s")
        assert outs[-1].num_cached_tokens == len(PROMPTS[0]) + 3
        assert await engine.end_session("s")
        free = await engine.run(lambda e: e.block_manager.num_free_blocks == e.block_manager.num_blocks)
        await engine.close()
        return held, free

    held, free = asyncio.run(main())
    assert held > 0 and free


def test_cancelled_consumer_aborts_its_request(engine) -> None:
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()  # a dropped client
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state = await engine.run(lambda e: (e.num_unfinished_requests, e.block_manager.num_free_blocks))
        await engine.close()
        return state, engine.engine.block_manager.num_blocks

    (unfinished, free), total = asyncio.run(main())
    assert unfinished == 0 and free == total
