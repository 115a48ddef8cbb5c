"""Requests join and leave the running batch; abort, queue limits, shutdown, failures, asyncio."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model.generate import generate
from lmforge.serve.engine import (
    NO_TOKEN,
    Engine,
    EngineClosed,
    QueueFull,
    SamplingParams,
    collect,
)
from lmforge.serve.handle import RequestHandle, TokenEvent, WakeBatch
from lmforge.tokenizer.files import TokenizerFiles

from .conftest import micro_model


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def alone(model, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n, greedy=True)[0, len(ids) :].tolist()


@pytest.fixture
def fresh(serve_model_dir):
    """A model and engine of their own (tests here patch the model or stop the engine)."""
    files = TokenizerFiles.load(serve_model_dir)
    model = micro_model(files.vocab_size)
    eng = Engine(model, files, name="fresh", max_batch_size=4, max_queue=5)
    yield eng
    eng.shutdown(drain=False)


def test_short_requests_join_a_long_one_and_finish_first(engine):
    long_ids = engine.files.encode("What is the capital of France?")
    long = engine.submit(long_ids, greedy(90), "long")
    events = iter(long)
    next(events)  # the long request is decoding
    shorts = [engine.submit(engine.files.encode(p), greedy(4), f"s{i}") for i, p in
              enumerate(["Paris", "def f(x): return", "os.path"])]  # fmt: skip
    short_results = [collect(h) for h in shorts]
    assert not long.finished  # every short request ended while the long one still ran
    stats = engine.stats()  # the long row alone, 80-odd steps from its end
    assert stats.running == 1 and stats.cache_tokens >= len(long_ids)
    assert stats.cache_capacity >= stats.cache_tokens
    rest = list(events)
    assert rest[-1].finish_reason == "length" and len(rest) == 89
    assert all(h.finished_at < long.finished_at for h in shorts)
    assert all(h.first_token_at < long.finished_at for h in shorts)
    for p, c in zip(["Paris", "def f(x): return", "os.path"], short_results, strict=True):
        assert c.token_ids == alone(engine.model, engine.files.encode(p), 4)
    assert [e.token_id for e in rest] == alone(engine.model, long_ids, 90)[1:]
    assert len(long.token_times) == 90 and long.submitted_at <= long.first_token_at


def test_abort_frees_the_row_and_the_engine_keeps_serving(engine):
    ids = engine.files.encode("def f(x):")
    handle = engine.submit(ids, greedy(100), "to-abort")
    events = iter(handle)
    next(events)
    engine.abort("to-abort")
    rest = list(events)
    assert rest[-1].finish_reason == "abort"
    assert len(rest) < 99
    assert engine.stats().running == 0
    engine.abort("unknown-id")  # harmless
    assert collect(engine.submit(ids, greedy(3), "after")).token_ids == alone(engine.model, ids, 3)


def test_queue_full_waiting_abort_and_shutdown_without_drain(fresh):
    handles = [fresh.submit([1, 2, 3], greedy(5), f"q{i}") for i in range(4)]  # not started
    with pytest.raises(InputError, match="already in use"):
        fresh.submit([1, 2, 3], greedy(5), "q0")
    handles.append(fresh.submit([1, 2, 3], greedy(5), "q4"))
    with pytest.raises(QueueFull, match="max_queue 5"):
        fresh.submit([1, 2, 3], greedy(5), "q5")
    fresh.abort("q1")  # a waiting request ends at once
    assert collect(handles[1]).finish_reason == "abort"
    assert fresh.stats().queue_depth == 4
    fresh.shutdown(drain=False)
    assert {collect(h).finish_reason for h in handles if h is not handles[1]} == {"abort"}
    with pytest.raises(EngineClosed):
        fresh.submit([1, 2, 3], greedy(5), "late")


def test_shutdown_drains_in_flight_requests_and_refuses_new_ones(fresh):
    fresh.start()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]  # one more than the batch
    handles = [fresh.submit(p, greedy(6), f"d{i}") for i, p in enumerate(prompts)]
    fresh.shutdown(drain=True)
    with pytest.raises(EngineClosed, match="shutting down"):
        fresh.submit([1], greedy(2), "refused")
    for p, h in zip(prompts, handles, strict=True):
        c = collect(h)
        assert c.finish_reason == "length" and c.token_ids == alone(fresh.model, p, 6)
    stats = fresh.stats()
    assert stats.finished == 5 and stats.generated_tokens == 30 and stats.running == 0
    assert stats.prompt_tokens == sum(map(len, prompts)) and stats.steps >= 5


def test_a_failing_prefill_fails_only_its_request(fresh, monkeypatch):
    poison = 42
    embed = fresh.model.tok_emb.forward

    def flaky(idx):
        if idx.size(1) > 1 and bool((idx == poison).any()):
            raise RuntimeError("poisoned prompt")
        return embed(idx)

    monkeypatch.setattr(fresh.model.tok_emb, "forward", flaky)
    good, bad = [5, 6, 7, 8], [5, poison, 7]
    handles = [fresh.submit(good, greedy(5), "good"), fresh.submit(bad, greedy(5), "bad")]
    fresh.start()  # both are prefilled together: the group fails, then each alone
    ok, failed = collect(handles[0]), collect(handles[1])
    assert failed.finish_reason == "error" and "poisoned prompt" in failed.error
    assert failed.token_ids == []
    assert ok.finish_reason == "length" and ok.token_ids == alone(fresh.model, good, 5)


def test_a_failing_decode_step_fails_its_rows_and_the_engine_keeps_serving(fresh, monkeypatch):
    embed = fresh.model.tok_emb.forward
    calls = {"decode": 0}

    def fails_once_in_decode(idx):
        if idx.size(1) == 1:
            calls["decode"] += 1
            if calls["decode"] == 2:
                raise RuntimeError("device hiccup")
        return embed(idx)

    monkeypatch.setattr(fresh.model.tok_emb, "forward", fails_once_in_decode)
    fresh.start()
    first = collect(fresh.submit([5, 6, 7], greedy(6), "hit"))
    assert first.finish_reason == "error" and "device hiccup" in first.error
    assert len(first.token_ids) == 2  # prefill's token and the first decoding step's
    again = collect(fresh.submit([5, 6, 7], greedy(6), "after"))
    assert again.finish_reason == "length" and again.token_ids == alone(fresh.model, [5, 6, 7], 6)


def test_async_iteration_from_an_event_loop(engine):
    prompts = [engine.files.encode(p) for p in ("Paris", "def f(x):", "user assistant")]

    async def consume(i: int, ids: list[int]) -> list[int]:
        handle = engine.submit(ids, greedy(8), f"async-{i}")
        tokens = []
        async for event in handle:
            tokens.append(event.token_id)
            last = event
        assert last.finish_reason == "length"
        return tokens

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(consume(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    assert results == [alone(engine.model, p, 8) for p in prompts]


def test_a_step_wakes_its_async_readers_with_one_call_per_event_loop():
    """The engine pushes a step's tokens with a WakeBatch: readers wake at send(), together."""

    async def main() -> tuple[list[int], list[bool], int]:
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: calls.append(a) or real(*a)
        handles = [RequestHandle(f"r{i}", 1) for i in range(3)]
        readers = [asyncio.create_task(anext(aiter(h))) for h in handles]
        await asyncio.sleep(0)  # every reader now awaits its future
        wakes = WakeBatch()
        for i, handle in enumerate(handles):
            handle.push(TokenEvent(i, "x"), wakes)
        await asyncio.sleep(0.01)
        woken_early = [r.done() for r in readers]
        wakes.send()
        events = await asyncio.gather(*readers)
        return [e.token_id for e in events], woken_early, len(calls)

    tokens, woken_early, calls = asyncio.run(main())
    assert tokens == [0, 1, 2]
    assert woken_early == [False, False, False]
    assert calls == 1


