"""`lmforge serve` under a safety policy and tight limits: refusal and redaction, a full queue
(429), a timeout (504), graceful shutdown on SIGTERM, and a feedback store that survives SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from e2e.serve_helpers import ServerProcess, direct_greedy

pytest.importorskip("fastapi")

PROMPT = "What is the capital of France?"
POLICY = """
refusal_message: "Sorry, I cannot help with that."
rules:
  - name: forbidden
    words: ["forbidden topic"]
    action: refuse
    apply_to: [prompts]
  - name: secret
    pattern: "secret-[0-9]+"
    action: redact
    apply_to: [prompts]
  - name: vowels
    pattern: "[aeiou]"
    action: redact
    replacement: "*"
    apply_to: [outputs]
"""


@pytest.fixture(scope="module")
def tight(serve_model, tmp_path_factory):
    """One sequence at a time, one waiting: the third concurrent request is refused."""
    tmp = tmp_path_factory.mktemp("tight")
    (tmp / "policy.yaml").write_text(POLICY)
    srv = ServerProcess(
        ["--model", f"micro={serve_model}", "--safety", str(tmp / "policy.yaml"),
         "--feedback-db", str(tmp / "feedback.db"), "--max-batch-size", "1", "--max-queue", "1"],
        tmp / "server.log",
    )  # fmt: skip
    yield srv
    srv.stop(signal.SIGKILL)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(
        model="micro", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip


def test_prompt_refused(tight):
    client = client_of(tight)
    refusals = tight.metric("lmforge_safety_verdicts_total", where="prompt", action="refuse")
    out = greedy(client, "tell me about the Forbidden  Topic please")
    assert out.choices[0].finish_reason == "content_filter"
    assert out.choices[0].text == "Sorry, I cannot help with that."
    chunks = list(client.chat.completions.create(
        model="micro", messages=[{"role": "user", "content": "forbidden topic"}], stream=True,
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        "Sorry, I cannot help with that."
    )
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    after = tight.metric("lmforge_safety_verdicts_total", where="prompt", action="refuse")
    assert after == refusals + 2


def test_prompt_and_output_redacted(tight, serve_model):
    client = client_of(tight)
    before = tight.metric("lmforge_safety_verdicts_total", where="prompt", action="redact")
    redacted = greedy(client, "my key is secret-12345 ok")
    plain = greedy(client, "my key is [REDACTED] ok")
    assert redacted.usage.prompt_tokens == plain.usage.prompt_tokens
    assert redacted.choices[0].text == plain.choices[0].text
    # outputs: every vowel the model writes is replaced, in whole and in streamed answers
    expected = re.sub("[aeiou]", "*", direct_greedy(serve_model)(PROMPT, 12))
    assert greedy(client).choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in greedy(client, stream=True))
    assert streamed == expected
    assert tight.metric("lmforge_safety_verdicts_total", where="prompt", action="redact") == (
        before + 1
    )
    assert tight.metric("lmforge_safety_verdicts_total", where="output", action="redact") >= 2


def test_queue_full_is_429(tight):
    client = client_of(tight)
    long = dict(model="micro", prompt=PROMPT, max_tokens=900, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    running = client.completions.create(**long, stream=True)
    next(iter(running))  # the one batch slot is taken
    queued: list = []
    waiter = threading.Thread(target=lambda: queued.append(greedy(client_of(tight), max_tokens=2)))
    waiter.start()
    assert tight.wait_metric("lmforge_queue_depth", 1, model="micro") == 1
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(**long)
    assert err.value.body["code"] == "queue_full"
    running.close()  # the stream's client leaves: its slot frees, the queued request runs
    waiter.join(30)
    assert queued and queued[0].usage.completion_tokens == 2


def test_sigterm_lets_the_in_flight_request_finish(tight):
    """Last of the tight server's tests: it stops the server."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(greedy(client_of(tight), max_tokens=400)))
    worker.start()
    assert tight.wait_metric("lmforge_running", 1, model="micro") == 1  # in flight at SIGTERM
    assert tight.stopped_cleanly(), tight.output()
    worker.join(30)
    assert done and done[0].usage.completion_tokens == 400
    assert done[0].choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def hasty(serve_model, tmp_path_factory):
    """A server that gives every request a tenth of a second: a 980-token answer takes about
    0.4 s on an idle core (half a second was a race the answer sometimes won)."""
    tmp = tmp_path_factory.mktemp("hasty")
    srv = ServerProcess(
        ["--model", f"micro={serve_model}", "--request-timeout", "0.1",
         "--feedback-db", str(tmp / "feedback.db")],
        tmp / "server.log",
    )  # fmt: skip
    srv.feedback_db = tmp / "feedback.db"
    yield srv
    srv.stop(signal.SIGKILL)


