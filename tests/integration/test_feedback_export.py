"""Serving feedback -> `lmforge data feedback-export` -> `lmforge align` / `lmforge finetune`,
in real processes on a micro model (issue #14's feedback-store preference source)."""

from __future__ import annotations

import pytest
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from integration.test_finetune_cli import lmforge
from lmforge.align.grpo_data import load_prompt_records
from lmforge.align.prefs import load_pairs
from lmforge.artifacts import read_manifest
from lmforge.common.io import read_jsonl
from lmforge.serve.feedback import FeedbackStore

pytestmark = pytest.mark.integration
WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value"]


def chat(q):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]


def fill_store(path):
    """Per word: a good and a bad chat answer rated 5 and 1 stars (a rating pair), a side-by-side
    choice between two more, a completion rated thumbs up, and noise that must not export."""
    with FeedbackStore(path) as store:
        for w in WORDS:
            q = f"Say {w}"
            store.record_response(f"chatcmpl-{w}-good", "sft", q, chat(q), f"The {w} is here.")
            store.record_response(f"chatcmpl-{w}-bad", "sft", q, chat(q), "no no no no")
            store.add_rating(f"chatcmpl-{w}-good", 5)
            store.add_rating(f"chatcmpl-{w}-bad", 1, scale="stars")
            store.record_response(f"chatcmpl-{w}-a", "sft", q, chat(q), f"{w}!")
            store.record_response(f"chatcmpl-{w}-b", "base", q, chat(q), "hmm")
            store.add_choice(f"chatcmpl-{w}-a", f"chatcmpl-{w}-b")
        store.record_response("cmpl-1", "base", "def add(a, b):", None, " return a + b")
        store.add_rating("cmpl-1", 1)  # thumbs up: SFT as one user turn
        store.record_response("cmpl-2", "base", "2+2=", None, "5")
        store.add_rating("cmpl-2", 3)  # middling: neither SFT nor a pair
        store.record_response("cmpl-3", "base", "never rated", None, "x")
        # the same text rated differently (a cached answer): no pair, counted as skipped
        store.record_response("cmpl-4", "base", "2+2=", None, "5")
        store.add_rating("cmpl-4", 5)
        # a "choice" between answers to different prompts is not a preference
        store.add_choice("chatcmpl-alpha-good", "chatcmpl-beta-bad")


