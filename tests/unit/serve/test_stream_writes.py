"""Streaming: the events that reach a response together leave in one SSE write, in order (the
first with the opening chunk), the stream's end (the last tokens, the usage chunk, [DONE]) is one
write after the feedback row, errors keep what came before them, and a refused choice is aborted."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from lmforge.serve.completions import SSE_DONE, CompletionService, Job, Prepared
from lmforge.serve.engine import SamplingParams
from lmforge.serve.handle import NO_TOKEN, RequestHandle, TokenEvent
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.safety import SafetyPolicy, SafetyRule


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


class SteppedEngine(QueuedEngine):
    """An engine that pushes its next event only once the client has read a write, as a reader
    that keeps up with the engine sees them: every token a wake-up of its own."""

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        self.handle, self.pushed = RequestHandle(request_id, len(prompt_ids)), 0
        self.advance()
        return self.handle

    def advance(self) -> None:
        if self.pushed < len(self.texts):
            last = self.pushed == len(self.texts) - 1
            event = TokenEvent(
                self.pushed, self.texts[self.pushed], finish_reason="length" if last else None
            )
            self.handle.push(event)
            self.pushed += 1


class AbortableEngine(SteppedEngine):
    """A stepped engine that ends a request it is asked to abort, as the real one does."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__(texts)
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.handle.push(TokenEvent(NO_TOKEN, "", finish_reason="abort"))


class ListStore:
    """A feedback store that keeps its rows in a list."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def record_response(self, *row) -> None:
        self.rows.append(row)


def streamed(
    texts: list[str],
    n: int,
    final: TokenEvent | None = None,
    sources: list | None = None,
    engine: QueuedEngine | None = None,
    usage: bool = False,
    feedback: ListStore | None = None,
    kind: str = "completion",
    safety: SafetyPolicy | None = None,
) -> list[str]:
    """The strings stream() hands the response, one per write, for n choices of `texts` (then
    `final`, when given, as each choice's last event), of a `kind` request with these `sources`;
    each write that ends with [DONE] is checked to come after the feedback rows."""
    state = SimpleNamespace(
        settings=SimpleNamespace(request_timeout_s=30.0), metrics=ServerMetrics(),
        safety=safety, feedback=feedback, cache=None,
    )  # fmt: skip
    params = SamplingParams(max_tokens=len(texts))
    jobs = [Job(i, [1, 2, 3], "abc", params) for i in range(n)]
    engine = engine or QueuedEngine(texts, final)
    prep = Prepared(
        kind, "cmpl-1", "m", engine, jobs, 3, sources=sources, stream=True,
        include_usage=usage,
    )  # fmt: skip

    async def read() -> list[str]:
        writes = []
        async for write in CompletionService(state).stream(prep):
            if feedback is not None and write.endswith(SSE_DONE):
                assert len(feedback.rows) == n  # recorded before the client can rate it
            writes.append(write)
            if isinstance(engine, SteppedEngine):
                engine.advance()
        return writes

    return asyncio.run(read())


def chunks(write: str) -> list[dict]:
    return [json.loads(line[6:]) for line in write.split("\n\n") if line.startswith("data: {")]


def test_events_that_arrived_together_are_one_write_with_the_end():
    writes = streamed(["Hel", "lo", "!"], n=1)
    assert len(writes) == 1  # the three tokens, then [DONE]
    assert [c["choices"][0]["text"] for c in chunks(writes[0])] == ["Hel", "lo", "!"]
    assert [c["choices"][0]["finish_reason"] for c in chunks(writes[0])] == [None, None, "length"]
    assert writes[0].endswith("\n\ndata: [DONE]\n\n")


def test_the_last_tokens_usage_and_done_are_one_write_after_the_feedback_row():
    """Tokens that arrive one wake-up at a time leave one write each, but the last one waits
    for the usage chunk and [DONE] (and the feedback row: see streamed()) to go out with them."""
    texts = ["Hel", "lo", " wor", "ld"]
    store = ListStore()
    writes = streamed(texts, n=1, engine=SteppedEngine(texts), usage=True, feedback=store)
    assert [[c["choices"][0]["text"] for c in chunks(w) if c["choices"]] for w in writes] == [
        ["Hel"],
        ["lo"],
        [" wor"],
        ["ld"],
    ]
    *_, last_token, usage_chunk = chunks(writes[-1])
    assert last_token["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert writes[-1].endswith(SSE_DONE) and not any(w.endswith(SSE_DONE) for w in writes[:-1])
    assert [row[4] for row in store.rows] == ["Hello world"]


def test_choices_of_one_request_share_the_write_and_keep_their_order():
    writes = streamed(["a", "b"], n=3)
    assert len(writes) == 1
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
    assert len(writes) == 1  # the sources ride with the tokens and [DONE]
    first, *tokens = chunks(writes[0])
    assert first["sources"] == sources
    assert first["choices"] == [
        {"index": i, "text": "", "logprobs": None, "finish_reason": None} for i in range(2)
    ]
    assert all("sources" not in c for c in tokens)
    assert "".join(c["choices"][0]["text"] for c in tokens) == "abab"
    plain = streamed(["a", "b"], n=2)
    assert len(plain) == 1 and "sources" not in plain[0]
    assert "".join(c["choices"][0]["text"] for c in chunks(plain[0])) == "abab"


def test_chats_role_chunk_rides_with_the_first_tokens():
    """Chat's opening chunk (the role) is not a write of its own: it leaves with the first
    tokens, so a chat stream takes as many writes as a completion's."""
    texts = ["Hel", "lo", "!"]
    writes = streamed(texts, n=1, engine=SteppedEngine(texts), kind="chat")
    assert len(writes) == len(texts)
    role, *first_tokens = chunks(writes[0])
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
         "finish_reason": None}
    ]  # fmt: skip
    assert [c["choices"][0]["delta"] for c in first_tokens] == [{"content": "Hel"}]
    assert all("role" not in c["choices"][0]["delta"] for w in writes[1:] for c in chunks(w))


