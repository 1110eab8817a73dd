"""A bounded streaming load test of an api_server (``lmkiln bench serve``), after vLLM's benchmark_serving.

Targets ``--url`` (a running api_server or proxy), or starts one in this process on 127.0.0.1 from
``--model-dir``. ``--num-requests`` streaming chat requests run with at most ``--concurrency`` at once;
a ``--abort-fraction`` of them leave after ``--abort-after`` chunks. Then it checks that no request got a
5xx, every request that was not aborted finished (a finish_reason and ``[DONE]``), and, from
``/metrics``, that no KV block and no request is left in the engine. It reports requests/s, output
tokens/s and TTFT / TPOT / ITL (p50, p99, mean; seconds) as JSON; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
         "quietly", "judge", "boxing", "matches", "near", "old", "rivers", "under", "grey", "skies")


@dataclass
class LoadConfig:
    num_requests: int = 32
    concurrency: int = 8
    abort_fraction: float = 0.25
    abort_after: int = 2
    max_tokens: int = 16
    prompt_words: int = 16
    model: str | None = None
    timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 15.0
    seed: int = 0
    api_key: str | None = None
    endpoint: str = "chat"
    metrics_urls: tuple[str, ...] = ()  # where /metrics is read (default: the target; a proxy's nodes)

    def check(self) -> None:
        if self.num_requests < 1 or self.concurrency < 1:
            raise ValueError("--num-requests and --concurrency must be >= 1")
        if not 0.0 <= self.abort_fraction <= 1.0:
            raise ValueError(f"--abort-fraction must be in [0, 1], got {self.abort_fraction}")
        if self.max_tokens < 1 or self.abort_after < 1 or self.prompt_words < 1:
            raise ValueError("--max-tokens, --abort-after and --prompt-words must be >= 1")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be chat or completions, got {self.endpoint!r}")


@dataclass
class RequestResult:
    index: int
    abort: bool
    status: int | None = None
    error: str | None = None
    finished: bool = False
    finish_reason: str | None = None
    aborted: bool = False
    chunk_times: list[float] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    output_tokens: int = 0


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """p50 / p99 (nearest rank on the sorted values) and the mean; None for no values."""
    if not xs:
        return {"p50": None, "p99": None, "mean": None}
    s = sorted(xs)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    return {"p50": rank(0.50), "p99": rank(0.99), "mean": sum(s) / len(s)}


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, index: int, abort: bool,
                      rng: random.Random) -> RequestResult:
    res = RequestResult(index, abort)
    prompt = " ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))
    body: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.model:
        body["model"] = cfg.model
    res.start = time.perf_counter()
    try:
        async with client.stream("POST", f"/v1/{'chat/' if cfg.endpoint == 'chat' else ''}completions",
                                 json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    res.finished = res.finish_reason is not None
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = json.dumps(event["error"])[:300]
                    break
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content") or choice.get("text"):
                        res.chunk_times.append(time.perf_counter())
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                if abort and len(res.chunk_times) >= cfg.abort_after:
                    res.aborted = True
                    break  # leaving the block closes the connection: the server aborts the request
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.perf_counter()
        if not res.output_tokens:
            res.output_tokens = len(res.chunk_times)
    return res


def read_metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


GAUGES = ("kv_cache_used_blocks", "num_requests_running", "num_requests_waiting")


async def drained(client: httpx.AsyncClient, urls: Sequence[str], timeout_s: float
                  ) -> dict[str, float | None]:
    """Poll each ``{url}/metrics`` (bounded) until no engine holds a KV block or runs a request; the last
    reading, summed over the urls (None where a server did not report it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reading: dict[str, float | None] = dict.fromkeys(GAUGES, 0.0)
        for url in urls:
            try:
                r = await client.get(f"{url}/metrics")
                text = r.text if r.status_code == 200 else ""
            except httpx.HTTPError as e:
                log.warning("%s/metrics: %s", url, e)
                text = ""
            for k in GAUGES:
                v, total = read_metric(text, f"lmkiln_{k}"), reading[k]
                reading[k] = None if v is None or total is None else total + v
        if not any(reading.values()) or time.monotonic() > deadline:
            return reading
        await asyncio.sleep(0.1)


async def run_load(url: str, cfg: LoadConfig) -> dict[str, Any]:
    """Run the load against ``url`` and return the report (``report["passed"]``: all checks held)."""
    cfg.check()
    rng = random.Random(cfg.seed)
    aborts = set(rng.sample(range(cfg.num_requests), round(cfg.abort_fraction * cfg.num_requests)))
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits,
                                 headers=headers) as client:
        sem = asyncio.Semaphore(cfg.concurrency)

        async def bounded(i: int) -> RequestResult:
            async with sem:
                return await one_request(client, cfg, i, i in aborts, random.Random(cfg.seed * 7919 + i))

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(cfg.num_requests))),
                                         cfg.timeout_s)
        duration = time.perf_counter() - t0
        after = await drained(client, cfg.metrics_urls or (url,), cfg.drain_timeout_s)
    return report(results, duration, after, cfg, url)