def test_random_arrivals_leaves_and_aborts_keep_every_request_exact(fresh):
    """Queueing (batch of 4), joins of every length, max_tokens 1 (never joins), aborts."""
    rng = random.Random(0)
    fresh.start()
    requests = [
        ([rng.randrange(3, 250) for _ in range(rng.randint(1, 40))], rng.randint(1, 20))
        for _ in range(14)
    ]
    aborted = {3, 8}
    handles = []
    for i, (ids, n) in enumerate(requests):
        handles.append(fresh.submit(ids, greedy(n), f"rand-{i}"))
        time.sleep(rng.random() * 0.02)  # arrivals while the batch decodes
        if i in aborted:
            fresh.abort(f"rand-{i}")
    for i, ((ids, n), h) in enumerate(zip(requests, handles, strict=True)):
        tokens = [e.token_id for e in h if e.token_id != NO_TOKEN]
        expected = alone(fresh.model, ids, n)
        if i in aborted:
            assert h.finish_reason in ("abort", "length")  # it may have finished first
            assert tokens == expected[: len(tokens)]
        else:
            assert h.finish_reason == "length" and tokens == expected
    assert fresh.stats().running == 0 and fresh.stats().queue_depth == 0


def test_from_dir_takes_the_dtype_saved_in_the_model_dir(tmp_path, serve_model_dir):
    from lmforge.model.convert import load_pretrained, save_pretrained
    from lmforge.tokenizer.files import copy_tokenizer_files

    bf16 = load_pretrained(serve_model_dir).to(torch.bfloat16)
    save_pretrained(bf16, tmp_path / "bf16")
    copy_tokenizer_files(serve_model_dir, tmp_path / "bf16")
    eng = Engine.from_dir(tmp_path / "bf16", device="cpu")
    assert next(eng.model.parameters()).dtype == torch.bfloat16 and eng.name == "bf16"
    eng.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
        c = collect(eng.submit(eng.files.encode("The capital is Paris."), params, "bf16"))
    finally:
        eng.shutdown()
    assert c.finish_reason == "length" and len(c.token_ids) == 12
    assert max(c.token_ids) > 256  # ids a bf16 tensor could not hold exactly
    for lp, top in zip(c.logprobs, c.top_logprobs, strict=True):  # greedy: the best is chosen
        assert lp == max(top.values()) and lp <= 0


