"""Prometheus metrics of the server, true for the whole server however many workers it runs.

One worker keeps its series in a registry of its own (not prometheus_client's global one), so
several apps in one process -- tests, or models served side by side -- never collide over metric
names. With `--workers N` each worker is a process of its own behind one port and a scrape
reaches whichever one the kernel picks, so serve() runs them in prometheus_client's multiprocess
mode: `multiprocess_dir` gives the server a fresh directory and exports PROMETHEUS_MULTIPROC_DIR
before uvicorn spawns the workers (prometheus_client reads it when a worker imports it); every
worker writes its values to files there and a scrape merges all workers' files. Counters and
histograms of a worker that died keep counting (they are the server's totals); its gauges leave
the sums (`livesum`, mark_process_dead).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.serve.prefix_cache import NO_PREFIX_CACHE, PrefixCacheStats

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the server needs prometheus_client: pip install 'lmforge[serve]'") from exc

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's name for the directory
DIR_PREFIX = "lmforge-metrics-"  # + the serving process's pid + a random part
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
GAUGE_PERIOD_S = 0.5  # how often a worker that is not scraped writes its engine gauges


@contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """A new directory for the metric files of the workers started inside the with-block,
    exported as PROMETHEUS_MULTIPROC_DIR, and removed afterwards.

    It is made inside the PROMETHEUS_MULTIPROC_DIR the caller set, if any (a volume that outlives
    a container, say), else in the system temp dir. New for every server, so the files a crashed
    server left behind never add their counts to this one's; the directories of servers whose
    process is gone are removed on the way in.
    """
    previous = os.environ.get(MULTIPROC_ENV)
    base = Path(previous) if previous else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_dirs(base)
    path = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=base))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous


def _remove_orphaned_dirs(base: Path) -> None:
    """Removes the metric directories in `base` of servers that are no longer running (killed
    before they could clean up); a directory named after this process is a former one's that
    had the same pid (pid 1 in a restarted container)."""
    for path in base.glob(f"{DIR_PREFIX}*"):
        pid = path.name[len(DIR_PREFIX) :].partition("-")[0]
        if path.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_multiprocess_values(path: Path) -> None:
    """prometheus_client picks in-memory or file-backed values once, when it is imported: with
    the directory exported later every worker would count in memory and scrapes show zeros."""
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        raise ConfigError(
            f"{MULTIPROC_ENV}={path} was set after prometheus_client was imported, so this "
            "process's metrics would not reach it; set it before the process starts (lmforge "
            "serve --workers N does this for its workers)"
        )


class ServerMetrics:
    """Every series /metrics shows; the server calls the methods, the engine gauges are read
    from engine.stats() at scrape time.

    `multiprocess_dir`: the PROMETHEUS_MULTIPROC_DIR this worker was started with, when it is one
    of several; a scrape then shows the sums over all of them. Gauges are `livesum`: each worker
    has its own engines, so the server's queue depth or KV use is the sum over the live workers
    (those of a worker the scrape did not reach are at most GAUGE_PERIOD_S old).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | Path | None = None) -> None:
        self.multiprocess_dir = None if multiprocess_dir is None else Path(multiprocess_dir)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.model_requests = Counter(
            "lmforge_model_requests", "Completion and chat requests run, by model or LoRA adapter",
            ["model"], registry=r,
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
        self.queue_depth = self._gauge("lmforge_queue_depth", "Requests waiting for a batch slot")
        self.running = self._gauge("lmforge_running", "Sequences in the running batch")
        self.kv_tokens = self._gauge("lmforge_kv_cache_tokens", "KV positions the batch spans")
        self.kv_capacity = self._gauge("lmforge_kv_cache_capacity", "KV positions allocated")
        self.cache = Counter("lmforge_cache", "Response cache lookups", ["result"], registry=r)
        self.prefix_lookups = Counter(
            "lmforge_prefix_cache_lookups", "Prompt prefix cache lookups (hit: a block reused)",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.prefix_hit_tokens = Counter(
            "lmforge_prefix_cache_hit_tokens", "Prompt tokens reused, not prefilled", ["model"],
            registry=r,
        )  # fmt: skip
        self.prefix_evictions = Counter(
            "lmforge_prefix_cache_evictions", "Prefix cache blocks evicted", ["model"], registry=r
        )
        self.prefix_bytes = self._gauge("lmforge_prefix_cache_bytes", "Prefix cache bytes held")
        self._prefix_seen: dict[str, PrefixCacheStats] = {}  # each engine's, at the last read
        self.safety = Counter(
            "lmforge_safety_verdicts", "Safety verdicts by where and action", ["where", "action"],
            registry=r,
        )  # fmt: skip
        self.feedback = Counter(
            "lmforge_feedback_rows", "Rows written to the feedback store", ["kind"], registry=r
        )
        self.embedding_requests = self._per_model("lmforge_embedding_requests",
                                                  "/v1/embeddings requests answered")  # fmt: skip
        self.embedding_inputs = self._per_model("lmforge_embedding_inputs", "Inputs embedded")
        self.embedding_tokens = self._per_model("lmforge_embedding_tokens", "Input tokens embedded")
        self._scraped = self.registry
        if self.multiprocess_dir is not None:  # the files of every worker, merged at each scrape
            _check_multiprocess_values(self.multiprocess_dir)
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, path=str(self.multiprocess_dir))

    def count_embeddings(self, model: str, inputs: int, tokens: int) -> None:
        """One answered /v1/embeddings request of `inputs` inputs and `tokens` tokens."""
        self.embedding_requests.labels(model).inc()
        self.embedding_inputs.labels(model).inc(inputs)
        self.embedding_tokens.labels(model).inc(tokens)

    def forget_model(self, model: str) -> None:
        """Drops a model's request series (a LoRA adapter unloaded at runtime), so /metrics no
        longer shows a model the server stopped serving; one it never counted is skipped. Only
        this process's series: runtime unloading needs one worker (ServeSettings)."""
        for metric in (self.model_requests, self.prompt_tokens, self.generated_tokens,
                       self.ttft, self.itl):  # fmt: skip
            with suppress(KeyError):
                metric.remove(model)

    def _per_model(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, ["model"], registry=self.registry)

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["model"], registry=self.registry, multiprocess_mode="livesum")

    def observe_engines(self, engines: dict[str, Any]) -> None:
        for name, engine in engines.items():
            stats = engine.stats()
            self.queue_depth.labels(name).set(stats.queue_depth)
            self.running.labels(name).set(stats.running)
            self.kv_tokens.labels(name).set(stats.cache_tokens)
            self.kv_capacity.labels(name).set(stats.cache_capacity)
            self._count_prefix(name, stats.prefix)

    def _count_prefix(self, name: str, now: PrefixCacheStats) -> None:
        """The prefix cache's all-time counts (EngineStats) as counter increments since the
        last read."""
        was = self._prefix_seen.get(name, NO_PREFIX_CACHE)
        self._prefix_seen[name] = now
        self.prefix_lookups.labels(name, "hit").inc(max(0, now.hits - was.hits))
        self.prefix_lookups.labels(name, "miss").inc(max(0, now.misses - was.misses))
        self.prefix_hit_tokens.labels(name).inc(max(0, now.hit_tokens - was.hit_tokens))
        self.prefix_evictions.labels(name).inc(max(0, now.evictions - was.evictions))
        self.prefix_bytes.labels(name).set(now.bytes)

    async def observe_engines_every(self, engines: dict[str, Any], period: float) -> None:
        """Writes the engine gauges every `period` seconds until cancelled: with several workers
        a scrape refreshes only the worker it reaches, the others' gauges come from here. A
        failed read is logged and retried next period: the task must not end silently, or this
        worker's gauges would freeze in every scrape."""
        while True:
            try:
                self.observe_engines(engines)
            except Exception:
                log.exception("metrics: reading the engine gauges failed; retrying in %.1f s",
                              period)  # fmt: skip
            await asyncio.sleep(period)

    def render(self, engines: dict[str, Any]) -> bytes:
        self.observe_engines(engines)
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self._forget_dead_workers()
        try:
            return generate_latest(self._scraped)
        except FileNotFoundError:  # a worker's gauge file went away while it was being read
            return generate_latest(self._scraped)

    def close(self) -> None:
        """At this worker's exit: its gauges leave the sums (its counters stay in the totals)."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))

    def _forget_dead_workers(self) -> None:
        """Drops the gauges of workers that died without close() (killed; uvicorn starts
        another)."""
        pids = {f.stem.rpartition("_")[2] for f in self.multiprocess_dir.glob("gauge_live*.db")}
        for pid in filter(str.isdigit, pids):
            if not _alive(int(pid)):
                mark_process_dead(int(pid), str(self.multiprocess_dir))
