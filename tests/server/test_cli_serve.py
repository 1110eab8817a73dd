"""`lmkiln serve api_server` and `lmkiln chat`: flag checks, format detection, the wiring end to end."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest

from lmkiln.cli import main
from lmkiln.engine import LLMEngine, SamplingParams
from lmkiln.server.chat import ChatSession, run_chat
from lmkiln.server.launch import EngineOptions, default_model_name, engine_config


def test_tp_above_the_gpu_count_is_a_clear_error(capsys, monkeypatch, tiny_llama_dir) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = main(["serve", "api_server", str(tiny_llama_dir), "--tp", "2"])
    assert code == 2 and "--tp 2 needs 2 GPUs on this host but 1 is visible" in capsys.readouterr().err
    code = main(["chat", str(tiny_llama_dir), "--tp", "3"])  # 4 heads do not split 3 ways
    assert code == 2 and "4 attention heads, not a multiple of 3; use --tp 1 or 2" in capsys.readouterr().err


def test_manifest_wins_over_a_contradicting_model_format(tmp_path, caplog) -> None:
    d = tmp_path / "m" / "awq"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"kind": "awq"}))
    with caplog.at_level(logging.WARNING):
        cfg = engine_config(EngineOptions(d, model_format="hf", cache_max_entry_count=16, quant_policy=8))
    assert "--model-format hf does not match" in caplog.text and "serving it as awq" in caplog.text
    assert cfg.quant_policy == 8 and cfg.cache_max_entry_count == 16
    assert default_model_name(d) == "m"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine_config(EngineOptions(d, model_format="awq"))
    assert "does not match" not in caplog.text


def test_serve_api_server_wiring(monkeypatch, tiny_llama_dir) -> None:
    seen: dict = {}

    def fake_run(app, host: str, port: int, log_level: str, timeout_graceful_shutdown: float) -> None:
        async def go():
            t = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=t, base_url="http://t") as c:
                h = {"Authorization": "Bearer k"}
                seen["models"] = (await c.get("/v1/models", headers=h)).json()
                seen["cmpl"] = (await c.post("/v1/completions", headers=h, json={
                    "prompt": "w1 w2 w3", "max_tokens": 3, "temperature": 0, "ignore_eos": True})).json()
            await app.state.server.client.close()

        seen.update(host=host, port=port, log_level=log_level, drain=timeout_graceful_shutdown)
        asyncio.run(go())

    monkeypatch.setattr("uvicorn.run", fake_run)
    code = main(["serve", "api_server", str(tiny_llama_dir), "--device", "cpu", "--cache-max-entry-count",
                 "32", "--session-len", "128", "--api-keys", "k", "--server-port", "9999", "--model-name",
                 "tiny", "--log-level", "warning", "--max-concurrent-requests", "2",
                 "--shutdown-timeout", "7"])
    assert code == 0
    assert (seen["host"], seen["port"], seen["log_level"], seen["drain"]) == ("0.0.0.0", 9999, "warning", 7)
    assert seen["models"]["data"][0]["id"] == "tiny" and seen["models"]["data"][0]["max_model_len"] == 128
    assert seen["cmpl"]["choices"][0]["finish_reason"] == "length"
    assert seen["cmpl"]["usage"]["completion_tokens"] == 3


@pytest.fixture()
def smol_engine(smollm2_dir, smollm2_tokenizer) -> LLMEngine:
    return LLMEngine.from_pretrained(smollm2_dir, device="cpu", cache_max_entry_count=32, block_size=16,
                                     session_len=256)


def test_chat_loop_multi_turn_and_exit(smol_engine) -> None:
    lines = iter(["What is 2+2?", "", "And 3+3?", "exit", "never read"])
    out = io.StringIO()
    turns = run_chat(smol_engine, SamplingParams(temperature=0, max_tokens=4), read=lambda _: next(lines),
                     out=out)
    text = out.getvalue()
    assert text.count("(reply cut at the token limit)") + turns == 2
    assert next(lines) == "never read"
    bm = smol_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(smol_engine.scheduler.sessions) == 0


def test_chat_eof_ends_and_stop_aborts_one_reply(smol_engine) -> None:
    def eof(_: str) -> str:
        raise EOFError

    greedy4 = SamplingParams(temperature=0, max_tokens=4)
    assert run_chat(smol_engine, greedy4, read=eof, out=io.StringIO()) == 0
    chat = ChatSession(smol_engine, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    got: list[str] = []
    reason = chat.reply("Tell me a story.", got.append, stop=lambda: len(got) >= 2)
    assert reason == "abort" and chat.turns == 0
    assert not smol_engine.scheduler.sessions.history(chat.session_id)  # the stopped turn is dropped
    chat.params = greedy4
    reason = chat.reply("Hi", got.append)
    assert reason in ("stop", "length") and chat.turns == 1
    chat.reset()
    bm = smol_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_chat_command(monkeypatch, capsys, smollm2_dir) -> None:
    lines = iter(["Hi"])

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)
    code = main(["chat", str(smollm2_dir), "--device", "cpu", "--cache-max-entry-count", "16",
                 "--session-len", "128", "--max-new-tokens", "3", "--temperature", "0"])
    assert code == 0 and "lmkiln chat" in capsys.readouterr().out


def test_kv_sink_entries_flag(tiny_llama_dir) -> None:
    from lmkiln.cli import _engine_options, build_parser

    p = build_parser()
    a = p.parse_args(["serve", "api_server", str(tiny_llama_dir), "--quant-policy", "4",
                      "--kv-sink-entries", "8"])
    assert engine_config(_engine_options(a)).sink_entries == 8
    a = p.parse_args(["chat", str(tiny_llama_dir), "--quant-policy", "4"])
    assert engine_config(_engine_options(a)).kv_sink_entries == 64  # on by default for quantized caches
    a = p.parse_args(["eval", "ppl-engine", str(tiny_llama_dir), "--out", "x.json", "--kv-sink-entries", "0"])
    assert a.kv_sink_entries == 0 and a.quant_policy == [0, 8, 4]


def test_async_scheduling_flag(tiny_llama_dir) -> None:
    from lmkiln.cli import _engine_options, build_parser

    p = build_parser()
    a = p.parse_args(["serve", "api_server", str(tiny_llama_dir)])
    cfg = engine_config(_engine_options(a))
    assert cfg.async_scheduling and cfg.warmup  # on by default
    a = p.parse_args(["chat", str(tiny_llama_dir), "--no-async-scheduling", "--eager", "--no-warmup"])
    cfg = engine_config(_engine_options(a))
    assert not cfg.async_scheduling and cfg.eager and not cfg.warmup