def test_a_burst_of_prompts_is_prefilled_within_the_token_budget(serve_model_dir):
    files = TokenizerFiles.load(serve_model_dir)
    model = micro_model(files.vocab_size)
    eng = Engine(model, files, name="budget", max_prefill_tokens=20)
    prompts = [[5 + i] * 8 for i in range(4)]  # one length: a single group without the budget
    handles = [eng.submit(p, greedy(5), f"burst-{i}") for i, p in enumerate(prompts)]
    eng.start()
    try:
        results = [collect(h) for h in handles]
    finally:
        eng.shutdown()
    assert eng.stats().prefills == 2  # 8 + 8 tokens fit in 20, a third would not
    assert [c.token_ids for c in results] == [alone(model, p, 5) for p in prompts]


def test_a_prompt_over_the_budget_is_prefilled_in_chunks_between_decoding_steps(
    serve_model_dir,
):
    files = TokenizerFiles.load(serve_model_dir)
    model = micro_model(files.vocab_size)
    eng = Engine(model, files, name="chunks", max_prefill_tokens=4)
    eng.start()
    try:
        running = eng.submit([5, 6, 7], greedy(60), "running")
        events = iter(running)
        next(events)
        long_prompt = [(7 * i) % 250 + 3 for i in range(61)]  # 16 chunks of <= 4 tokens
        long = eng.submit(long_prompt, greedy(8), "long")
        long_tokens = collect(long).token_ids
        second = eng.submit(long_prompt, greedy(8), "aborted-while-chunked")
        deadline = time.monotonic() + 10
        while eng._chunked.progress is None and time.monotonic() < deadline:  # prefill begun
            time.sleep(0.001)
        eng.abort("aborted-while-chunked")
        rest = [e.token_id for e in events]
    finally:
        eng.shutdown()
    assert long_tokens == alone(model, long_prompt, 8)
    assert rest == alone(model, [5, 6, 7], 60)[1:]
    # the running request kept decoding while the long prompt was prefilled
    between = [t for t in running.token_times if long.submitted_at < t < long.first_token_at]
    assert len(between) >= 8
    aborted = collect(second)
    assert aborted.finish_reason == "abort" and aborted.token_ids == []
    assert eng.stats().prompt_tokens == 3 + 61  # the aborted prompt's prefill never completed


def test_shutdown_timeout_aborts_what_is_still_running(fresh, monkeypatch):
    embed = fresh.model.tok_emb.forward

    def slow(idx):  # 5 ms a forward pass: 100 tokens take >= 0.5 s
        time.sleep(0.005)
        return embed(idx)

    monkeypatch.setattr(fresh.model.tok_emb, "forward", slow)
    fresh.start()
    handle = fresh.submit([5, 6, 7], greedy(100), "slow")
    events = iter(handle)
    next(events)
    fresh.shutdown(drain=True, timeout=0.1)  # draining would take >= 0.5 s
    rest = list(events)
    assert rest[-1].finish_reason == "abort" and len(rest) < 99


def test_gpt2_style_with_a_sliding_window_stays_exact_in_a_continuous_batch(serve_model_dir):
    """Learned positions come from the pad mask too; a window measured in columns is right
    because a row's tokens sit contiguously at the right of the batch."""
    from lmforge.model.config import preset_config
    from lmforge.model.transformer import Transformer

    files = TokenizerFiles.load(serve_model_dir)
    torch.manual_seed(1)
    cfg = preset_config("micro-gpt2", vocab_size=files.vocab_size, init_std=0.2, sliding_window=9)
    model = Transformer(cfg).eval()
    eng = Engine(model, files, name="gpt2", max_prefill_tokens=12)
    eng.start()
    prompts = [[5, 6, 7], [(3 * i) % 200 + 3 for i in range(30)], [9, 8, 7, 6, 5, 4]]
    try:
        first = eng.submit(prompts[0], greedy(40), "g0")
        events = iter(first)
        next(events)
        others = [eng.submit(p, greedy(15), f"g{i}") for i, p in enumerate(prompts[1:], 1)]
        results = [collect(h).token_ids for h in others]
        rest = [e.token_id for e in events]
    finally:
        eng.shutdown()
    assert rest == alone(model, prompts[0], 40)[1:]
    assert results == [alone(model, p, 15) for p in prompts[1:]]


def test_an_async_reader_takes_every_queued_event_in_one_batch():
    """batches(): what arrived while the reader was away comes as one list, in order; later
    events come in the next list; the final event ends the iteration."""

    async def main() -> list[list[int]]:
        handle = RequestHandle("r", 1)
        for token in (1, 2, 3):
            handle.push(TokenEvent(token, "x"))
        got = []
        async for batch in handle.batches():
            got.append([e.token_id for e in batch])
            if len(got) == 1:
                handle.push(TokenEvent(4, "x"))
                handle.push(TokenEvent(5, "x", finish_reason="length"))
        return got

    assert asyncio.run(main()) == [[1, 2, 3], [4, 5]]
