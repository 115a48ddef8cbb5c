"""The `tagging` task type: an encoder's token-classification head on {tokens, tags} records.

Sentences are encoded as `finetune --task tag` trained them (finetune.tagging.encode_tagged: each
word's tag on its first subword, inside the tokenizer's template) and tagged by the directory's
*ForTokenClassification head (evals.heads.load_token_head). Metrics are evals.metrics': word
accuracy and, for BIO tags, entity precision / recall / F1 (seqeval-style, exact spans) overall
and per entity type, with the word-level confusion matrix. Words past the train.seq_len the
fine-tune recorded (evals.heads.input_len; else the model's window) are not scored, as its val
metrics did not score them (`truncated` counts the sentences cut).
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import InputError
from lmforge.evals import metrics as M


def run_tagging(model: Any, spec: Any, _settings: Any) -> Any:
    """Tags every example's words with the model's head; the metrics above."""
    from lmforge.evals.heads import input_len, load_token_head
    from lmforge.evals.task_format import TaskResult, load_examples
    from lmforge.finetune.tagging import encode_tagged, predict_tags

    rows = load_examples(spec)
    tagger, labels = load_token_head(model)
    index = {tag: i for i, tag in enumerate(labels)}
    for i, row in enumerate(rows):
        words, tags = row["tokens"], row["tags"]
        if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
            raise InputError(f"task '{spec.name}' record {i + 1}: 'tokens' and 'tags' must be "
                             "lists of the same length")  # fmt: skip
        if not all(isinstance(w, str) for w in words):
            raise InputError(f"task '{spec.name}' record {i + 1}: 'tokens' must be the words as "
                             "strings")  # fmt: skip
        unknown = sorted({str(t) for t in tags} - set(index))
        if unknown:
            raise InputError(f"task '{spec.name}' record {i + 1}: tags {unknown} are not in the "
                             f"model head's tags {labels}")  # fmt: skip
    encoded, truncated = encode_tagged(model.files, rows, index, input_len(model))
    pred = predict_tags(tagger, encoded)
    gold = [
        [index[str(t)] for t in row["tags"]][: len(p)] for row, p in zip(rows, pred, strict=True)
    ]
    metrics: dict[str, Any] = {**M.tag_metrics(gold, pred, labels), "n": len(rows),
                               "truncated": truncated, "classifier": "head"}  # fmt: skip
    if M.is_bio(labels):
        metrics["per_type"] = M.entity_table(gold, pred, labels)
    records = [
        {"index": i, "tokens": row["tokens"], "tags": [labels[t] for t in g],
         "predicted": [labels[t] for t in p], "errors": sum(a != b for a, b in zip(g, p, strict=True))}
        for i, (row, g, p) in enumerate(zip(rows, gold, pred, strict=True))
    ]  # fmt: skip
    flat_g = [labels[t] for row in gold for t in row]
    flat_p = [labels[t] for row in pred for t in row]
    return TaskResult(metrics, records, (M.confusion_matrix(flat_g, flat_p, labels), labels))
