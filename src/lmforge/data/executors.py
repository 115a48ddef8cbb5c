"""Executors: run `pipeline.run_batch` over a stream of batches and yield results in input order.

Order preservation is what makes the output independent of the worker count: results are merged
in batch order, never in completion order. At most a few batches per worker are in flight, so
reading stays ahead of the workers without pulling the whole input into memory.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from lmforge.common.threads import usable_cpus
from lmforge.data import pipeline
from lmforge.errors import ConfigError

Batch = list[tuple[int, Any]]


def default_workers() -> int:
    """All cores this process may use (affinity and cgroup quota)."""
    return usable_cpus()


def run_local(
    batches: Iterable[Batch], cfg_data: dict[str, Any], workers: int
) -> Iterator[dict[str, Any]]:
    """Worker processes (spawned: safe beside threads such as the progress display)."""
    if workers <= 1:
        pipeline.init_worker(cfg_data)
        for batch in batches:
            yield pipeline.run_batch(batch)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=pipeline.init_worker, initargs=(cfg_data, True)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(pipeline.run_batch, (batch,)))
            if len(pending) >= 2 * workers + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def run_ray(
    batches: Iterable[Batch], cfg_data: dict[str, Any], workers: int, address: str | None
) -> Iterator[dict[str, Any]]:
    """A pool of Ray actors (one Worker each), results gathered in submission order."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs Ray installed: pip install 'lmforge[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        actor_cls = ray.remote(_RayWorker)
        n = workers or int(ray.cluster_resources().get("CPU", 1))
        actors = [actor_cls.remote(cfg_data) for _ in range(max(n, 1))]
        pending: deque = deque()
        for i, batch in enumerate(batches):
            pending.append(actors[i % len(actors)].run.remote(batch))
            if len(pending) >= 2 * len(actors) + 1:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        if started_here:
            ray.shutdown()


class _RayWorker:
    """Holds one pipeline.Worker inside a Ray actor."""

    def __init__(self, cfg_data: dict[str, Any]) -> None:
        pipeline.init_worker(cfg_data)

    def run(self, batch: Batch) -> dict[str, Any]:
        return pipeline.run_batch(batch)


def run_batches(
    batches: Iterable[Batch],
    cfg_data: dict[str, Any],
    executor: str,
    workers: int,
    address: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Dispatches to the configured executor."""
    if executor == "ray":
        return run_ray(batches, cfg_data, workers, address)
    return run_local(batches, cfg_data, workers or default_workers())