def report(results: list[RequestResult], duration: float, after: dict[str, float | None], cfg: LoadConfig,
           url: str) -> dict[str, Any]:
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    incomplete = [r for r in results if not r.abort and not r.finished]
    aborted = [r for r in results if r.aborted]
    done = [r for r in results if r.finished]
    ttft = [r.chunk_times[0] - r.start for r in results if r.chunk_times]
    itl = [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpot = [(r.end - r.chunk_times[0]) / (r.output_tokens - 1) for r in done
            if r.chunk_times and r.output_tokens > 1]
    leaked = after.get("kv_cache_used_blocks")
    checks = {
        "no_server_errors": not server_errors,
        "all_non_aborted_complete": not incomplete,
        "no_leaked_kv_blocks": leaked == 0,
        "no_running_requests": after.get("num_requests_running") == 0,
    }
    out_tokens = sum(r.output_tokens for r in done)
    return {
        "url": url,
        "config": asdict(cfg) | {"api_key": None},
        "duration_s": duration,
        "requests": len(results),
        "completed": len(done),
        "aborted": len(aborted),
        "server_errors": len(server_errors),
        "incomplete": len(incomplete),
        "errors": [{"index": r.index, "status": r.status, "error": r.error} for r in results
                   if r.error or (not r.abort and not r.finished)][:20],
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_token_throughput": out_tokens / duration if duration > 0 else None,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles(itl),
        "samples": {"ttft_s": ttft, "tpot_s": tpot},  # per request, for latency CDFs
        "after": after,
        "checks": checks,
        "passed": all(checks.values()),
    }


class _InProcessServer:
    """An api_server for ``--model-dir`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, model_dir: Path, device: str, cache: float | int, session_len: int | None) -> None:
        import socket

        import uvicorn

        from lmkiln.engine import AsyncEngine, LLMEngine
        from lmkiln.server.app import build_app
        from lmkiln.server.launch import EngineOptions, default_model_name, engine_config

        cfg = engine_config(EngineOptions(model_dir, cache_max_entry_count=cache, session_len=session_len,
                                          device=device))
        self.model_name = default_model_name(model_dir)
        app = build_app(AsyncEngine(LLMEngine(cfg)), self.model_name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread: Any = None

    def __enter__(self) -> _InProcessServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the api_server did not start")
            time.sleep(0.05)
        log.info("api_server for %s on %s", self.model_name, self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmkiln bench serve", description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running api_server (or proxy), e.g. http://127.0.0.1:23333")
    target.add_argument("--model-dir", type=Path, help="start an api_server on this model (in process)")
    p.add_argument("--device", default="cpu", help="--model-dir: engine device")
    p.add_argument("--cache-max-entry-count", default="256", help="--model-dir: KV blocks (or a fraction)")
    p.add_argument("--session-len", type=int, default=None, help="--model-dir: longest sequence")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--abort-fraction", type=float, default=0.25)
    p.add_argument("--abort-after", type=int, default=2, help="content chunks an aborting client reads")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--model", default=None, help="the model id to send (default: none, the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="/v1/chat/completions or /v1/completions (a model without a chat template)")
    p.add_argument("--metrics-url", action="append", default=[],
                   help="a server whose /metrics the leak check reads (repeat for each node behind a proxy; "
                        "default: the target)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the whole load may take")
    p.add_argument("--drain-timeout", type=float, default=15.0,
                   help="seconds to wait for the engine to free every KV block after the load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (default: stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = LoadConfig(a.num_requests, a.concurrency, a.abort_fraction, a.abort_after, a.max_tokens,
                     a.prompt_words, a.model, a.timeout, drain_timeout_s=a.drain_timeout, seed=a.seed,
                     api_key=a.api_key, endpoint=a.endpoint,
                     metrics_urls=tuple(u.rstrip("/") for u in a.metrics_url))
    try:
        cfg.check()
    except ValueError as e:
        print(f"lmkiln bench serve: error: {e}", file=sys.stderr)
        return 2
    if a.url:
        result = asyncio.run(run_load(a.url.rstrip("/"), cfg))
    else:
        from lmkiln.server.launch import parse_cache_entry

        with _InProcessServer(a.model_dir, a.device, parse_cache_entry(a.cache_max_entry_count),
                              a.session_len) as srv:
            result = asyncio.run(run_load(srv.url, cfg))
        from lmkiln.bench.quality import describe_device
        from lmkiln.engine.loader import resolve_device

        result["device"] = describe_device(resolve_device(a.device))
    text = json.dumps(result, indent=2)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    else:
        print(text)
    summary = (f"{result['completed']}/{result['requests']} completed, {result['aborted']} aborted, "
               f"{result['server_errors']} 5xx, {result['request_throughput'] or 0:.1f} req/s, "
               f"TTFT p50 {result['ttft_s']['p50']}, checks {'passed' if result['passed'] else 'FAILED'}")
    print(summary, file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
