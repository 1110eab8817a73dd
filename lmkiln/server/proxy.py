"""The request distributor (``lmkiln serve proxy``): one OpenAI-compatible endpoint in front of several
api_servers (:func:`build_proxy_app`).

Nodes join with ``POST /nodes/add {"url": ...}`` (``api_server --proxy-url`` does it on start and leaves
with ``/nodes/remove`` on shutdown); ``GET /nodes/status`` lists them. Every ``health_interval_s`` each
node's ``/health`` is polled (``health_timeout_s``); a node failing ``max_health_failures`` checks in a
row, or refusing a connection, is dropped. ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` are forwarded to the node the routing strategy picks; a streamed answer is passed through
chunk by chunk. A node that fails (no connection, a 5xx) before anything was sent to the client gets its
request retried on another node, at most once per node.

Routing strategies: ``random``; ``min_expected_latency``: fewest requests in flight, weighted by the
node's mean observed latency (a node without history counts as the mean of the others);
``min_observed_latency``: the lowest mean latency of recent requests (a node without history first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from lmkiln.server.errors import APIError, bad_request, install_error_handlers

log = logging.getLogger(__name__)

STRATEGIES = ("random", "min_expected_latency", "min_observed_latency")
FORWARDED_HEADERS = ("authorization", "content-type", "accept")
LATENCY_WINDOW = 32


class NodeRequest(BaseModel):
    url: str = Field(..., pattern=r"^https?://[^\s/]+(/[^\s]*)?$", description="base URL of an api_server")


@dataclass
class Node:
    url: str
    inflight: int = 0
    served: int = 0
    failures: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def mean_latency(self) -> float | None:
        return sum(self.latencies) / len(self.latencies) if self.latencies else None

    def status(self) -> dict[str, Any]:
        return {"inflight": self.inflight, "served": self.served, "health_failures": self.failures,
                "mean_latency_s": self.mean_latency()}


def no_nodes() -> APIError:
    return APIError(503, "No api_server node is available; register one with POST /nodes/add",
                    "server_error", None, "no_available_node", {"Retry-After": "1"})


def node_failed(url: str, why: str) -> APIError:
    return APIError(502, f"The api_server node {url} failed: {why}", "server_error", None, "node_failed")


def normalize(url: str) -> str:
    return url.rstrip("/")


class Proxy:
    """The node table, the routing strategy and the forwarding of one request (with retries)."""

    def __init__(self, strategy: str, health_timeout_s: float, max_health_failures: int,
                 request_timeout_s: float, seed: int | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if max_health_failures < 1:
            raise ValueError(f"max_health_failures must be >= 1, got {max_health_failures}")
        self.strategy = strategy
        self.health_timeout_s = health_timeout_s
        self.max_health_failures = max_health_failures
        self.request_timeout_s = request_timeout_s
        self.nodes: dict[str, Node] = {}
        self.rng = random.Random(seed)
        self.client: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.request_timeout_s, connect=min(5.0, self.request_timeout_s)),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self.client

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------------------------------------ nodes

    async def healthy(self, url: str) -> bool:
        try:
            r = await self.http().get(f"{url}/health", timeout=self.health_timeout_s)
        except httpx.HTTPError as e:
            log.info("health check of %s failed: %s", url, e)
            return False
        return r.status_code == 200

    async def add(self, url: str) -> None:
        url = normalize(url)
        if not await self.healthy(url):
            raise bad_request(f"the node {url} does not answer GET /health", param="url",
                              code="node_unreachable")
        if url not in self.nodes:
            self.nodes[url] = Node(url)
            log.info("node %s added (%d in all)", url, len(self.nodes))

    def remove(self, url: str, why: str) -> bool:
        node = self.nodes.pop(normalize(url), None)
        if node is not None:
            log.warning("node %s removed: %s (%d left)", node.url, why, len(self.nodes))
        return node is not None

    async def check_all(self) -> None:
        """One round of health checks (concurrent, each bounded by ``health_timeout_s``)."""
        nodes = list(self.nodes.values())
        results = await asyncio.gather(*(self.healthy(n.url) for n in nodes))
        for node, ok in zip(nodes, results, strict=True):
            node.failures = 0 if ok else node.failures + 1
            if node.failures >= self.max_health_failures:
                self.remove(node.url, f"{node.failures} failed health checks")

    # ---------------------------------------------------------------------------------------- routing

    def pick(self, exclude: Iterable[str] = ()) -> Node | None:
        skip = set(exclude)
        nodes = [n for url, n in self.nodes.items() if url not in skip]
        if not nodes:
            return None
        if self.strategy == "random":
            return self.rng.choice(nodes)
        known = [m for n in nodes if (m := n.mean_latency()) is not None]
        prior = sum(known) / len(known) if known else 1.0
        if self.strategy == "min_observed_latency":
            return min(nodes, key=lambda n: (n.mean_latency() or 0.0, n.inflight))
        return min(nodes, key=lambda n: ((n.inflight + 1) * (n.mean_latency() or prior), n.served))

    # ------------------------------------------------------------------------------------- forwarding

    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        stream = False
        if request.method == "POST" and body:
            try:
                stream = bool(json.loads(body).get("stream", False))
            except (ValueError, AttributeError):
                stream = False  # the node answers the malformed body with its own 400
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        tried: list[str] = []
        last_error: APIError | None = None
        for _ in range(max(1, len(self.nodes))):
            node = self.pick(tried)
            if node is None:
                break
            tried.append(node.url)
            try:
                return await self._attempt(node, request.method, path, headers, body, stream)
            except _Retry as e:
                last_error = e.error
                log.warning("%s %s on %s failed (%s); %s", request.method, path, node.url, e.error.message,
                            "retrying on another node" if len(self.nodes) > len(tried) else "no node left")
        raise last_error or no_nodes()

    async def _attempt(self, node: Node, method: str, path: str, headers: dict[str, str], body: bytes,
                       stream: bool) -> Response:
        client = self.http()
        req = client.build_request(method, f"{node.url}{path}", headers=headers, content=body or None)
        t0 = time.perf_counter()
        node.inflight += 1
        done = False
        try:
            try:
                resp = await client.send(req, stream=True)
            except httpx.TransportError as e:
                if isinstance(e, httpx.ConnectError):
                    self.remove(node.url, f"connection failed ({e})")
                raise _Retry(node_failed(node.url, str(e) or type(e).__name__)) from e
            if resp.status_code >= 500:
                text = (await resp.aread()).decode(errors="replace")[:200]
                await resp.aclose()
                raise _Retry(node_failed(node.url, f"HTTP {resp.status_code}: {text}"))
            out_headers = {k: v for k, v in resp.headers.items()
                           if k.lower() in ("content-type", "retry-after", "cache-control")}
            if not stream or resp.status_code != 200:
                try:
                    content = await resp.aread()
                except httpx.HTTPError as e:
                    raise _Retry(node_failed(node.url, f"reading the answer: {e}")) from e
                finally:
                    await resp.aclose()
                self._finished(node, t0, resp.status_code)
                done = True
                return Response(content, status_code=resp.status_code, headers=out_headers)
            chunks = resp.aiter_raw()
            try:
                first = await anext(chunks, b"")
            except httpx.HTTPError as e:
                await resp.aclose()
                raise _Retry(node_failed(node.url, f"before the first chunk: {e}")) from e
            done = True  # from here the stream owns the node's in-flight count
            return StreamingResponse(self._relay(node, t0, resp, first, chunks), status_code=200,
                                     headers=out_headers, background=BackgroundTask(resp.aclose))
        finally:
            if not done:
                node.inflight -= 1

    async def _relay(self, node: Node, t0: float, resp: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        ok = False
        try:
            if first:
                yield first
            try:
                async for chunk in chunks:
                    yield chunk
                ok = True
            except httpx.HTTPError as e:
                log.warning("stream from %s broke after the first chunk: %s", node.url, e)
                yield node_failed(node.url, f"the stream broke: {e}").sse().encode()
        finally:
            await resp.aclose()
            if ok:
                self._finished(node, t0, 200)
            else:
                node.inflight -= 1

    def _finished(self, node: Node, t0: float, status: int) -> None:
        node.inflight -= 1
        if status == 200:
            node.served += 1
            node.latencies.append(time.perf_counter() - t0)


class _Retry(Exception):
    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def build_proxy_app(
    strategy: str = "min_expected_latency",
    nodes: Iterable[str] = (),
    health_interval_s: float = 10.0,
    health_timeout_s: float = 2.0,
    max_health_failures: int = 2,
    request_timeout_s: float = 600.0,
    seed: int | None = None,
) -> FastAPI:
    """The proxy app. ``nodes``: api_server URLs to add on startup (ones that do not answer are skipped
    with a warning). ``health_interval_s``: seconds between health-check rounds (0: no periodic checks)."""
    proxy = Proxy(strategy, health_timeout_s, max_health_failures, request_timeout_s, seed)

    async def health_loop() -> None:
        while True:
            await asyncio.sleep(health_interval_s)
            try:
                await proxy.check_all()
            except Exception:  # a failed round must not end the checks
                log.exception("health-check round failed")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for url in nodes:
            try:
                await proxy.add(url)
            except APIError as e:
                log.warning("skipping node %s: %s", url, e.message)
        task = asyncio.create_task(health_loop()) if health_interval_s > 0 else None
        log.info("proxy routing by %s over %d node(s)", strategy, len(proxy.nodes))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await proxy.aclose()

    app = FastAPI(title="lmkiln proxy", summary="Distributes OpenAI-compatible requests over api_servers",
                  lifespan=lifespan)
    app.state.proxy = proxy
    install_error_handlers(app)

    @app.post("/nodes/add")
    async def nodes_add(req: NodeRequest) -> dict[str, Any]:
        await proxy.add(req.url)
        return {"success": True, "nodes": sorted(proxy.nodes)}

    @app.post("/nodes/remove")
    async def nodes_remove(req: NodeRequest) -> dict[str, Any]:
        if not proxy.remove(req.url, "asked to leave"):
            raise APIError(404, f"no node {normalize(req.url)} is registered", "invalid_request_error", "url",
                           "node_not_found")
        return {"success": True, "nodes": sorted(proxy.nodes)}

    @app.get("/nodes/status")
    async def nodes_status() -> dict[str, Any]:
        return {"strategy": proxy.strategy, "nodes": {u: n.status() for u, n in proxy.nodes.items()}}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await proxy.forward(request, "/v1/chat/completions")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await proxy.forward(request, "/v1/completions")

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Response:
        return await proxy.forward(request, "/v1/models")

    return app


def serve_proxy(server_name: str = "0.0.0.0", server_port: int = 8000, strategy: str = "min_expected_latency",
                nodes: Iterable[str] = (), health_interval_s: float = 10.0, health_timeout_s: float = 2.0,
                log_level: str = "info") -> None:
    """Run the proxy until interrupted (``lmkiln serve proxy``)."""
    import uvicorn

    app = build_proxy_app(strategy, list(nodes), health_interval_s, health_timeout_s)
    log.info("proxy on http://%s:%d (%s)", server_name, server_port, strategy)
    uvicorn.run(app, host=server_name, port=server_port, log_level=log_level.lower())
