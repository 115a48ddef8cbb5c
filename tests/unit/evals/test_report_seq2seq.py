"""The finetune section of the report shows a seq2seq run's text metrics, base -> tuned."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.evals.report import StageInfo
from lmforge.evals.report_sections.training import training_section


def test_seq2seq_finetune_shows_rouge_bleu_and_exact_match(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 5.6, "tokens_per_s": 100.0}, {"step": 2, "val_loss": 0.02}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"rouge1": 0.97, "rouge2": 0.94, "rougeL": 0.974, "bleu": 61.2, "exact_match": 0.94,
               "base_rougeL": 0.05, "eval_examples": 32, "val_loss": 0.02}  # fmt: skip
    stage = StageInfo("ft", "finetune", tmp_path, {"metrics": metrics}, tmp_path / "assets")
    blocks = training_section(stage)
    assert (
        "seq2seq: on 32 val examples ROUGE-L 0.974, BLEU 61.2, exact match 0.94" in blocks[0].text
    )
    assert ["val ROUGE-L", "0.05 -> 0.974"] in blocks[1].table
    assert ["val exact match", "0.94"] in blocks[1].table
    plain = StageInfo("ft", "finetune", tmp_path, {"metrics": {"val_loss": 1.0}}, tmp_path / "a")
    assert "seq2seq" not in training_section(plain)[0].text
