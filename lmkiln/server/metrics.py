"""Prometheus metrics of one app (its own registry: two apps in one process never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lmkiln.server.engine_client import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    """Reads the engine's and the admission queue's state at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], server_waiting: Callable[[], int],
                 server_active: Callable[[], int]) -> None:
        self._stats = stats
        self._server_waiting = server_waiting
        self._server_active = server_active

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("lmkiln_num_requests_running", "Sequences the engine is running", s.running)
        yield GaugeMetricFamily("lmkiln_num_requests_waiting", "Sequences waiting in the engine's queue",
                                s.waiting)
        yield GaugeMetricFamily("lmkiln_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                                s.kv_cache_usage)
        yield GaugeMetricFamily("lmkiln_kv_cache_used_blocks", "KV cache blocks in use", s.used_blocks)
        yield GaugeMetricFamily("lmkiln_kv_cache_blocks", "KV cache blocks in all", s.num_blocks)
        yield CounterMetricFamily("lmkiln_num_preemptions", "Sequences preempted (recomputed later)",
                                  s.num_preemptions)
        yield CounterMetricFamily("lmkiln_prefix_cache_hit_blocks", "KV blocks reused by the prefix cache",
                                  s.prefix_cache_hits)
        yield GaugeMetricFamily("lmkiln_server_requests_active", "HTTP requests admitted and generating",
                                self._server_active())
        yield GaugeMetricFamily("lmkiln_server_requests_queued", "HTTP requests waiting for admission",
                                self._server_waiting())


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats], server_waiting: Callable[[], int],
                 server_active: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("lmkiln_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("lmkiln_inter_token_latency_seconds", "Time between two streamed outputs",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("lmkiln_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("lmkiln_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("lmkiln_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("lmkiln_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("lmkiln_requests_rejected", "Requests refused by admission control",
                                ["status"], registry=r)
        r.register(_EngineCollector(stats, server_waiting, server_active))
