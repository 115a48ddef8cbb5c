"""Automatic prefix caching in the engine: answers identical with the cache on and off (RoPE and
learned positions, a sliding window, batches joining, n > 1, chunked prefill, int8 and int4
weights), failures that stay inside their request; a real server whose /metrics hit counters
rise, its answers unchanged. The store itself: test_prefix_cache_store.py."""

from __future__ import annotations

import contextlib
import re
import urllib.request

import pytest
import torch

from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.serve.prefix_cache import BLOCK_TOKENS, PrefixCache
from lmforge.tokenizer.files import TokenizerFiles

B = BLOCK_TOKENS
SYSTEM = [(7 * i + 3) % 200 + 5 for i in range(2 * B + 5)]  # a shared "system prompt"


# -- the engine: the same answers with the cache on and off -------------------------------------


@pytest.fixture(scope="module")
def files(serve_model_dir) -> TokenizerFiles:
    return TokenizerFiles.load(serve_model_dir)


def _model(preset: str, vocab_size: int, **overrides) -> Transformer:
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size=vocab_size, init_std=0.2, **overrides)
    return Transformer(config).eval()


PROMPTS = [
    [*SYSTEM, 40, 41, 42],
    [*SYSTEM, 50],
    SYSTEM[: 2 * B + 1],  # two whole blocks and one token
    SYSTEM[:B],  # exactly one block: nothing reusable
    SYSTEM[: B - 4],  # shorter than a block
    [*SYSTEM[: B + 3], 60, 61, 62, 63, 64, 65, 66, 67, 68],
    [*SYSTEM, *range(70, 70 + B + 9)],  # after its hit, a tail over the chunk tests' budgets
    [9, 8, 7],
]


def _answers(engine: Engine, prompts: list[list[int]], tag: str, stagger: bool = True):
    """(tokens, logprobs) of a greedy and a seeded answer per prompt (n > 1: the same prompt
    twice); with stagger, every other prompt's greedy request is decoding before the next
    ones are submitted, so they join a running batch."""
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True, logprobs=0)
    started = []  # (handle, its first event, read early)
    for i, ids in enumerate(prompts):
        handle = engine.submit(ids, greedy, f"{tag}-g{i}")
        first = next(iter(handle)) if stagger and i % 2 == 0 else None
        started += [(handle, first), (engine.submit(ids, seeded, f"{tag}-s{i}"), None)]
    out = []
    for handle, first in started:
        c = collect(handle)
        head = [] if first is None else [(first.token_id, first.logprob)]
        pairs = head + list(zip(c.token_ids, c.logprobs, strict=True))
        out.append(([t for t, _ in pairs], [lp for _, lp in pairs]))
    return out


def _served(model, files, mb: float, budget: int = 2048, rounds: int = 2):
    engine = Engine(model, files, name="m", prefix_cache_mb=mb, max_prefill_tokens=budget)
    engine.start()
    try:
        results = [_answers(engine, PROMPTS, f"r{r}") for r in range(rounds)]
        return results, engine.stats().prefix
    finally:
        engine.shutdown(drain=False)


def _assert_same(off, on) -> None:
    for a, b in zip(off, on, strict=True):
        assert a[0] == b[0]  # the same tokens
        assert a[1] == pytest.approx(b[1], abs=1e-4)  # logprobs up to float reassociation


