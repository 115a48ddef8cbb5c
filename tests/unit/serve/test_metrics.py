"""Server metrics summed over worker processes (prometheus_client's multiprocess mode) and the
per-server metrics directory: fresh every time, removed after, orphans of killed servers swept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from lmforge.errors import ConfigError
from lmforge.serve.metrics import DIR_PREFIX, MULTIPROC_ENV, ServerMetrics, multiprocess_dir
from lmforge.serve.prefix_cache import NO_PREFIX_CACHE

ROOT = Path(__file__).resolve().parents[3]

# One worker: counts `n` requests, one TTFT each, sets its engine gauges to `queue` waiting
# requests, then renders /metrics (stdout) and exits without close() when `crash`.
WORKER = textwrap.dedent("""
    import sys, types
    from lmforge.serve.metrics import ServerMetrics
    from lmforge.serve.prefix_cache import PrefixCacheStats
    n, queue, crash = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "crash"
    m = ServerMetrics(sys.argv[4])
    for _ in range(n):
        m.requests.labels("/v1/completions", "200").inc()
        m.ttft.labels("micro").observe(0.02)
    prefix = PrefixCacheStats(hits=n, hit_tokens=16 * n, bytes=100 * queue)
    stats = types.SimpleNamespace(
        queue_depth=queue, running=1, cache_tokens=8, cache_capacity=64, prefix=prefix
    )
    engine = types.SimpleNamespace(stats=lambda: stats)
    sys.stdout.write(m.render({"micro": engine}).decode())
    if not crash:
        m.close()
""")


def run_worker(path: Path, n: int, queue: int, exit_how: str) -> dict[str, float]:
    env = {**os.environ, MULTIPROC_ENV: str(path), "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(n), str(queue), exit_how, str(path)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(line.rsplit(" ", 1) for line in out.splitlines() if not line.startswith("#"))


def test_counters_sum_over_workers_and_a_dead_workers_gauges_leave(tmp_path):
    first = run_worker(tmp_path, 3, queue=2, exit_how="crash")
    assert float(first['lmforge_requests_total{endpoint="/v1/completions",status="200"}']) == 3
    second = run_worker(tmp_path, 4, queue=5, exit_how="close")
    assert float(second['lmforge_requests_total{endpoint="/v1/completions",status="200"}']) == 7
    assert float(second['lmforge_time_to_first_token_seconds_count{model="micro"}']) == 7
    fast = 'lmforge_time_to_first_token_seconds_bucket{le="0.025",model="micro"}'
    assert float(second[fast]) == 7
    # the first worker died without close(): its gauges are dropped, not added to the second's
    assert float(second['lmforge_queue_depth{model="micro"}']) == 5
    assert float(second['lmforge_kv_cache_capacity{model="micro"}']) == 64
    # each worker's own prefix cache: its hits add up, its bytes held leave with it
    hits = 'lmforge_prefix_cache_lookups_total{model="micro",result="hit"}'
    assert float(second[hits]) == 7
    assert float(second['lmforge_prefix_cache_hit_tokens_total{model="micro"}']) == 16 * 7
    assert float(second['lmforge_prefix_cache_bytes{model="micro"}']) == 500
    assert not list(tmp_path.glob("gauge_live*"))  # the second closed, the first was swept
    assert list(tmp_path.glob("counter_*.db"))  # totals stay


def test_one_worker_without_the_env_keeps_an_in_memory_registry():
    m = ServerMetrics()
    m.requests.labels("/v1/models", "200").inc()
    text = m.render({}).decode()
    assert 'lmforge_requests_total{endpoint="/v1/models",status="200"} 1.0' in text


def test_directory_exported_after_the_import_is_refused(tmp_path):
    """This process imported prometheus_client without the env, so its values live in memory."""
    with pytest.raises(ConfigError, match="set after prometheus_client was imported"):
        ServerMetrics(tmp_path)


def test_multiprocess_dir_is_fresh_removed_after_and_sweeps_orphans(tmp_path, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose server is not running any more
    dead = tmp_path / f"{DIR_PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{DIR_PREFIX}{os.getpid()}-old"  # a former process's, with this pid
    alive = tmp_path / f"{DIR_PREFIX}{os.getppid()}-xyz"
    for d in (dead, mine, alive):
        d.mkdir()
        (d / "counter_1.db").write_bytes(b"old counts")
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with multiprocess_dir() as path:
        assert os.environ[MULTIPROC_ENV] == str(path) and path.parent == tmp_path
        assert list(path.iterdir()) == []
        assert not dead.exists() and not mine.exists() and alive.exists()
    assert not path.exists() and os.environ[MULTIPROC_ENV] == str(tmp_path)
    monkeypatch.delenv(MULTIPROC_ENV)
    with multiprocess_dir() as path:
        assert os.environ[MULTIPROC_ENV] == str(path)
    assert MULTIPROC_ENV not in os.environ and not path.exists()


def test_periodic_gauges_survive_a_failed_engine_read(caplog):
    """One failing engine.stats() is logged; the task goes on and later reads set the gauges."""
    import asyncio
    import types

    calls = []

    def stats():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("engine busy")
        return types.SimpleNamespace(
            queue_depth=3, running=2, cache_tokens=8, cache_capacity=64, prefix=NO_PREFIX_CACHE
        )

    m = ServerMetrics()

    async def run():
        task = asyncio.create_task(
            m.observe_engines_every({"micro": types.SimpleNamespace(stats=stats)}, 0.01)
        )
        for _ in range(200):  # at most 2 s: a task that died after the failure never gets there
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 3, "the gauge task stopped after a failed read"
    assert "reading the engine gauges failed" in caplog.text
    assert m.queue_depth.labels("micro")._value.get() == 3