def test_an_unexpected_error_ends_the_stream_with_an_error_body_after_the_held_back_tokens(
    monkeypatch, caplog
):
    """A bug while the stream's last chunks wait for the end: the client still gets them, then
    a server_error body (as a non-streamed answer would), not a connection cut mid-body."""
    accept = CompletionService._stream_part

    def failing_on_the_end(self, prep, job, event, sent):
        if event.finish_reason is not None:
            raise RuntimeError("bug at the end")
        return accept(self, prep, job, event, sent)

    monkeypatch.setattr(CompletionService, "_stream_part", failing_on_the_end)
    final = TokenEvent(NO_TOKEN, "", finish_reason="stop")
    writes = streamed(["Hel", "lo"], n=1, final=final)
    assert len(writes) == 1 and not writes[0].endswith(SSE_DONE)
    sent = chunks(writes[0])
    assert [c["choices"][0]["text"] for c in sent[:2]] == ["Hel", "lo"]
    assert sent[2]["error"]["message"] == "internal error: bug at the end"
    assert sent[2]["error"]["type"] == "server_error"
    assert "stream cmpl-1 failed" in caplog.text


def test_a_choice_refused_mid_stream_is_aborted_not_decoded_to_its_end():
    """Once the output filter refuses a choice nothing more of it is sent, so its engine
    request is aborted at once: the stream ends without decoding the rest (max_tokens)."""
    texts = ["Sure. A bo", "mb is ", *["more "] * 50]
    engine = AbortableEngine(texts)
    refuse = SafetyRule(name="weapons", words=["bomb"], action="refuse")
    writes = streamed(texts, n=1, engine=engine, safety=SafetyPolicy(rules=[refuse]))
    assert engine.aborted == ["cmpl-1-0"] and engine.pushed < 5  # of 52
    sent = [c["choices"][0] for w in writes for c in chunks(w)]
    assert "".join(c["text"] for c in sent) == "Sure. A "
    assert [c["finish_reason"] for c in sent if c["finish_reason"]] == ["content_filter"]
    assert writes[-1].endswith(SSE_DONE)
