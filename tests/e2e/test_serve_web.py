"""The chat page at / against the real server (`lmforge serve`, one micro model under two names) in headless
Chromium: a streamed answer grows token by token and shows its knowledge-base sources, a thumbs-up and a side-by-side choice land in
the feedback database with the right response ids, a server error is shown, and the page logs no
console error. Chromium policy (skip with the install hint, fail under CI=true) is
test_report_browser's find_chromium.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from unit.finetune.encoder_tokenizers import bert_tokenizer_dir
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from e2e.test_report_browser import find_chromium
from lmforge.serve.launch import ServerProcess

SHORT = 128

# every text the last answer showed, each time the page changed the conversation
RECORD_GROWTH = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll('#log .answer .text');
    if (texts.length) window.__lengths.push(texts[texts.length - 1].textContent.length);
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(
    serve_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    find_chromium()
    tmp = tmp_path_factory.mktemp("serve_web")
    # the micro preset's context (128 tokens) is no more than the page's default max tokens
    short = make_model_dir(tmp / "short", make_tokenizer_dir(tmp / "tok"), block_size=SHORT)
    # an encoder: /v1/models lists it (embeddings only), the page must not offer it for chat
    enc = make_model_dir(tmp / "enc", bert_tokenizer_dir(tmp / "bert"), preset="bert-micro")
    models = [f"a={serve_model}", f"b={serve_model}", f"short={short}", f"enc={enc}"]
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "france.md").write_text("Paris is the capital of France and its largest city.\n")
    db = tmp / "feedback.db"
    args = ["--feedback-db", str(db), "--kb", str(docs)]
    with ServerProcess(models, args=args, env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc.url, db


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of the feedback database (serve/feedback.py's schema), read while the server runs."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_chat_streams_and_feedback_reaches_the_database(server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        console_errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
        page.on("pageerror", lambda e: console_errors.append(str(e)))
        page.goto(url + "/")
        expect(page.locator("#model-a option")).to_have_count(3)  # not the encoder
        assert page.locator("#model-a option").all_text_contents() == ["a", "b", "short"]
        page.fill("#max-tokens", "48")

        # chat: Enter sends; the answer is appended chunk by chunk while it streams
        page.evaluate(RECORD_GROWTH)
        page.fill("#prompt", "What is the capital of France?")
        page.press("#prompt", "Enter")
        answer = page.locator("#log .answer").first
        expect(answer).to_have_class("answer done", timeout=60_000)
        lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
        assert len(set(lengths)) > 1, f"the answer appeared in one piece: {lengths}"
        assert lengths == sorted(lengths)
        assert answer.locator(".text").text_content() != ""
        expect(answer.locator(".sources")).to_be_visible()  # the knowledge base's passages
        expect(answer.locator(".sources li").first).to_contain_text("france.md")
        response_id = answer.get_attribute("data-response-id")
        assert response_id.startswith("chatcmpl-")
        answer.get_by_role("button", name="Good answer").click()
        expect(answer.locator(".feedback-status")).to_contain_text("saved")
        ratings = "SELECT rating, scale FROM ratings WHERE response_id = ?"
        assert query(db, ratings, response_id) == [(1, "thumbs")]

        # side by side: model a against model b, then pick A
        page.check("#side-by-side")
        page.select_option("#model-b", "b")
        page.fill("#prompt", "Return the absolute value of a number.")
        page.click("#send")
        pair = page.locator(".pair .answer")
        expect(pair).to_have_count(2)
        for i in range(2):
            expect(pair.nth(i)).to_have_class("answer done", timeout=60_000)
        ids = [pair.nth(i).get_attribute("data-response-id") for i in range(2)]
        assert len(set(ids)) == 2
        page.get_by_role("button", name="Answer A is better").click()
        expect(page.locator(".turn").last.locator(".feedback-status")).to_contain_text("saved")
        choices = query(db, "SELECT chosen_id, rejected_id FROM choices")
        assert choices == [(ids[0], ids[1])]
        recorded = query(db, "SELECT id FROM responses WHERE id IN (?, ?)", *ids)
        assert sorted(r[0] for r in recorded) == sorted(ids)

        # the default max tokens (128) on a model whose context is 128: capped by max_model_len
        # from /v1/models (the server answers with the room the prompt leaves), not a 400
        page.uncheck("#side-by-side")
        page.click("#clear")  # a fresh conversation, without knowledge-base passages
        page.uncheck("#use-kb")
        page.select_option("#model-a", "short")
        page.fill("#max-tokens", "128")
        assert page.get_attribute("#max-tokens", "title").startswith(f"context {SHORT} tokens")
        page.fill("#prompt", "Name a city.")
        page.press("#prompt", "Enter")
        expect(page.locator("#log .answer").last).to_have_class("answer done", timeout=60_000)
        expect(page.locator("#error")).to_be_hidden()

        # a request the server refuses: its OpenAI error message is on the page
        page.fill("#prompt", "too long " * SHORT)
        page.press("#prompt", "Enter")
        expect(page.locator("#error")).to_contain_text("400", timeout=30_000)
        browser.close()
    # the 400 is logged by Chromium as a failed resource load; anything else is a page bug
    assert [e for e in console_errors if "status of 400" not in e] == []


def test_a_server_of_embedding_models_only_says_so(server: tuple[str, Path]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    only_enc = {"object": "list", "data": [{"id": "enc", "object": "model", "created": 0,
                "owned_by": "lmforge", "max_model_len": 128, "tasks": ["embed"]}]}  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.route("**/v1/models", lambda route: route.fulfill(json=only_enc))
        page.goto(url + "/")
        expect(page.locator("#error")).to_contain_text("embedding models only")
        expect(page.locator("#model-a option")).to_have_count(0)
        browser.close()
