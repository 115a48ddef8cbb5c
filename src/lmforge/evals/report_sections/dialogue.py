"""Report section of the dialogue stage (multi-task seq2seq responder + intent head): training
curves, held-out responses and intents, and retrieval's recall@k and gain when trained with it."""

from __future__ import annotations

import json
from typing import Any

from lmforge.evals.report import Block, StageInfo, register_section
from lmforge.evals.report_sections.common import read_json
from lmforge.evals.report_sections.training import training_section

DIALOGUE_SAMPLES = 8  # held-out responses shown


@register_section("dialogue", replaces=("loss.png",))
def dialogue_section(stage: StageInfo) -> list[Block]:
    """Training curves, then held-out responses (ROUGE-L) and intents (accuracy, macro-F1)."""
    scores = read_json(stage.path / "eval.json")
    if not isinstance(scores, dict):
        return [*training_section(stage), Block(text="No eval.json in this dialogue stage.")]
    text = (
        f"On {scores['test_responses']} held-out dialogues about unseen functions the responder "
        f"scores ROUGE-L {scores['test_rougeL']:.3f}, BLEU {scores['test_bleu']:.1f} (exact match "
        f"{scores['test_exact_match']:.3f});"
        f" its intent head is right on {scores['intent_accuracy']:.1%} of "
        f"{scores['intent_test_dialogues']} (macro-F1 {scores['intent_macro_f1']:.3f}; always "
        f"guessing the commonest intent: {scores['intent_majority_accuracy']:.1%})."
    )
    shown = ("test_rouge1", "test_rouge2", "test_rougeL", "test_bleu", "test_exact_match", "intent_accuracy", "intent_macro_f1",
             "intent_majority_accuracy")  # fmt: skip
    table = [["metric (held-out test)", "value"], *([k, f"{scores[k]:.4g}"] for k in shown)]
    rows = [["user", "reference", "response", "intent (predicted)"]]
    samples_path = stage.path / "samples.jsonl"
    if samples_path.exists():
        for line in samples_path.read_text(encoding="utf-8").splitlines()[:DIALOGUE_SAMPLES]:
            s = json.loads(line)
            rows.append([s["context"], s["reference"], s["prediction"],
                         f"{s['intent']} ({s['predicted_intent']})"])  # fmt: skip
    return [
        *training_section(stage),
        Block(text=text, summary=True),
        Block(table=table),
        *_retrieval_blocks(scores),
        Block(table=rows, caption="held-out dialogues"),
    ]


def _retrieval_blocks(scores: dict[str, Any]) -> list[Block]:
    """A retrieval-augmented responder: recall@k and per-intent scores with/without passages."""
    retrieval = scores.get("retrieval")
    if not retrieval:
        return []
    k, recall = retrieval["passages"], retrieval["recall_at_k"]
    floor = retrieval.get("min_score") or 0  # eval.json written before the floor existed: none
    scoring = f" scoring at least {floor:g} (BM25; fewer or none below it)" if floor else ""
    text = (f"Each source carries the top {k} knowledge-base passages for the user turn{scoring}; "
            f"the asked-about function's passage is among them for {recall.get('all', 0):.1%} of the "
            f"held-out questions about a function (recall@{k}).")  # fmt: skip
    plain = scores.get("without_retrieval")
    if plain is None:
        return [Block(text=text)]
    text += (f" Trained the same way without passages, the responder scores ROUGE-L "
             f"{plain['test_rougeL']:.3f} (with: {scores['test_rougeL']:.3f}).")  # fmt: skip
    table = [["intent", "n", f"recall@{k}", "ROUGE-L with / without passages",
              "BLEU with / without", "exact match with / without"]]  # fmt: skip
    for intent, row in scores["per_intent"].items():
        other = plain["per_intent"].get(intent, {})
        cells = [f"{row[m]:.3g} / {other.get(m, float('nan')):.3g}"
                 for m in ("rougeL", "bleu", "exact_match")]  # fmt: skip
        r = recall.get(intent)
        table.append([intent, str(row["n"]), "" if r is None else f"{r:.3f}", *cells])
    caption = (f"held-out, with vs without passages (n: responses scored; recall@{k}: every test "
               "dialogue about a function)")  # fmt: skip
    return [Block(text=text), Block(table=table, caption=caption)]
