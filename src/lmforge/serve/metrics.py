"""Prometheus metrics of one server process, on a registry of its own.

A registry per app (not prometheus_client's global one) so that several apps in one process --
tests, or models served side by side -- never collide over metric names. With `--workers N` each
worker reports its own series; scrape them behind the port or sum them.
"""

from __future__ import annotations

from typing import Any

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the server needs prometheus_client: pip install 'lmforge[serve]'") from exc

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    """Every series /metrics shows; the server calls the methods, the engine gauges are read at
    scrape time from engine.stats() so they are never stale."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "lmforge_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "lmforge_generation_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds", "Submit to first token", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds", "Time between consecutive tokens", ["model"],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "lmforge_e2e_request_latency_seconds", "Request start to last byte", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "lmforge_queue_depth", "Requests waiting for a batch slot", ["model"], registry=r
        )
        self.running = Gauge(
            "lmforge_running", "Sequences in the running batch", ["model"], registry=r
        )
        self.kv_tokens = Gauge(
            "lmforge_kv_cache_tokens", "KV positions the running batch spans", ["model"],
            registry=r,
        )  # fmt: skip
        self.kv_capacity = Gauge(
            "lmforge_kv_cache_capacity", "KV positions allocated", ["model"], registry=r
        )
        self.cache = Counter("lmforge_cache", "Response cache lookups", ["result"], registry=r)
        self.safety = Counter(
            "lmforge_safety_verdicts", "Safety verdicts by where and action", ["where", "action"],
            registry=r,
        )  # fmt: skip
        self.feedback = Counter(
            "lmforge_feedback_rows", "Rows written to the feedback store", ["kind"], registry=r
        )

    def observe_engines(self, engines: dict[str, Any]) -> None:
        for name, engine in engines.items():
            stats = engine.stats()
            self.queue_depth.labels(name).set(stats.queue_depth)
            self.running.labels(name).set(stats.running)
            self.kv_tokens.labels(name).set(stats.cache_tokens)
            self.kv_capacity.labels(name).set(stats.cache_capacity)

    def render(self, engines: dict[str, Any]) -> bytes:
        self.observe_engines(engines)
        return generate_latest(self.registry)
