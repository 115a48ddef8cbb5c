"""The engine decodes each request as if it ran alone: greedy tokens, seeded samples, logprobs."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import InputError
from lmforge.model.generate import generate
from lmforge.serve.engine import Engine, SamplingParams, collect

PROMPTS = [
    "What is the capital of France?",
    "def f(x):",
    "Paris",
    "Return the absolute value of a number. os.path.join joins paths.",
    "user assistant",
]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def alone(engine, ids: list[int], n: int) -> list[int]:
    out = generate(engine.model, torch.tensor([ids]), n, greedy=True)
    return out[0, len(ids) :].tolist()


def first_event(handle):
    """Blocks until the handle's first event (the request is then in the running batch)."""
    return next(iter(handle))


def test_greedy_in_a_continuous_batch_equals_generate_alone(engine):
    prompts = [engine.files.encode(p) for p in PROMPTS]
    lengths = [30, 7, 19, 12, 25]
    handles = []
    for i, (ids, n) in enumerate(zip(prompts, lengths, strict=True)):
        handles.append(engine.submit(ids, greedy(n), f"greedy-{i}"))
        if i % 2 == 0:  # later requests join a batch that is already decoding
            first_event(handles[-1])
    results = [collect(h) for h in handles[1::2]]  # the others had their first event read
    for h, c in zip(handles[1::2], results, strict=True):
        i = handles.index(h)
        assert c.finish_reason == "length"
        assert c.token_ids == alone(engine, prompts[i], lengths[i])
        assert c.usage == {
            "prompt_tokens": len(prompts[i]),
            "completion_tokens": lengths[i],
            "total_tokens": len(prompts[i]) + lengths[i],
        }
    for i in (0, 2, 4):
        rest = collect(handles[i])
        assert len(rest.token_ids) == lengths[i] - 1
        assert rest.token_ids == alone(engine, prompts[i], lengths[i])[1:]
    assert len({tuple(c.token_ids) for c in results}) > 1  # the model is not degenerate
    assert engine.stats().running == 0


def test_seed_gives_the_same_tokens_alone_and_in_a_busy_batch(engine):
    ids = engine.files.encode("What is the capital")
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    solo = collect(engine.submit(ids, params, "seed-solo")).token_ids

    busy = [
        engine.submit(
            engine.files.encode(p), SamplingParams(max_tokens=25, ignore_eos=True), f"b{i}"
        )
        for i, p in enumerate(PROMPTS)
    ]
    first_event(busy[0])
    again = collect(engine.submit(ids, params, "seed-busy")).token_ids
    other = SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True)
    different = collect(engine.submit(ids, other, "seed-other")).token_ids
    for h in busy:
        collect(h)
    assert again == solo
    assert different != solo
    assert len(set(solo)) > 3


def test_top_k_one_is_greedy_and_top_p_keeps_sampling_within_the_nucleus(engine):
    ids = engine.files.encode("def f(x):")
    k1 = SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=3, ignore_eos=True)
    assert collect(engine.submit(ids, k1, "k1")).token_ids == alone(engine, ids, 10)
    tiny_p = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)
    assert collect(engine.submit(ids, tiny_p, "p")).token_ids == alone(engine, ids, 10)


def test_max_tokens_gives_length_and_stop_ids_give_stop(engine):
    ids = engine.files.encode("What is the capital of France?")
    ref = alone(engine, ids, 12)
    target = ref[5]
    c = collect(engine.submit(ids, greedy(12, stop_token_ids=(target,)), "stop-id"))
    assert c.finish_reason == "stop"
    assert c.token_ids == ref[: ref.index(target) + 1]
    assert c.text == engine.files.decode(ref[: ref.index(target)])


def test_model_stop_tokens_end_generation_unless_ignore_eos(engine):
    assert engine.files.token_id("<|im_end|>") in engine.model_stops  # generation_config.json
    ids = engine.files.encode("What is the capital of France?")
    ref = alone(engine, ids, 12)
    eos = ref[4]
    own = Engine(engine.model, engine.files, name="eos", generation_config={"eos_token_id": [eos]})
    own.start()
    try:
        stopped = collect(own.submit(ids, SamplingParams(max_tokens=12, temperature=0), "eos"))
        ignored = collect(own.submit(ids, greedy(12), "ignore-eos"))
    finally:
        own.shutdown()
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[: ref.index(eos) + 1]
    assert ignored.finish_reason == "length" and ignored.token_ids == ref


def test_logprobs_equal_log_softmax_of_a_direct_forward_pass(engine):
    ids = engine.files.encode("Return the absolute value")
    c = collect(engine.submit(ids, greedy(8, logprobs=3), "lp"))
    full = torch.tensor([ids + c.token_ids])
    with torch.no_grad():
        logp = F.log_softmax(engine.model(full)[0].float(), dim=-1)
    for j, token in enumerate(c.token_ids):
        row = logp[len(ids) - 1 + j]
        assert c.logprobs[j] == pytest.approx(row[token].item(), abs=1e-4)
        values, top = torch.topk(row, 3)
        expected = {}
        for t, v in zip(top.tolist(), values.tolist(), strict=True):
            expected.setdefault(engine.files.decode([t], skip_special_tokens=False), v)
        assert c.top_logprobs[j].keys() == expected.keys()
        for key, value in expected.items():
            assert c.top_logprobs[j][key] == pytest.approx(value, abs=1e-4)
        assert c.logprobs[j] == pytest.approx(max(c.top_logprobs[j].values()), abs=1e-4)


def test_requests_without_logprobs_get_none(engine):
    c = collect(engine.submit(engine.files.encode("Paris"), greedy(3), "no-lp"))
    assert c.logprobs is None and c.top_logprobs is None


def test_bad_requests_are_refused_with_the_field_named(engine):
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(InputError, match="keep_special must be a tuple of non-empty strings"):
        SamplingParams(keep_special=("",)).validate()
    with pytest.raises(InputError, match="temperature"):
        engine.submit([1, 2], SamplingParams(temperature=-1), "bad-t")
    with pytest.raises(InputError, match="context of 128"):
        engine.submit([1] * 100, SamplingParams(max_tokens=29), "too-long")
    with pytest.raises(InputError, match="empty"):
        engine.submit([], SamplingParams(), "empty")
    with pytest.raises(InputError, match="token ids"):
        engine.submit([10**6], SamplingParams(), "oov")


def test_an_answer_may_fill_exactly_the_room_the_prompt_leaves(engine):
    assert engine.token_room(100) == 28  # context 128
    fits = collect(engine.submit([1] * 100, greedy(28), "fits"))
    assert len(fits.token_ids) == 28
    with pytest.raises(InputError, match="shorten the prompt or lower max_tokens"):
        engine.submit([1] * 101, greedy(28), "one-over")


def test_submit_is_thread_safe(engine):
    ids = engine.files.encode("def f(x):")
    handles, lock = [], threading.Lock()

    def client(i: int) -> None:
        h = engine.submit(ids, greedy(6), f"thread-{i}")
        with lock:
            handles.append(h)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ref = alone(engine, ids, 6)
    assert [collect(h).token_ids for h in handles] == [ref] * 6
