"""`lmforge serve` end to end: a real uvicorn subprocess driven by the official openai client.

One server for the module (API key, knowledge base, feedback store); answers are checked against
the model decoded directly with lmforge.model.generate, so a batching or detokenization bug in the
server path shows as a different text.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from e2e.serve_helpers import ServerProcess, direct_greedy

pytest.importorskip("fastapi")

KEY = "test-key"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(serve_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "paris.md").write_text("Paris is the capital of France. It lies on the Seine.\n")
    (docs / "python.txt").write_text("os.path.join joins path components in Python.\n")
    srv = ServerProcess(
        ["--model", f"micro={serve_model}", "--api-key", KEY, "--kb", str(docs),
         "--feedback-db", str(tmp / "feedback.db"), "--request-timeout", "60"],
        tmp / "server.log",
    )  # fmt: skip
    yield srv
    assert srv.stopped_cleanly(), srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(serve_model):
    return direct_greedy(serve_model)


def greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(
        model="micro", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip


def test_models_and_probes(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["micro"]
    assert models[0].model_extra["max_model_len"] == 1024
    for path in ("/health", "/ready", "/ping", "/metrics"):  # open without a key
        assert httpx.get(server.url + path).status_code == 200, path
    assert "lmforge_requests_total" in httpx.get(server.url + "/metrics").text


def test_completion_matches_direct_decoding(client, reference):
    out = greedy(client)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.choices[0].text == reference(PROMPT, 12)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_stream_equals_non_stream(client):
    whole = greedy(client).choices[0].text
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_uses_the_template_and_streams(client, server):
    kw = dict(model="micro", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
              temperature=0, extra_body={"ignore_eos": True, "kb": False})  # fmt: skip
    out = client.chat.completions.create(**kw)
    assert out.id.startswith("chatcmpl-") and out.choices[0].message.role == "assistant"
    # the ChatML template wraps the one message: the prompt is longer than "Hi" alone
    assert out.usage.prompt_tokens > 5 and out.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs(client):
    out = greedy(client, max_tokens=5, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # alternatives are keyed by text: tokens that decode alike (partial UTF-8) share a key
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen >= max(top.values()) - 1e-4  # greedy takes the best
    chat = client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(1 <= len(c.top_logprobs) <= 2 for c in content)
    assert all(c.logprob >= max(t.logprob for t in c.top_logprobs) - 1e-4 for c in content)


def test_n_and_seed(client):
    kw = dict(model="micro", prompt=PROMPT, max_tokens=10, temperature=1.0, n=2, seed=7,
              extra_body={"ignore_eos": True})  # fmt: skip
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same texts
    assert a.choices[0].text != a.choices[1].text  # choice i draws with seed + i
    assert a.usage.completion_tokens == 20
    c = client.completions.create(**{**kw, "seed": 8, "n": 1})
    assert c.choices[0].text == a.choices[1].text  # seed 8 is choice 1 of seed 7


def test_n_streamed(client):
    kw = dict(model="micro", prompt=PROMPT, max_tokens=6, temperature=1.0, n=2, seed=3,
              extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kw)
    texts = ["", ""]
    for c in client.completions.create(**kw, stream=True):
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


def test_stop_cuts_the_answer(client):
    text = greedy(client, max_tokens=20).choices[0].text
    stop = text[8:11]
    cut = greedy(client, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_64_concurrent_clients_get_the_single_request_answers(server):
    prompts = [f"{PROMPT} {i}" for i in range(4)]
    sync = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    alone = {p: greedy(sync, p, max_tokens=8).choices[0].text for p in prompts}

    async def main():
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120
        )
        kw = dict(model="micro", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        jobs = [aclient.completions.create(prompt=prompts[i % 4], **kw) for i in range(64)]
        return await asyncio.gather(*jobs)

    outs = asyncio.run(main())
    assert [o.choices[0].text for o in outs] == [alone[prompts[i % 4]] for i in range(64)]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_errors(server):
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    ok = {"model": "micro", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(url, content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(url, json={**ok, "temperature": "hot"}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = httpx.post(url, json={**ok, "temperature": 5}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = httpx.post(url, json={**ok, "prompt": "word " * 1100}, headers=auth)
    assert r.status_code == 400 and "context window" in error_of(r)["message"]
    r = httpx.post(url, json={**ok, "max_tokens": 5000}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = httpx.post(url, json={**ok, "model": "nope"}, headers=auth)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(url, json=ok)
    assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    r = httpx.post(url, json=ok, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "micro", "messages": []},
                   headers=auth)  # fmt: skip
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(url, json={**ok, "prompt": ""}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    r = httpx.post(url, json={"model": "micro"}, headers=auth)
    assert r.status_code == 400 and "prompt" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError):  # the client raises the typed error
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).completions.create(
            model="micro", prompt="hi", top_p=0
        )


def test_bad_requests_do_not_leak(server, client):
    bad = [b"{", b'{"model": "micro", "prompt": 3}', b'{"model": "x", "prompt": "a"}', b"[]"]
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    with httpx.Client() as http:
        for i in range(50):  # warm up allocator and caches first
            http.post(url, content=bad[i % 4], headers=auth)
        before = server.rss_kb()
        statuses = {http.post(url, content=bad[i % 4], headers=auth).status_code
                    for i in range(200)}  # fmt: skip
    assert statuses == {400, 404}
    assert server.rss_kb() - before < 4096  # KB: a few MB at most
    assert greedy(client, max_tokens=2).choices[0].finish_reason == "length"


def test_metrics_move_and_cache_hits(server, client):
    url_count = dict(endpoint="/v1/completions", status="200")
    before = server.metric("lmforge_requests_total", **url_count)
    gen_before = server.metric("lmforge_generation_tokens_total", model="micro")
    hits = server.metric("lmforge_cache_total", result="hit")
    prompt = "a prompt only this test sends"
    first = greedy(client, prompt, max_tokens=4)
    second = greedy(client, prompt, max_tokens=4)
    assert second.choices[0].text == first.choices[0].text and second.id != first.id
    assert server.metric("lmforge_requests_total", **url_count) == before + 2
    assert server.metric("lmforge_cache_total", result="hit") == hits + 1
    assert server.metric("lmforge_generation_tokens_total", model="micro") == gen_before + 4
    assert server.metric("lmforge_time_to_first_token_seconds_count", model="micro") > 0
    assert server.metric("lmforge_feedback_rows_total", kind="response") > 0
    e2e = server.metric("lmforge_e2e_request_latency_seconds_count", endpoint="/v1/completions")
    assert e2e >= server.metric("lmforge_requests_total", **url_count)
    assert server.metric("lmforge_inter_token_latency_seconds_count", model="micro") > 0
    assert 'lmforge_kv_cache_capacity{model="micro"}' in httpx.get(f"{server.url}/metrics").text


def test_feedback_rating_and_choice(server, client):
    a, b = greedy(client, max_tokens=2), greedy(client, "Other", max_tokens=2)
    url, auth = f"{server.url}/v1/feedback", {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={"response_id": a.id, "rating": 1}, headers=auth)
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["feedback_id"] >= 1
    r = httpx.post(url, json={"chosen_id": a.id, "rejected_id": b.id}, headers=auth)
    assert r.status_code == 200
    r = httpx.post(url, json={"response_id": "cmpl-unknown", "rating": 1}, headers=auth)
    assert r.status_code == 404 and error_of(r)["param"] == "response_id"
    r = httpx.post(url, json={"response_id": a.id, "rating": 9}, headers=auth)
    assert r.status_code == 400 and error_of(r)["param"] == "rating"
    r = httpx.post(url, json={"chosen_id": a.id, "rejected_id": "chatcmpl-x"}, headers=auth)
    assert r.status_code == 404 and error_of(r)["param"] == "chosen_id"
    r = httpx.post(url, json={"rating": 1}, headers=auth)
    assert r.status_code == 400


def test_knowledge_base_sources(client):
    out = client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": "capital of France"}],
        max_tokens=2, temperature=0,
    )  # fmt: skip
    sources = out.model_extra["sources"]
    assert sources and sources[0]["source"].endswith("paris.md")
    assert "Paris" in sources[0]["text"]
    off = client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": "capital of France"}],
        max_tokens=2, temperature=0, extra_body={"kb": False},
    )  # fmt: skip
    assert "sources" not in (off.model_extra or {})
    assert off.usage.prompt_tokens < out.usage.prompt_tokens  # the passages went into the prompt
    chunks = list(client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": "capital of France"}],
        max_tokens=2, stream=True,
    ))  # fmt: skip
    assert chunks[0].model_extra["sources"] == sources  # streamed: in the first chunk


def test_disconnect_aborts_the_sequence(server):
    gen_before = server.metric("lmforge_generation_tokens_total", model="micro")
    body = {"model": "micro", "prompt": PROMPT, "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines).removeprefix("data: "))["choices"]
    # the client is gone: its sequence leaves the running batch promptly
    assert server.wait_metric("lmforge_running", 0, timeout=2.5, model="micro") == 0
    generated = server.metric("lmforge_generation_tokens_total", model="micro") - gen_before
    assert 1 <= generated < 900


def test_sagemaker_invocations(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "micro", "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{server.url}/invocations", json=body, headers=auth)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(client, max_tokens=5).choices[0].text
    chat = {"model": "micro", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/invocations", json=chat, headers=auth)
    assert r.json()["object"] == "chat.completion"


def test_non_streamed_client_gone_aborts_too(server):
    """The client hangs up while its (non-streamed) answer is being generated. It waits until
    the sequence is running rather than for a fixed time: the micro model writes 900 tokens in
    under half a second on an idle core, so a client timeout raced the answer."""
    gen_before = server.metric("lmforge_generation_tokens_total", model="micro")
    body = json.dumps({"model": "micro", "prompt": PROMPT, "max_tokens": 900,
                       "temperature": 0.5, "ignore_eos": True}).encode()  # fmt: skip
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        assert server.wait_metric("lmforge_running", 1, timeout=5, model="micro") == 1
    # the socket is closed: the server must abort the sequence instead of finishing 900 tokens
    assert server.wait_metric("lmforge_running", 0, timeout=2.5, model="micro") == 0
    generated = server.metric("lmforge_generation_tokens_total", model="micro") - gen_before
    assert 1 <= generated < 900
    assert server.metric("lmforge_requests_total", endpoint="/v1/completions", status="499") >= 1