def test_export_writes_sft_and_preferences_with_counts_and_reruns_on_new_feedback(tmp_path):
    db = tmp_path / "feedback.db"
    fill_store(db)
    args = ["data", "feedback-export", "--db", str(db), "--out", "export", "--min-rating", "4"]
    proc = lmforge(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "export"
    sft = list(read_jsonl(out / "sft.jsonl"))
    prefs = list(read_jsonl(out / "preferences.jsonl"))
    n = len(WORDS)
    # well rated: each word's good answer, the thumbs-up completion, and cmpl-4 (5 stars)
    assert len(sft) == n + 2
    first = sft[0]
    assert first["messages"] == [
        *chat("Say alpha"),
        {"role": "assistant", "content": "The alpha is here."},
    ]
    completion = next(r for r in sft if r["response_id"] == "cmpl-1")
    assert completion["messages"] == [
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": " return a + b"},
    ]
    kinds = [p["kind"] for p in prefs]
    assert kinds.count("choice") == n and kinds.count("rating") == n
    choice = next(p for p in prefs if p["chosen_id"] == "chatcmpl-beta-a")
    assert choice == {
        "prompt": chat("Say beta"), "chosen": "beta!", "rejected": "hmm", "kind": "choice",
        "chosen_id": "chatcmpl-beta-a", "rejected_id": "chatcmpl-beta-b",
    }  # fmt: skip
    rating = next(p for p in prefs if p["chosen_id"] == "chatcmpl-beta-good")
    assert (rating["chosen"], rating["rejected"]) == ("The beta is here.", "no no no no")
    metrics = read_manifest(out)["metrics"]
    assert metrics == {
        "sft": n + 2, "preferences": 2 * n, "choice_pairs": n, "rating_pairs": n,
        "kto_desirable": 2 * n + 2, "kto_undesirable": 2 * n,  # each choice's sides unpaired
        "skipped_identical": 1, "skipped_other_prompt": 1, "skipped_cut_calls": 0,
        "responses": 4 * n + 4,
        "ratings": 2 * n + 3, "choices": n + 1,
    }  # fmt: skip
    assert read_manifest(out)["kind"] == "feedback-export"

    again = lmforge(*args, cwd=tmp_path)
    assert again.returncode == 0 and "cached" in again.stderr
    # new feedback (still in the WAL while a server holds the store open) reruns the export
    store = FeedbackStore(db)
    store.add_rating("chatcmpl-alpha-a", 5)
    rerun = lmforge(*args, cwd=tmp_path)
    store.close()
    assert rerun.returncode == 0 and "cached" not in rerun.stderr, rerun.stderr
    metrics = read_manifest(out)["metrics"]
    # alpha-a (now 5 stars) is well rated, and better rated than alpha-bad (1 star): a new pair
    assert (metrics["sft"], metrics["rating_pairs"]) == (n + 3, n + 1)

    # align reads the export directory (its preferences.jsonl, not sft.jsonl) and the db itself
    assert len(load_pairs(out)) == 2 * n + 1
    from_db = load_pairs(db)
    assert len(from_db) == 2 * n + 1 and from_db[0]["prompt"] == chat("Say alpha")
    assert len(load_prompt_records(db)) == n

    missing = lmforge("data", "feedback-export", "--db", "nope.db", "--out", "x", cwd=tmp_path)
    assert missing.returncode == 2 and "nope.db does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert (
        "Example: lmforge data feedback-export"
        in lmforge("data", "feedback-export", "--help", cwd=tmp_path).stdout
    )


def test_align_dpo_and_finetune_train_on_the_exported_feedback(tmp_path, monkeypatch):
    """`lmforge align --data feedback.db` and `lmforge finetune --data export/sft.jsonl`, run
    in-process through the CLI's runner (the export CLI itself is exercised above)."""
    from lmforge.runner import run_single

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "feedback.db"
    fill_store(db)
    model = make_model_dir(tmp_path / "model", make_tokenizer_dir(tmp_path / "tok"))
    fast = ["train.max_steps=2", "train.seq_len=64", "train.micro_batch_size=2",
            "train.warmup_steps=0", "train.eval_steps=1", "eval.rouge_examples=1",
            "eval.max_new_tokens=2"]  # fmt: skip
    values = {"model": model, "data": db, "out": tmp_path / "dpo", "method": "dpo"}
    dpo = run_single("align", values, overrides=fast)
    assert dpo.metrics["train_pairs"] + dpo.metrics["val_pairs"] == 2 * len(WORDS)
    assert dpo.metrics["steps"] == 2 and (tmp_path / "dpo/final/model.safetensors").is_file()
    values = {"model": model, "data": db, "out": tmp_path / "kto", "method": "kto"}
    kto = run_single("align", values, overrides=fast)  # the unpaired ratings and choices
    assert kto.metrics["train_desirable"] + kto.metrics["val_desirable"] == 2 * len(WORDS) + 2
    assert kto.metrics["train_undesirable"] + kto.metrics["val_undesirable"] == 2 * len(WORDS)

    export = run_single("feedback-export", {"db": db, "out": tmp_path / "export"})
    values = {"model": model, "data": export.out / "sft.jsonl", "out": tmp_path / "sft"}
    sft = run_single("finetune", values, overrides=fast)
    assert sft.metrics["steps"] == 2 and (tmp_path / "sft/final/model.safetensors").is_file()
    assert read_manifest(tmp_path / "sft")["inputs"]  # the export's sft.jsonl is a hashed input