def test_timeout_is_504(hasty):
    client = client_of(hasty)
    with pytest.raises(openai.APIStatusError) as err:
        greedy(client, max_tokens=1000 - 20)
    assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
    with pytest.raises(openai.APIError, match="timed out"):  # a stream ends with the error
        list(greedy(client, max_tokens=1000 - 20, stream=True))
    # the timed-out sequences were aborted
    assert hasty.wait_metric("lmforge_running", 0, timeout=5, model="micro") == 0


def test_feedback_survives_sigkill(hasty):
    from lmforge.serve.feedback import FeedbackStore

    out = None
    for _ in range(5):  # a 3-token answer, but under 0.1 s only on a core not shared by others
        try:
            out = greedy(client_of(hasty), max_tokens=3)
            break
        except openai.APIStatusError as err:
            assert err.status_code == 504, err
    assert out is not None, "five 3-token answers in a row took over 0.1 s"
    r = httpx.post(f"{hasty.url}/v1/feedback", json={"response_id": out.id, "rating": 1})
    assert r.status_code == 200
    hasty.stop(signal.SIGKILL)
    store = FeedbackStore(hasty.feedback_db)  # the row the killed server wrote is there
    assert store.add_rating(out.id, -1) > r.json()["feedback_id"]


@pytest.mark.slow  # two processes each load torch and the model: ~30 s on 2 busy cores
def test_several_workers_behind_one_port_with_true_metrics(serve_model, tmp_path):
    """Every scrape, whichever worker answers, shows the server's totals; a worker killed and
    restarted by uvicorn keeps its counts in them; files of a crashed server do not leak in."""
    base = tmp_path / "prom"  # a PROMETHEUS_MULTIPROC_DIR that outlived a crashed server
    stale = base / "lmforge-metrics-999999999-old"
    stale.mkdir(parents=True)
    for where in (base, stale):
        leave_counts(where, 1000)
    srv = ServerProcess(
        ["--model", f"micro={serve_model}", "--workers", "2", "--feedback-db", str(tmp_path / "f.db")],
        tmp_path / "server.log", env={"PROMETHEUS_MULTIPROC_DIR": str(base)},
    )  # fmt: skip
    try:
        client = client_of(srv)
        k = 6
        texts = {greedy(client, f"request {i}", max_tokens=4).choices[0].text for i in range(k)}
        assert len(texts) > 1  # distinct prompts: no answer comes from the response cache
        pids = set(re.findall(r"Started server process \[(\d+)\]", srv.output()))
        assert len(pids) == 2
        for _ in range(6):  # the kernel hands the scrapes to either worker
            assert totals(srv) == {"requests": k, "e2e": k, "ttft": k, "tokens": 4 * k}
        scrape = httpx.get(f"{srv.url}/metrics", timeout=5).text  # gauges: one summed series
        assert 'lmforge_queue_depth{model="micro"} 0.0' in scrape and 'pid="' not in scrape
        os.kill(int(pids.pop()), signal.SIGKILL)  # uvicorn starts another worker
        deadline = time.monotonic() + 60
        while len(re.findall(r"Started server process", srv.output())) < 3:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.2)
        greedy(client, "one more", max_tokens=4)
        assert totals(srv) == {"requests": k + 1, "e2e": k + 1, "ttft": k + 1, "tokens": 4 * k + 4}
        assert not stale.exists()  # a dead server's directory is swept
        # every worker, the restarted one too, logs through lmforge's handler as one process does
        deadline = time.monotonic() + 60
        while min(srv.output().count(line) for line in WORKER_LINES) < 3:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.2)
    finally:
        assert srv.stopped_cleanly(), srv.output()
    assert [p.name for p in base.iterdir()] == ["counter_777.db"]  # its own dir is removed


WORKER_LINES = ("INFO     serving micro from", "INFO     event loop ")  # RichHandler's layout


def leave_counts(path, n: int) -> None:
    """A counter file as a server process (pid 777) killed after n requests leaves it."""
    code = (
        "from prometheus_client import Counter; "
        "Counter('lmforge_requests', 'x', ['endpoint', 'status'])"
        f".labels('/v1/completions', '200').inc({n})"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    next(path.glob("counter_*.db")).rename(path / "counter_777.db")


def totals(srv) -> dict[str, float]:
    """One scrape's request counter, e2e and TTFT histogram counts and generated tokens."""
    text = httpx.get(f"{srv.url}/metrics", timeout=5).text
    want = {
        "requests": 'lmforge_requests_total{endpoint="/v1/completions",status="200"}',
        "e2e": 'lmforge_e2e_request_latency_seconds_count{endpoint="/v1/completions"}',
        "ttft": 'lmforge_time_to_first_token_seconds_count{model="micro"}',
        "tokens": 'lmforge_generation_tokens_total{model="micro"}',
    }
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {key: float(samples.get(series, 0)) for key, series in want.items()}
