"""Load test of a running server: `lmforge serve bench`.

For each concurrency level, that many async clients send streamed /v1/completions requests back
to back until `requests` have been sent, and each request's timing is taken from the SSE stream
itself: time to first token (TTFT) is the request start to the first chunk carrying text, and
inter-token latency (ITL) the gaps between later text chunks as the client reads them (chunks
that arrive in one network read count as a gap of about zero). A level reports requests/s,
output tokens/s (the server's usage counts when it sends them), TTFT and ITL percentiles, and
errors. Sampling runs at temperature 1 without a seed, so no answer can come from the response
cache. Works against any OpenAI-compatible server, not only lmforge's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmforge.errors import InputError

DEFAULT_PROMPTS = (
    "Explain what a hash table is.",
    "Write a Python function that reverses a list.",
    "What does os.path.join do?",
    "Summarize the plot of a detective story in three sentences.",
    "List three uses of a priority queue.",
    "How do I read a file line by line in Python?",
)
PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """One request as the client saw it; `error` is set when it failed."""

    start: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    end: float = 0.0
    error: str | None = None


@dataclass
class LevelResult:
    """What one concurrency level measured (times in milliseconds)."""

    concurrency: int
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    error_samples: list[str]


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 of values in milliseconds (None for each when there are no values)."""
    import numpy as np

    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    points = np.percentile(np.asarray(values) * 1000.0, PERCENTILES)
    return {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, points, strict=True)}


def parse_concurrency(text: str) -> list[int]:
    """ "1,4,16" -> [1, 4, 16]; anything else is an InputError saying what is expected."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(level < 1 for level in levels):
        raise InputError(f"--concurrency {text!r}: expected positive integers, e.g. 1,4,16")
    return levels


def _error_text(status: int, body: bytes) -> str:
    try:
        return f"{status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode(errors='replace')}"


async def one_request(
    client: Any, model: str, prompt: str, max_tokens: int, ignore_eos: bool = False
) -> RequestTiming:
    """Sends one streamed completion and times its chunks; errors are recorded, not raised."""
    import httpx

    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if ignore_eos:  # vLLM's extension, which lmforge serve honours: every answer is max_tokens
        body["ignore_eos"] = True
    timing = RequestTiming(start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = _error_text(response.status_code, await response.aread())
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    timing.error = f"stream: {chunk['error'].get('message', chunk['error'])}"
                    return timing
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if any(choice.get("text") for choice in chunk.get("choices", [])):
                    now = time.perf_counter()
                    timing.first_token = timing.first_token or now
                    timing.token_times.append(now)
            else:
                timing.error = "the stream ended before data: [DONE]"
    except (httpx.HTTPError, ValueError) as err:
        timing.error = f"{type(err).__name__}: {err}"
    finally:
        timing.end = time.perf_counter()
    timing.output_tokens = usage_tokens if usage_tokens is not None else len(timing.token_times)
    return timing


def summarize(concurrency: int, timings: list[RequestTiming], duration: float) -> LevelResult:
    ok = [t for t in timings if t.error is None]
    tokens = sum(t.output_tokens for t in ok)
    gaps = [b - a for t in ok for a, b in itertools.pairwise(t.token_times)]
    errors = sorted({t.error for t in timings if t.error})
    return LevelResult(
        concurrency=concurrency,
        requests=len(timings),
        errors=len(timings) - len(ok),
        duration_s=round(duration, 4),
        requests_per_s=round(len(ok) / duration, 4),
        output_tokens=tokens,
        output_tokens_per_s=round(tokens / duration, 3),
        ttft_ms=percentiles([t.first_token - t.start for t in ok if t.first_token]),
        itl_ms=percentiles(gaps),
        error_samples=errors[:5],
    )


async def run_level(
    url: str, model: str, prompts: Sequence[str], concurrency: int, requests: int,
    max_tokens: int, api_key: str | None = None, ignore_eos: bool = False, timeout: float = 300.0,
) -> LevelResult:  # fmt: skip
    """`concurrency` clients share `requests` requests (prompts taken in turn)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue = iter(range(requests))
    timings: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout, limits=limits
    ) as client:

        async def worker() -> None:
            for i in queue:  # the shared iterator hands each index to exactly one worker
                prompt = prompts[i % len(prompts)]
                timings.append(await one_request(client, model, prompt, max_tokens, ignore_eos))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return summarize(concurrency, timings, duration)


