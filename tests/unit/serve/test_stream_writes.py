"""Streaming: the events that reach a response together leave in one SSE write, in order."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from lmforge.serve.completions import CompletionService, Job, Prepared
from lmforge.serve.engine import SamplingParams
from lmforge.serve.handle import NO_TOKEN, RequestHandle, TokenEvent
from lmforge.serve.metrics import ServerMetrics


class QueuedEngine:
    """An engine whose requests have all their events queued before the stream reads them:
    a reader that fell behind the engine."""

    def __init__(self, texts: list[str], final: TokenEvent | None = None) -> None:
        self.texts, self.final = texts, final

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        handle = RequestHandle(request_id, len(prompt_ids))
        for i, text in enumerate(self.texts):
            last = i == len(self.texts) - 1 and self.final is None
            handle.push(TokenEvent(i, text, finish_reason="length" if last else None))
        if self.final is not None:
            handle.push(self.final)
        return handle

    def abort(self, request_id: str) -> None:
        raise AssertionError(f"{request_id} finished; nothing to abort")


def streamed(
    texts: list[str], n: int, final: TokenEvent | None = None, sources: list | None = None
) -> list[str]:
    """The strings stream() hands the response, one per write, for n choices of `texts` (then
    `final`, when given, as each choice's last event), of a completion with these `sources`."""
    state = SimpleNamespace(
        settings=SimpleNamespace(request_timeout_s=30.0), metrics=ServerMetrics(),
        safety=None, feedback=None, cache=None,
    )  # fmt: skip
    params = SamplingParams(max_tokens=len(texts))
    jobs = [Job(i, [1, 2, 3], "abc", params) for i in range(n)]
    engine = QueuedEngine(texts, final)
    prep = Prepared("completion", "cmpl-1", "m", engine, jobs, 3, sources=sources, stream=True)

    async def read() -> list[str]:
        return [write async for write in CompletionService(state).stream(prep)]

    return asyncio.run(read())


def chunks(write: str) -> list[dict]:
    return [json.loads(line[6:]) for line in write.split("\n\n") if line.startswith("data: {")]


def test_events_that_arrived_together_are_one_write():
    writes = streamed(["Hel", "lo", "!"], n=1)
    assert len(writes) == 2  # the three tokens, then [DONE]
    assert [c["choices"][0]["text"] for c in chunks(writes[0])] == ["Hel", "lo", "!"]
    assert [c["choices"][0]["finish_reason"] for c in chunks(writes[0])] == [None, None, "length"]
    assert writes[1] == "data: [DONE]\n\n"


def test_choices_of_one_request_share_the_write_and_keep_their_order():
    writes = streamed(["a", "b"], n=3)
    assert len(writes) == 2
    got = [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks(writes[0])]
    for index in range(3):  # each choice's tokens in order, every choice complete
        assert [text for i, text in got if i == index] == ["a", "b"]


def test_an_error_keeps_the_tokens_that_arrived_before_it_in_the_same_write():
    """A generation error after some tokens of the same batch: those tokens still reach the
    client, ahead of the error body, in the one write that ends the stream."""
    error = TokenEvent(NO_TOKEN, "", finish_reason="error", error="device lost")
    writes = streamed(["Hel", "lo"], n=1, final=error)
    assert len(writes) == 1  # no [DONE] after an error
    sent = chunks(writes[0])
    assert [c["choices"][0]["text"] for c in sent[:2]] == ["Hel", "lo"]
    assert sent[2]["error"]["message"] == "generation failed: device lost"


def test_a_completion_with_sources_streams_them_first_with_an_empty_piece_per_choice():
    """As chat's role chunk does: the first chunk carries `sources`, every choice with no text
    yet (a client reading choices[0].text gets ""); without sources nothing is added."""
    sources = [{"source": "json.dumps", "text": "json.dumps(obj)", "prompt_index": 0}]
    writes = streamed(["a", "b"], n=2, sources=sources)
    assert len(writes) == 3  # the sources, the tokens, [DONE]
    [first] = chunks(writes[0])
    assert first["sources"] == sources
    assert first["choices"] == [
        {"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(2)
    ]
    tokens = chunks(writes[1])
    assert all("sources" not in c for c in tokens)
    assert "".join(c["choices"][0]["text"] for c in tokens) == "abab"
    plain = streamed(["a", "b"], n=2)
    assert len(plain) == 2 and "sources" not in plain[0]
    assert "".join(c["choices"][0]["text"] for c in chunks(plain[0])) == "abab"
