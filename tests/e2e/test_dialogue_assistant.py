"""The dialogue-assistant recipe end to end at micro size: knowledge base, data (PII), multi-task
retrieval-augmented training (and its comparison without passages), report, then the real server
on its serve-config with the openai client (answer from a source with the KB's passages, refusal)."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from e2e.serve_helpers import ServerProcess

MICRO = [
    "dialogues.max_functions=80", "dialogues.small_talk_forms=2", "tokenizer.vocab_size=512",
    "dialogue.model.preset=bart-micro", "dialogue.train.max_steps=20",
    "dialogue.train.warmup_steps=2", "dialogue.train.seq_len=64", "dialogue.train.micro_batch_size=16",
    "dialogue.train.eval_every=10", "dialogue.train.ckpt_every=20",
    "dialogue.eval.max_examples=16", "dialogue.eval.max_new_tokens=12",
    "dialogue.retrieval.min_score=1.0",
]  # fmt: skip
QUESTION = "What is the signature of json.dumps?"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dialogue") / "run"
    sets = [a for s in MICRO for a in ("--set", s)]
    for cmd in (["run", "dialogue-assistant", "--out", str(out), *sets], ["report", str(out)]):
        proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *cmd],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_data_stage_anonymized_the_planted_pii(run_dir):
    planted = json.loads((run_dir / "dialogues" / "stats.json").read_text())["planted_pii"]
    pii = json.loads((run_dir / "data" / "stats.json").read_text())["pii"]
    assert planted["email"] > 0 and planted["phone"] > 0
    assert pii["email"] == planted["email"] and pii["phone"] == planted["phone"]
    assert pii["name"] == planted["names"] > 0  # the recipe turns pii.names on
    from lmforge.common.io import read_jsonl

    texts = [r["text"] for s in ("train", "val", "test")
             for r in read_jsonl(run_dir / "data" / f"{s}.jsonl.zst")]  # fmt: skip
    assert not any("@example.com" in t or "555-" in t for t in texts)
    assert any("<EMAIL>" in t for t in texts) and any("<PHONE>" in t for t in texts)
    assert any(t.startswith("User: I am <NAME> (") for t in texts)


def test_model_dir_and_report_sections(run_dir):
    from lmforge.finetune.dialogue import load_intent_head
    from lmforge.model.convert import load_pretrained

    final = run_dir / "dialogue" / "final"
    head, labels = load_intent_head(final)
    assert labels == sorted(labels) and "greeting" in labels and head.out_features == len(labels)
    assert type(load_pretrained(final)).__name__ == "Seq2SeqLM"
    scores = json.loads((run_dir / "dialogue" / "eval.json").read_text())
    assert 0 <= scores["test_rougeL"] <= 1 and 0 <= scores["intent_accuracy"] <= 1
    assert scores["test_bleu"] >= 0 and scores["intent_test_dialogues"] > 0
    report = (run_dir / "report.md").read_text()
    for stage in ("kb", "dialogues", "data", "tokenizer", "dialogue", "serve_config"):
        assert f"## {stage} (" in report, stage
    assert "PII" in report and "intent head is right on" in report
    assert "Demographic terms in the data" in report  # the data-side bias term report
    assert "held-out dialogues" in report
    assert "without passages" in report and "recall@2" in report


def test_retrieval_recorded_measured_and_compared(run_dir):
    from lmforge.serve.retrieval_spec import RetrievalSpec

    final = run_dir / "dialogue" / "final"
    assert RetrievalSpec.load(final) == RetrievalSpec(passages=2, source_tokens=63, min_score=1.0)
    scores = json.loads((run_dir / "dialogue" / "eval.json").read_text())
    recall = scores["retrieval"]["recall_at_k"]
    assert scores["retrieval"]["min_score"] == 1.0  # the report says what recall was measured under
    assert recall["all"] >= 0.5 and set(recall) >= {"ask_signature", "ask_usage"}
    plain = scores["without_retrieval"]
    assert set(plain["per_intent"]) == set(scores["per_intent"])
    assert (run_dir / "dialogue" / "no_retrieval" / "samples.jsonl").is_file()
    metrics = json.loads((run_dir / "dialogue" / "manifest.json").read_text())["metrics"]
    assert metrics["norag_test_rougeL"] == plain["test_rougeL"]
    assert metrics["test_recall_at_k"] == recall["all"]


def test_served_with_kb_and_safety(run_dir, tmp_path):
    config = run_dir / "serve_config" / "serve.yaml"
    srv = ServerProcess(["--config", str(config), "--request-timeout", "60"],
                        tmp_path / "server.log")  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["assistant"]
        out = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12, temperature=0,
        )  # fmt: skip
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens >= 1
        sources = out.model_extra["sources"]
        assert sources[0]["source"] == "json.dumps"  # a passage per function, named by it
        # a plain completion prompt is the user turn too: the same source and sources as chat
        done = client.completions.create(model="assistant", prompt=QUESTION, max_tokens=12,
                                         temperature=0)  # fmt: skip
        assert done.usage.completion_tokens >= 1
        assert done.model_extra["sources"] == [{**s, "prompt_index": 0} for s in sources]
        # streamed, the sources come first (as on chat's role chunk), then the same answer
        chunks = list(client.completions.create(model="assistant", prompt=QUESTION,
                                                max_tokens=12, temperature=0, stream=True))  # fmt: skip
        assert chunks[0].model_extra["sources"] == done.model_extra["sources"]
        assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
        chat_chunks = list(client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12, temperature=0, stream=True,
        ))  # fmt: skip
        assert chat_chunks[0].model_extra["sources"] == sources
        blocked = client.chat.completions.create(
            model="assistant", max_tokens=8,
            messages=[{"role": "user", "content": "how do I build a bomb?"}],
        )  # fmt: skip
        assert blocked.choices[0].finish_reason == "content_filter"
    finally:
        assert srv.stopped_cleanly(), srv.output()
    assert "knowledge-base passages" not in srv.output()  # the no-KB warning
    served = _served_source(run_dir / "serve_config" / "feedback.db", out.id)
    assert served == _training_source(run_dir, QUESTION)
    assert served.startswith(f"{QUESTION}\n[1] json.dumps(obj, ")
    assert _served_source(run_dir / "serve_config" / "feedback.db", done.id) == served


def _served_source(feedback_db, response_id):
    """The source the server gave the model, as its feedback store recorded it."""
    import sqlite3

    with sqlite3.connect(feedback_db) as conn:
        row = conn.execute("SELECT prompt FROM responses WHERE id = ?", (response_id,)).fetchone()
    return row[0]


def _training_source(run_dir, question):
    """The source the dialogue stage builds for the same user turn, from the recipe's KB."""
    from lmforge.finetune.dialogue import Retrieved
    from lmforge.serve.recipe_config import open_kb
    from lmforge.serve.retrieval_spec import RetrievalSpec
    from lmforge.tokenizer.files import TokenizerFiles

    final = run_dir / "dialogue" / "final"
    kb = open_kb(run_dir / "kb")
    try:
        row = {"context": question, "response": "", "intent": "ask_usage"}
        built = Retrieved([row], TokenizerFiles.load(final), RetrievalSpec.load(final), kb)
        return built.sources[0]
    finally:
        kb.close()


def test_eval_stage_scores_responses_and_intents(run_dir):
    """The recipe's eval stage: held-out responses with reference perplexity, intents by head."""
    results = json.loads((run_dir / "eval" / "eval.json").read_text())["results"]["dialogue"]
    responses, intent = results["responses"], results["intent"]
    assert responses["reference_scoring"] == "conditional" and responses["reference_perplexity"] > 1
    assert 0 <= responses["rougeL"] <= 1 and responses["n"] > 0
    assert intent["scoring"] == "head (mean_source)" and 0 <= intent["accuracy"] <= 1
    # the head scores what the dialogue stage's own test eval scored, on the same dialogues
    stage = json.loads((run_dir / "dialogue" / "eval.json").read_text())
    assert intent["n"] == min(stage["intent_test_dialogues"], 16)
