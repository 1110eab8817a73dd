"""From command-line settings to a running engine / server (``lmkiln serve api_server``, ``lmkiln chat``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkiln.engine import EngineConfig, LLMEngine, artifact_kind
from lmkiln.engine.errors import EngineConfigError

log = logging.getLogger(__name__)

# --model-format -> the artifact kinds (manifest.json "kind") it describes
FORMAT_KINDS = {"hf": ("hf_model",), "awq": ("awq", "packed")}
KIND_FORMAT = {"hf_model": "hf", "awq": "awq", "packed": "awq"}


@dataclass
class EngineOptions:
    """The engine flags shared by ``serve api_server`` and ``chat``."""

    model_dir: Path
    model_format: str | None = None
    quant_policy: int = 0
    tp: int = 1
    cache_max_entry_count: float | int = 0.8
    session_len: int | None = None
    max_batch_size: int = 256
    enable_prefix_caching: bool = False
    device: str = "auto"
    extra: dict[str, object] = field(default_factory=dict)
    kv_sink_entries: int = 64


def parse_cache_entry(value: str) -> float | int:
    """``0.5`` is a fraction of free memory, ``512`` a block count (as :class:`EngineConfig` takes them)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def engine_config(opts: EngineOptions) -> EngineConfig:
    """Check the flags against the artifact and build the :class:`EngineConfig`."""
    if opts.tp < 1:
        raise EngineConfigError(f"--tp must be >= 1, got {opts.tp}")
    kind = artifact_kind(opts.model_dir)
    detected = KIND_FORMAT[kind]
    if opts.model_format is not None and kind not in FORMAT_KINDS.get(opts.model_format, ()):
        log.warning("--model-format %s does not match %s: its manifest says it is a %r artifact; serving it "
                    "as %s", opts.model_format, opts.model_dir, kind, detected)
    log.info("%s: %s artifact (model format %s)", opts.model_dir, kind, detected)
    return EngineConfig(
        model_dir=opts.model_dir, device=opts.device, cache_max_entry_count=opts.cache_max_entry_count,
        session_len=opts.session_len, max_num_seqs=opts.max_batch_size,
        enable_prefix_caching=opts.enable_prefix_caching, quant_policy=opts.quant_policy, tp=opts.tp,
        kv_sink_entries=opts.kv_sink_entries,
        **opts.extra,  # type: ignore[arg-type]
    )


def default_model_name(model_dir: Path) -> str:
    """``results/<model>/packed`` -> ``<model>``; an HF dir -> its directory name."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.name if model_dir.name in ("awq", "packed") else model_dir.name


def serve_api_server(
    opts: EngineOptions,
    server_name: str = "0.0.0.0",
    server_port: int = 23333,
    api_keys: list[str] | None = None,
    max_concurrent_requests: int | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    proxy_url: str | None = None,
    shutdown_timeout: float = 30.0,
) -> None:
    """Load the model and serve the OpenAI-compatible API until interrupted; with ``proxy_url``, join
    that proxy once listening and leave it on shutdown.

    SIGTERM / Ctrl-C drains: uvicorn stops accepting connections, lets in-flight requests (streams too)
    finish for up to ``shutdown_timeout`` seconds, then cancels the rest (which aborts them in the engine).
    """
    import asyncio

    import uvicorn

    from lmkiln.engine import AsyncEngine
    from lmkiln.server.app import build_app

    cfg = engine_config(opts)
    name = model_name or default_model_name(opts.model_dir)
    engine = LLMEngine(cfg)
    app = build_app(AsyncEngine(engine), name, api_keys=api_keys,
                    max_concurrent_requests=max_concurrent_requests)
    log.info("serving %s as %r on http://%s:%d (docs at /docs)", opts.model_dir, name, server_name,
             server_port)
    if proxy_url:
        server = uvicorn.Server(uvicorn.Config(app, host=server_name, port=server_port,
                                               log_level=log_level.lower(),
                                               timeout_graceful_shutdown=shutdown_timeout))
        asyncio.run(serve_registered(server, node_url(server_name, server_port), proxy_url))
    else:
        uvicorn.run(app, host=server_name, port=server_port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=shutdown_timeout)


def node_url(server_name: str, server_port: int) -> str:
    """The URL a proxy reaches this server at (a wildcard address becomes this host's address)."""
    import socket

    host = server_name
    if host in ("0.0.0.0", "::", ""):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"http://[{host}]:{server_port}" if ":" in host else f"http://{host}:{server_port}"


async def serve_registered(server: Any, url: str, proxy_url: str, start_timeout_s: float = 600.0,
                           proxy_timeout_s: float = 10.0) -> None:
    """Run ``server`` (a ``uvicorn.Server``); once it listens, ``POST {proxy_url}/nodes/add`` with ``url``,
    and ``/nodes/remove`` it when the server stops. A proxy that cannot be reached is logged, not fatal."""
    import asyncio

    import httpx

    proxy_url = proxy_url.rstrip("/")
    task = asyncio.create_task(server.serve())
    registered = False
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if server.started:
            async with httpx.AsyncClient(timeout=proxy_timeout_s) as client:
                try:
                    r = await client.post(f"{proxy_url}/nodes/add", json={"url": url})
                    registered = r.status_code == 200
                    if not registered:
                        log.error("the proxy %s refused %s: HTTP %d %s", proxy_url, url, r.status_code,
                                  r.text[:200])
                except httpx.HTTPError as e:
                    log.error("could not register %s with the proxy %s: %s", url, proxy_url, e)
            if registered:
                log.info("registered %s with the proxy %s", url, proxy_url)
        await task
    finally:
        if registered:
            async with httpx.AsyncClient(timeout=proxy_timeout_s) as client:
                try:
                    await client.post(f"{proxy_url}/nodes/remove", json={"url": url})
                    log.info("left the proxy %s", proxy_url)
                except httpx.HTTPError as e:
                    log.warning("could not leave the proxy %s: %s", proxy_url, e)
        if not task.done():
            server.should_exit = True
            await asyncio.wait({task}, timeout=30)