@pytest.mark.parametrize(
    ("preset", "window"),  # RoPE (GQA); learned positions; a window inside the cached blocks
    [("micro", None), ("micro-gpt2", None), ("micro", 8)],
)
def test_answers_are_the_same_with_the_cache_on_and_off(files, preset, window):
    model = _model(preset, files.vocab_size, sliding_window=window)
    off, none = _served(model, files, 0)
    on, stats = _served(model, files, 4)
    assert none.hits == 0 and none.blocks == 0
    for r in range(2):
        _assert_same(off[r], on[r])
    # the second round found the first round's blocks: every prompt over one block + 1 token
    reusable = [p for p in PROMPTS if len(p) > B]
    assert stats.hits >= 2 * len(reusable)
    assert stats.hit_tokens >= 2 * sum((len(p) - 1) // B * B for p in reusable)
    assert len({tuple(a[0]) for a in off[0]}) > 2  # the model is not degenerate


@pytest.mark.parametrize("budget", [7, B, B + 1])  # chunks inside, at and across block edges
def test_chunked_prefill_starts_after_the_cached_blocks(files, budget):
    model = _model("micro", files.vocab_size)
    off, _ = _served(model, files, 0, budget=budget)
    on, stats = _served(model, files, 4, budget=budget)
    for r in range(2):
        _assert_same(off[r], on[r])
    assert stats.hits > 0


def test_a_cache_too_small_for_a_block_stores_nothing_and_changes_nothing(files):
    model = _model("micro", files.vocab_size)
    off, _ = _served(model, files, 0, rounds=1)
    on, stats = _served(model, files, 1e-4, rounds=1)
    _assert_same(off[0], on[0])
    assert (stats.blocks, stats.hits) == (0, 0)


def test_running_out_of_device_memory_in_the_cache_fails_no_request(files, monkeypatch, caplog):
    import lmforge.serve.prefix_cache as prefix_cache

    model = _model("micro", files.vocab_size)
    off, _ = _served(model, files, 0, rounds=1)

    def short_of_memory(*args):  # every copy of a block fails, as on a full GPU
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(prefix_cache, "_Block", short_of_memory)
    with caplog.at_level("WARNING", logger="lmforge.serve.prefix_cache"):
        on, stats = _served(model, files, 4, rounds=1)
    _assert_same(off[0], on[0])
    assert (stats.blocks, stats.bytes) == (0, 0)
    assert "out of device memory" in caplog.text


@pytest.mark.parametrize("where", ["store_batch", "_emit"])  # the cache; the first token
def test_a_failure_after_a_chunked_prefill_fails_that_request_not_hangs_it(files, where):
    """The row has left the chunked queue by then, so the engine's step handler cannot see it."""
    import time

    engine = Engine(_model("micro", files.vocab_size), files, name="m", prefix_cache_mb=4,
                    max_prefill_tokens=7)  # fmt: skip

    def broken(*args):
        raise RuntimeError("a bug")

    owner = engine._prefix if where == "store_batch" else engine
    setattr(owner, where, broken)
    engine.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        chunked = engine.submit(PROMPTS[0], params, "chunked")  # over the budget: in chunks
        deadline = time.monotonic() + 30
        while not chunked.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chunked.finish_reason == "error"
        delattr(owner, where)  # mended: the engine serves on
        short = collect(engine.submit([9, 8, 7], params, "after"))
        assert len(short.token_ids) == 4
    finally:
        engine.shutdown(drain=False)


def test_a_group_keeps_the_blocks_its_step_was_planned_with(files, monkeypatch):
    """Two prompts admitted in one step, prefilled in two groups: the first group's store must
    not evict the blocks the second was counted on to reuse (its pass would run them again,
    over the step's prefill budget)."""
    import lmforge.serve.step_loop as step_loop_module
    from lmforge.serve.causal_step import prefill_pass

    model = _model("micro", files.vocab_size)
    shared = [*SYSTEM[: 2 * B], 1]  # its two blocks cached before the step
    new = [(5 * i + 1) % 200 + 5 for i in range(3 * B + 1)]  # three blocks the step stores
    budget = len(new) + 1  # both prompts' uncached tokens, and no more
    cfg = model.config
    block = 2 * cfg.n_layer * cfg.n_kv_head * B * cfg.hd * 4  # one block's fp32 keys/values
    runs = {}
    for mb in (0, 3 * block / 2**20):  # off; room for three blocks
        engine = Engine(model, files, name="m", prefix_cache_mb=mb, max_prefill_tokens=budget)
        with torch.inference_mode():
            cache, _ = prefill_pass(model, [shared], torch.device("cpu"))
        engine._prefix.store_batch([shared], cache)
        passes = []  # the tokens each pass ran

        def spy(model, prompts, device, hits, passes=passes):
            passes.append(sum(len(p) - h.tokens for p, h in zip(prompts, hits, strict=True)))
            return prefill_pass(model, prompts, device, hits)

        monkeypatch.setattr(step_loop_module, "prefill_pass", spy)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
        handles = [engine.submit(p, params, f"{mb}-{i}") for i, p in enumerate((new, shared))]
        engine.start()  # both were waiting: admitted in its first step, two groups
        try:
            runs[mb] = [collect(h) for h in handles]
        finally:
            engine.shutdown(drain=False)
        if mb:
            assert passes == [len(new), 1]  # the shared prompt ran only its last token
            assert sum(passes) <= budget
            assert engine.stats().prefix.hits == 1
    off, on = runs.values()
    for a, b in zip(off, on, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_a_batched_prefill_retried_row_by_row_counts_each_lookup_once(files, monkeypatch):
    """A failed batched prefill is retried one row at a time, each row looked up again: the
    hits, misses and reused tokens must be those of the same step without the failure."""
    import lmforge.serve.step_loop as step_loop_module
    from lmforge.serve.causal_step import prefill_pass

    model = _model("micro", files.vocab_size)
    # two hits on SYSTEM's blocks and a miss, each with 6 tokens to run: one prefill group
    prompts = [[*SYSTEM, 40], [*SYSTEM, 50], [9, 8, 7, 6, 5, 4]]
    runs = []
    for fail in (False, True):
        engine = Engine(model, files, name="m", prefix_cache_mb=4)
        with torch.inference_mode():
            cache, _ = prefill_pass(model, [SYSTEM], torch.device("cpu"))
        engine._prefix.store_batch([SYSTEM], cache)
        passes = []  # prompts per pass

        def flaky(model, prompts, device, hits, passes=passes, fail=fail):
            passes.append(len(prompts))
            if fail and len(prompts) > 1:
                raise RuntimeError("batched prefill failed")
            return prefill_pass(model, prompts, device, hits)

        monkeypatch.setattr(step_loop_module, "prefill_pass", flaky)
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        handles = [engine.submit(p, params, f"{fail}-{i}") for i, p in enumerate(prompts)]
        engine.start()  # all three were waiting: one step, one group
        try:
            answers = [collect(h).token_ids for h in handles]
        finally:
            engine.shutdown(drain=False)
        stats = engine.stats().prefix
        runs.append((answers, stats.hits, stats.misses, stats.hit_tokens))
        assert passes == ([3, 1, 1, 1] if fail else [3])
    assert runs[0][1:] == (2, 1, 2 * 2 * B)
    assert runs[1] == runs[0]


@pytest.mark.parametrize("scheme", ["int8", "int4"])  # weights served quantized; the KV float
def test_quantized_weights_give_the_same_answers_with_the_cache(serve_model_dir, tmp_path, scheme):
    from lmforge.compress.quantize import quantize_dir

    q = tmp_path / scheme
    quantize_dir(serve_model_dir, q, scheme, 32)
    runs = []
    for mb in (0, 4):
        engine = Engine.from_dir(q, device="cpu", prefix_cache_mb=mb)
        engine.start()
        try:
            runs.append([_answers(engine, PROMPTS, f"q{r}", stagger=False) for r in range(2)])
            stats = engine.stats().prefix
        finally:
            engine.shutdown(drain=False)
    for r in range(2):
        assert [a[0] for a in runs[0][r]] == [a[0] for a in runs[1][r]]
    assert stats.hits > 0


def test_an_encoder_decoder_engine_runs_without_a_prefix_cache(files):
    from lmforge.model.seq2seq import Seq2SeqLM
    from lmforge.serve.seq2seq_engine import Seq2SeqEngine

    torch.manual_seed(0)
    model = Seq2SeqLM(preset_config("bart-micro", vocab_size=files.vocab_size, init_std=0.2))
    engine = Seq2SeqEngine(model.eval(), files, name="s2s", prefix_cache_mb=4)
    assert PrefixCache.for_model(model, 4).budget == 0  # off
    engine.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for i in range(2):
            assert len(collect(engine.submit(SYSTEM, params, f"s{i}")).token_ids) == 4
        assert engine.stats().prefix.hits == engine.stats().prefix.misses == 0
    finally:
        engine.shutdown(drain=False)


def test_a_negative_budget_is_refused(files):
    from lmforge.errors import InputError

    with pytest.raises(InputError, match=r"prefix_cache_mb must be >= 0 \(0 = off\), got -1"):
        Engine(_model("micro", files.vocab_size), files, name="m", prefix_cache_mb=-1)


def test_the_flag_reaches_the_settings_and_a_negative_one_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import lmforge.serve.server as server
    from lmforge.cli import app
    from lmforge.serve.prefix_cache import DEFAULT_MB

    (tmp_path / "m").mkdir()
    started = []
    monkeypatch.setattr(server, "serve", started.append)
    for extra, want in (([], DEFAULT_MB), (["--prefix-cache-mb", "0"], 0)):
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "m"), *extra])
        assert result.exit_code == 0, result.output
        assert started[-1].prefix_cache_mb == want
    result = CliRunner().invoke(
        app, ["serve", "--model", str(tmp_path / "m"), "--prefix-cache-mb", "-1"]
    )
    assert result.exit_code == 2 and "--prefix-cache-mb" in result.output


