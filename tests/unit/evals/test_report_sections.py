"""The report tells the run's story from the artifacts each stage left behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmforge.evals.report import write_report
from lmforge.evals.report_eval import generation_samples
from lmforge.evals.report_sections.data import funnel_steps

from .fake_run import write_run


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = write_run(tmp_path_factory.mktemp("report"))
    return run, write_report(run).read_text()


def test_sections_in_story_order(report: tuple[Path, str]) -> None:
    _, page = report
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles == ["The run at a glance", "Stages and time", "data (data)", "tokenizer (tokenizer)", "tokens (tokens)",
                      "pretrain (pretrain)", "eval (eval)"]  # fmt: skip
    assert "<script" not in page
    glance = page[page.index("The run at a glance") : page.index("Stages and time")]
    for opening in (
        "data: The data pipeline read",
        "tokenizer: A vocabulary of 300",
        "tokens: Token shards: 120,000 train, 6,000 val tokens (uint16)",
        "pretrain: Trained for 40 steps",
        "eval: pretrain: data bits_per_byte",
    ):
        assert opening in glance  # fmt: skip
    assert "(unigram baseline " in glance


def test_data_funnel_reasons_and_escaped_samples(report: tuple[Path, str]) -> None:
    run, page = report
    assert (
        "read 1,000 documents (900,000 characters) and kept 795 (79.5%) after 4 steps; "
        "2 unreadable records were rejected." in page
    )
    assert "<td>exact_dedup</td><td>exact_duplicate</td><td>190</td>" in page
    assert "<td>email</td><td>3</td>" in page
    assert "&lt;dup &amp; &#x27;quoted&#x27;&gt;" in page  # removed text is escaped, not markup
    assert (run / "report_files" / "data_funnel.png").stat().st_size > 5000


def test_tokenizer_tokens_and_training(report: tuple[Path, str]) -> None:
    run, page = report
    assert "A vocabulary of 300 tokens; on held-out text one token covers 2.7 bytes." in page
    assert "&#x27;__init__&#x27;" in page and "<td>counts.train</td><td>120,000</td>" in page
    assert "Trained for 40 steps on 20,480 tokens; train loss went from" in page
    tokenizer_part = page[
        page.index("<h2>tokenizer (tokenizer)") : page.index("<h2>tokens (tokens)")
    ]
    assert "headline metric" not in tokenizer_part  # its stats table already holds them
    pretrain_part = page[page.index("<h2>pretrain (pretrain)") : page.index("<h2>eval (eval)")]
    assert "headline metric" in pretrain_part
    assert (run / "report_files" / "pretrain_loss.png").exists()


def test_eval_tables_plots_samples_and_errors(report: tuple[Path, str]) -> None:
    _, page = report
    assert "2 model(s) on 3 task(s): pretrain" in page
    assert "data: bits_per_byte ↓" in page and "(unigram " in page
    assert "explain: rougeL ↑" in page and "BLEU signature nrefs:1|case:mixed" in page
    assert 'alt="headline metric per task"' in page and 'alt="confusion untrained kinds"' in page
    assert "Generation samples, best first and worst last" in page
    assert "The worst errors" in page and "wrong class" in page
    assert page.count("data:image/png;base64,") == 5  # funnel, loss, comparison, 2 confusions


def test_funnel_accepts_step_mapping_and_short_names() -> None:
    steps = funnel_steps({"funnel": {"clean": {"docs_in": 5, "docs_out": 4, "chars_in": 50,
                                                "chars_out": 40, "dropped": {"empty": 1}}}})  # fmt: skip
    assert steps == [{"name": "clean", "docs_in": 5, "docs_out": 4, "chars_in": 50,
                      "chars_out": 40, "reasons": {"empty": 1}}]  # fmt: skip


def test_generation_samples_best_and_worst() -> None:
    rows = [{"rougeL": i / 20} for i in range(20)]
    picked = [r["rougeL"] for r in generation_samples(rows, n=4)]
    assert picked == [0.95, 0.9, 0.05, 0.0]
    assert len(generation_samples(rows[:5], n=12)) == 5


def test_mlm_pretraining_shows_masked_loss_before_and_after(tmp_path: Path) -> None:
    import json

    from lmforge.evals.report import StageInfo
    from lmforge.evals.report_sections.training import training_section

    rows = [{"step": 1, "loss": 8.3, "tokens_per_s": 100.0}, {"step": 2, "val_loss": 6.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"objective": "mlm", "initial_val_loss": 8.35, "val_loss": 6.2}
    stage = StageInfo("pretrain", "pretrain", tmp_path, {"metrics": metrics}, tmp_path / "assets")
    blocks = training_section(stage)
    assert (
        "masked-token loss 8.350 before training, 6.200 after, perplexity 492.7" in blocks[0].text
    )
    assert ["masked-token val loss before / after", "8.3500 / 6.2000"] in blocks[1].table


def test_dialogue_retrieval_blocks_compare_with_and_without_passages() -> None:
    from lmforge.evals.report_sections.dialogue import _retrieval_blocks

    assert _retrieval_blocks({"test_rougeL": 0.5}) == []  # trained without passages
    with_rag = {"rougeL": 0.534, "bleu": 35.5, "exact_match": 0.1, "n": 40}
    scores = {
        "test_rougeL": 0.623,
        "retrieval": {"passages": 2, "recall_at_k": {"all": 0.89, "ask_usage": 0.8}},
        "per_intent": {"ask_usage": with_rag, "greeting": {**with_rag, "n": 5}},
        "without_retrieval": {"test_rougeL": 0.54, "per_intent": {
            "ask_usage": {"rougeL": 0.362, "bleu": 16.3, "exact_match": 0.0, "n": 40}}},
    }  # fmt: skip
    text, table = _retrieval_blocks(scores)
    assert "top 2 knowledge-base passages" in text.text and "89.0%" in text.text
    assert "(recall@2)" in text.text and "ROUGE-L 0.540 (with: 0.623)" in text.text
    assert table.table[0][2] == "recall@2" and "recall@2: every test dialogue" in table.caption
    assert table.table[1] == ["ask_usage", "40", "0.800", "0.534 / 0.362", "35.5 / 16.3",
                              "0.1 / 0"]  # fmt: skip
    assert table.table[2][:3] == ["greeting", "5", ""]  # no function asked: no recall
    assert table.table[2][3] == "0.534 / nan"  # the comparison run had no such dialogue
    only = {k: v for k, v in scores.items() if k != "without_retrieval"}
    (alone,) = _retrieval_blocks(only)
    assert alone.table is None and "recall@2" in alone.text
    assert "scoring at least" not in alone.text  # no floor (or an eval.json from before it)
    floored = {**only, "retrieval": {**only["retrieval"], "min_score": 8.0}}
    (text,) = _retrieval_blocks(floored)
    assert "top 2 knowledge-base passages for the user turn scoring at least 8 (BM25;" in text.text


def test_importing_the_package_registers_every_stage_kind_as_before_the_split() -> None:
    """report.py imports only lmforge.evals.report_sections: a module its __init__ left out
    would drop that stage's section from every report without an error."""
    import importlib

    from lmforge.evals import report

    importlib.import_module("lmforge.evals.report_sections")
    curves = ("loss.png",)
    expected = {
        "data": ((), True), "tokenizer": ((), False), "tokens": ((), False),
        "tasks": ((), False), "pretrain": (curves, True), "finetune": (curves, True),
        "tune": ((), False), "align": (curves, True), "compress": ((), False),
        "dialogue": (curves, True),
    }  # fmt: skip
    for kind, (replaces, headline) in expected.items():
        assert kind in report.SECTIONS, kind
        assert report.REPLACES[kind] == replaces, kind
        assert (kind not in report.NO_HEADLINE_TABLE) is headline, kind
