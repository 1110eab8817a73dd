"""``lmkiln bench serve``: a bounded streaming load (some clients leaving mid-stream) on the fake engine
and on the real tiny model; no 5xx, every other request complete, no KV block left behind."""

from __future__ import annotations

import json

from lmkiln.bench.serve import main, percentiles
from lmkiln.server import EngineStats, build_app


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": None, "p99": None, "mean": None}
    p = percentiles([float(x) for x in range(1, 101)])
    assert p["p50"] in (50.0, 51.0) and p["p99"] == 99.0 and p["mean"] == 50.5


def test_load_on_the_fake_engine(tmp_path, live_server, fake_engine_cls) -> None:
    engine = fake_engine_cls(reply_len=12, delay=0.005, session_len=256)
    out = tmp_path / "load.json"
    with live_server(build_app(engine, "fake")) as srv:
        code = main(["--url", srv.url, "--num-requests", "24", "--concurrency", "6",
                     "--abort-fraction", "0.25", "--abort-after", "2", "--max-tokens", "10",
                     "--timeout", "60", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 0, rep
    assert rep["passed"] and rep["server_errors"] == 0 and rep["incomplete"] == 0
    assert rep["aborted"] == 6 and rep["completed"] == 18
    assert len(engine.aborted) == 6 and len(engine.finished) == 18 and not engine.active
    assert rep["after"]["kv_cache_used_blocks"] == 0
    for k in ("ttft_s", "tpot_s", "itl_s"):
        assert 0 < rep[k]["p50"] <= rep[k]["p99"]
    assert rep["request_throughput"] > 0 and rep["output_token_throughput"] > 0


def test_load_through_the_proxy(tmp_path, live_server, fake_engine_cls) -> None:
    from lmkiln.server.proxy import build_proxy_app

    engines = [fake_engine_cls(reply_len=10, delay=0.005, session_len=256) for _ in range(2)]
    out = tmp_path / "load.json"
    with (live_server(build_app(engines[0], "fake")) as a, live_server(build_app(engines[1], "fake")) as b,
          live_server(build_proxy_app("min_expected_latency", nodes=[a.url, b.url],
                                      health_interval_s=0)) as proxy):
        code = main(["--url", proxy.url, "--metrics-url", a.url, "--metrics-url", b.url,
                     "--num-requests", "16", "--concurrency", "4", "--abort-fraction", "0.25",
                     "--max-tokens", "8", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 0, rep
    assert rep["completed"] == 12 and rep["aborted"] == 4 and rep["after"]["kv_cache_used_blocks"] == 0
    assert all(e.started for e in engines) and not any(e.active for e in engines)


def test_load_reports_leaked_blocks(tmp_path, live_server, fake_engine_cls) -> None:
    class Leaky(fake_engine_cls):  # type: ignore[misc, valid-type]
        def stats(self) -> EngineStats:
            return EngineStats(running=0, used_blocks=3, num_blocks=16, kv_cache_usage=3 / 16)

    out = tmp_path / "load.json"
    with live_server(build_app(Leaky(reply_len=4), "fake")) as srv:
        code = main(["--url", srv.url, "--num-requests", "4", "--concurrency", "2", "--abort-fraction", "0",
                     "--max-tokens", "4", "--drain-timeout", "0.5", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 1 and not rep["passed"] and not rep["checks"]["no_leaked_kv_blocks"]
    assert rep["checks"]["no_server_errors"] and rep["checks"]["all_non_aborted_complete"]


def test_bad_arguments() -> None:
    assert main(["--url", "http://127.0.0.1:9", "--abort-fraction", "2"]) == 2


def test_load_on_the_tiny_model(tmp_path, tiny_llama_dir) -> None:
    out = tmp_path / "load.json"
    code = main(["--model-dir", str(tiny_llama_dir), "--cache-max-entry-count", "64", "--session-len", "128",
                 "--num-requests", "6", "--concurrency", "3", "--abort-fraction", "0.34", "--max-tokens", "8",
                 "--prompt-words", "6", "--endpoint", "completions", "--timeout", "120",
                 "--out", str(out)])
    rep = json.loads(out.read_text())
    assert code == 0, rep
    assert rep["server_errors"] == 0 and rep["incomplete"] == 0 and rep["aborted"] == 2
    assert rep["after"] == {"kv_cache_used_blocks": 0.0, "num_requests_running": 0.0,
                            "num_requests_waiting": 0.0}
    assert rep["ttft_s"]["p50"] > 0