def first_model(url: str, api_key: str | None = None) -> str:
    """The first model GET /v1/models lists that generates (the default when --model is not
    given): an embedding-only model (its `tasks` without "generate") answers no completions."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url}/v1/models", headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise InputError(f"{url}/v1/models: {_error_text(response.status_code, response.content)}")
    models = [m for m in response.json().get("data") or []
              if "generate" in m.get("tasks", ["generate"])]  # fmt: skip
    if not models:
        raise InputError(f"{url}/v1/models lists no model that generates; pass --model NAME")
    return models[0]["id"]


def run_bench(
    url: str, model: str | None, concurrency: Sequence[int], requests: int, max_tokens: int,
    *, api_key: str | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
    ignore_eos: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Every level in turn against `url`: {"url", "model", "max_tokens", "levels": [...]}."""
    if requests < 1 or max_tokens < 1:
        raise InputError("--requests and --max-tokens must be at least 1")
    if not prompts:
        raise InputError("no prompts to send: the prompts file is empty")
    url = url.rstrip("/")
    model = model or first_model(url, api_key)
    levels = [
        asyncio.run(
            run_level(url, model, prompts, level, requests, max_tokens, api_key, ignore_eos)
        )
        for level in concurrency
    ]
    return {
        "url": url, "model": model, "max_tokens": max_tokens, "requests": requests,
        "ignore_eos": ignore_eos,
        "levels": [asdict(level) for level in levels],
    }  # fmt: skip


def render_table(result: dict[str, Any]) -> Any:
    """The rich table `lmforge serve bench` prints: one row per concurrency level."""
    from rich.table import Table

    def ms(values: dict[str, float | None]) -> str:
        return "/".join("-" if v is None else f"{v:.1f}" for v in values.values())

    table = Table(title=f"{result['model']} at {result['url']} (max_tokens {result['max_tokens']})")
    for name in ("clients", "requests", "errors", "req/s", "out tok/s"):
        table.add_column(name, justify="right")
    table.add_column("TTFT ms p50/90/99", justify="right")
    table.add_column("ITL ms p50/90/99", justify="right")
    for level in result["levels"]:
        table.add_row(
            str(level["concurrency"]), str(level["requests"]), str(level["errors"]),
            f"{level['requests_per_s']:.2f}", f"{level['output_tokens_per_s']:.1f}",
            ms(level["ttft_ms"]), ms(level["itl_ms"]),
        )  # fmt: skip
    return table


def bench_command(
    *, url: str | None, start_model: str | None, model: str | None, concurrency: str,
    requests: int, max_tokens: int, api_key: str | None = None, prompts_file: str | None = None,
    out: str | None = None, ignore_eos: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """What `lmforge serve bench` runs: against --url, or a server it starts on --start-model;
    prints the table and writes the JSON to --out (atomically)."""
    from lmforge.common.io import atomic_write_json, read_prompts
    from lmforge.common.logging import console
    from lmforge.serve.launch import ServerProcess

    if (url is None) == (start_model is None):
        raise InputError("pass exactly one of --url URL (a running server) or --start-model DIR")
    levels = parse_concurrency(concurrency)
    prompts = read_prompts(prompts_file) if prompts_file else DEFAULT_PROMPTS
    options = {"api_key": api_key, "prompts": prompts, "ignore_eos": ignore_eos}
    if start_model is None:
        result = run_bench(url, model, levels, requests, max_tokens, **options)
    else:
        # the bench's answers go to a throwaway feedback store, not the model's run directory
        with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
            args = [
                "--feedback-db",
                f"{tmp}/feedback.db",
                *(["--api-key", api_key] * bool(api_key)),
            ]
            with ServerProcess([start_model], args=args) as server:
                result = run_bench(server.url, model, levels, requests, max_tokens, **options)
    console().print(render_table(result))
    if out is not None:
        atomic_write_json(out, result)
        console().print(f"[green]✓[/green] results: {out}")
    return result