def test_metrics_turn_the_engines_all_time_counts_into_counter_increments():
    pytest.importorskip("prometheus_client")
    from types import SimpleNamespace

    from lmforge.serve.metrics import ServerMetrics
    from lmforge.serve.prefix_cache import PrefixCacheStats

    def engine(**prefix):
        stats = SimpleNamespace(
            queue_depth=0, running=0, cache_tokens=0, cache_capacity=0,
            prefix=PrefixCacheStats(**prefix),
        )  # fmt: skip
        return SimpleNamespace(stats=lambda: stats)

    m = ServerMetrics()
    m.render({"m": engine(hits=2, misses=1, hit_tokens=64, evictions=0, bytes=100)})
    body = m.render(
        {"m": engine(hits=5, misses=1, hit_tokens=160, evictions=3, bytes=40)}
    ).decode()  # a second scrape: the counters move by the difference, once
    for line in (
        'lmforge_prefix_cache_lookups_total{model="m",result="hit"} 5.0',
        'lmforge_prefix_cache_lookups_total{model="m",result="miss"} 1.0',
        'lmforge_prefix_cache_hit_tokens_total{model="m"} 160.0',
        'lmforge_prefix_cache_evictions_total{model="m"} 3.0',
        'lmforge_prefix_cache_bytes{model="m"} 40.0',
    ):
        assert line in body, line


