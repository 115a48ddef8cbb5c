"""RequestPreparer: what is the same for every prompt of a completion request (the guide, the
logit bias) is built once for the request, and every job samples with it."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from lmforge.serve.prepare import RequestPreparer
from lmforge.serve.request_models import CompletionRequest


def test_a_request_of_n_prompts_builds_its_guide_and_bias_once(engine, monkeypatch):
    calls: Counter[str] = Counter()
    guide, bias = CompletionRequest.guide, RequestPreparer._logit_bias

    def counted_guide(self, files, warm_seconds=0.0):
        calls["guide"] += 1
        return guide(self, files, warm_seconds)

    def counted_bias(req, vocab_size):
        calls["bias"] += 1
        return bias(req, vocab_size)

    monkeypatch.setattr(CompletionRequest, "guide", counted_guide)
    monkeypatch.setattr(RequestPreparer, "_logit_bias", staticmethod(counted_bias))
    state = SimpleNamespace(engines={"m": engine}, embedders={}, safety=None, kb=None, cache=None)
    req = CompletionRequest(model="m", prompt=["Hello there", "Hi", "One two three"], n=2,
                            max_tokens=4, logit_bias={"5": 3.0}, guided_choice=["yes", "no"])  # fmt: skip
    prep = asyncio.run(RequestPreparer(state).prepare_completion(req))
    assert calls == {"guide": 1, "bias": 1}
    assert [j.index for j in prep.jobs] == list(range(6))
    assert [len({tuple(j.prompt_ids) for j in prep.jobs[i : i + 2]}) for i in (0, 2, 4)] == [1] * 3
    assert prep.jobs[0].params.guide is not None
    assert all(j.params.guide is prep.jobs[0].params.guide for j in prep.jobs)
    assert all(j.params.logit_bias == ((5, 3.0),) for j in prep.jobs)