# -- through a real server -----------------------------------------------------------------------


def _metric(url: str, name: str) -> float:
    body = urllib.request.urlopen(f"{url}/metrics").read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    return float(found.group(1)) if found else 0.0


@contextlib.contextmanager
def served(model_dir, tmp_path, mb: float):
    """(its url, the openai client on it) of a real server of model_dir as "m" with a prefix
    cache of mb MiB (the response cache off), for the with-block."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from lmforge.serve.launch import free_port
    from lmforge.serve.server import create_app
    from lmforge.serve.settings import ServeSettings
    from unit.serve.test_serve_uvicorn import running

    settings = ServeSettings(
        models=[{"name": "m", "path": model_dir}], feedback_db=tmp_path / f"{mb}.db",
        port=free_port(), prefix_cache_mb=mb, cache_entries=0,
    )  # fmt: skip
    url = f"http://127.0.0.1:{settings.port}"
    with running(settings, create_app(settings)):
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="-")


def test_a_server_answers_the_same_and_its_metrics_count_the_hits(serve_model_dir, tmp_path):
    system = "You are a careful assistant. Answer in one short sentence. "
    questions = ["What is the capital of France?", "def f(x):", "Paris", "user assistant"]
    answers = {}
    for mb in (0, 2):
        with served(serve_model_dir, tmp_path, mb) as (url, client):
            hits = []
            for q in questions:
                answer = client.completions.create(
                    model="m", prompt=system + q, max_tokens=8, temperature=0, logprobs=1
                )
                answers.setdefault(q, []).append(answer.choices[0])
                hits.append(
                    _metric(url, 'lmforge_prefix_cache_lookups_total{model="m",result="hit"}')
                )
            hit_tokens = _metric(url, 'lmforge_prefix_cache_hit_tokens_total{model="m"}')
        if mb:
            assert hits == [0, 1, 2, 3]  # every question after the first reuses the system prompt
            assert hit_tokens >= 3 * B
        else:
            assert hits == [0, 0, 0, 0] and hit_tokens == 0
    for off, on in answers.values():
        assert off.text == on.text
        assert off.logprobs.token_logprobs == pytest.approx(on.logprobs.token_logprobs, abs=1e-4)
