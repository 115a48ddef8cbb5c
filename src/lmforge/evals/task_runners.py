"""The built-in task types' runners: perplexity, generation, multiple_choice and classification
(counterfactual's is evals/bias.py, tagging's evals/tagging.py)."""

from __future__ import annotations

import re
from pathlib import Path
from string import Formatter
from typing import Any

import numpy as np

from lmforge.errors import ConfigError, InputError
from lmforge.evals import metrics as M
from lmforge.evals.lm import EvalModel, GenerationSettings, nll_to_ppl
from lmforge.evals.perplexity import perplexity, read_texts, unigram_baseline
from lmforge.evals.task_format import TaskResult, TaskSpec, load_examples, task_prompt


def run_perplexity(model: EvalModel, spec: TaskSpec, _: GenerationSettings) -> TaskResult:
    if spec.examples is not None:
        texts = [r["text"] for r in load_examples(spec)]
    elif spec.data is not None:
        texts = read_texts(spec.data, spec.split, spec.max_examples)
    else:
        raise ConfigError(f"task '{spec.name}': give 'data' or inline 'examples'")
    result = perplexity(
        model, texts, max_length=spec.max_length, stride=spec.stride, task=spec.name
    )
    metrics = result.metrics()
    train_dir = spec.data if spec.data is not None and Path(spec.data).is_dir() else None
    if spec.baseline and train_dir is not None and any(Path(train_dir).glob("train.jsonl*")):
        train = read_texts(train_dir, "train", spec.baseline_max_documents)
        base = unigram_baseline(model, train, texts)
        metrics["unigram_perplexity"] = base["perplexity"]
        metrics["unigram_bits_per_byte"] = base["bits_per_byte"]
    records = [
        {
            "index": d.index,
            "text": d.text,
            "tokens": d.tokens,
            "nll_per_token": d.nll / max(d.tokens, 1),
        }
        for d in result.docs
    ]
    return TaskResult(metrics, records)


def run_generation(model: EvalModel, spec: TaskSpec, settings: GenerationSettings) -> TaskResult:
    given = spec.generation or settings
    settings = model.settings_for(given)  # recorded as generated
    checkpoint = model.checkpoint_record(given, settings)  # sampling keys: ignored
    rows = load_examples(spec)
    prompts = [task_prompt(spec, r) for r in rows]
    refs = [str(r["reference"]) for r in rows]
    chat = spec.chat if spec.chat is not None else model.chat_template is not None
    outputs = [out.strip() for out in model.generate_batch(prompts, settings, chat=chat)]
    per_rouge = M.rouge_scores(outputs, refs)
    ref_scores = model.scorer.reference_scores(prompts, refs, chat)
    records = [
        {
            "index": i,
            "prompt": p,
            "reference": ref,
            "output": out,
            "rougeL": rs["rougeL"],
            "bleu": M.sentence_bleu(out, ref),
            "exact_match": M.normalize(out) == M.normalize(ref),
            "reference_nll_per_token": -sum(lps) / max(len(lps), 1),
        }
        for i, (p, ref, out, rs, (lps, _)) in enumerate(
            zip(prompts, refs, outputs, per_rouge, ref_scores, strict=True)
        )
    ]
    metrics: dict[str, Any] = {**M.bleu(outputs, refs), **M.rouge(outputs, refs)}
    metrics["exact_match"] = M.exact_match(outputs, refs)
    metrics.update(reference_perplexity(ref_scores, model.scorer.scoring))
    metrics["n"] = len(rows)
    metrics["generation"] = {**settings.model_dump(), "chat": chat, "checkpoint": checkpoint}
    return TaskResult(metrics, records)


def reference_perplexity(scores: list[tuple[list[float], bool]], scoring: str) -> dict[str, Any]:
    """exp(mean NLL) of the references' tokens given their prompts (an encoder-decoder scores
    each reference's eos too, as it was trained), with how it was scored."""
    n = sum(len(lps) for lps, _ in scores)
    nll = -sum(sum(lps) for lps, _ in scores)
    return {"reference_perplexity": nll_to_ppl(nll, n),
            "reference_nll_per_token": nll / max(n, 1), "reference_scoring": scoring}  # fmt: skip


def choice_loglikelihoods(
    model: EvalModel, context: str, choices: list[str], delimiter: str
) -> list[float]:
    """log p(delimiter + choice | context) for each choice (lm-evaluation-harness requests)."""
    return [ll for ll, _ in model.loglikelihoods(context, [delimiter + c for c in choices])]


def run_multiple_choice(model: EvalModel, spec: TaskSpec, _: GenerationSettings) -> TaskResult:
    records, acc, acc_norm = [], [], []
    for i, row in enumerate(load_examples(spec)):
        choices = [str(c) for c in row["choices"]]
        gold = row["gold"] if isinstance(row["gold"], int) else choices.index(str(row["gold"]))
        lls = choice_loglikelihoods(model, task_prompt(spec, row), choices, spec.target_delimiter)
        pred = int(np.argmax(lls))
        pred_norm = int(
            np.argmax([ll / max(len(c.encode()), 1) for ll, c in zip(lls, choices, strict=True)])
        )
        acc.append(pred == gold)
        acc_norm.append(pred_norm == gold)
        others = [ll for j, ll in enumerate(lls) if j != gold]
        records.append(
            {
                "index": i,
                "prompt": task_prompt(spec, row),
                "choices": choices,
                "gold": gold,
                "predicted": pred,
                "loglikelihoods": lls,
                "margin": lls[gold] - max(others) if others else 0.0,
            }
        )
    metrics = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(records),
               "scoring": model.scorer.scoring}  # fmt: skip
    return TaskResult(metrics, records)


def _use_head(model: EvalModel, spec: TaskSpec) -> bool:
    if spec.classifier == "head" and model.head is None:
        raise InputError(
            f"task '{spec.name}': classifier 'head' but {model.path} is no sequence classifier "
            "(no score.weight + id2label); train one with: lmforge finetune --task classify ..."
        )
    return spec.classifier != "likelihood" and model.head is not None


def _check_pairs_prompted(spec: TaskSpec, rows: list[dict[str, Any]]) -> None:
    """Label likelihood reads only the prompt: a pair's second text must be in its template."""
    from lmforge.evals.tasks import TASK_TYPES

    template = spec.prompt_template or TASK_TYPES[spec.type].default_template
    # the template's field names ("{text_pair!r}" and "{text_pair:.80}" read it too)
    fields = {re.split(r"[.\[]", f)[0] for _, f, _, _ in Formatter().parse(template) if f}
    if any(r.get("text_pair") is not None for r in rows) and "text_pair" not in fields:
        raise ConfigError(
            f"task '{spec.name}': its examples have a text_pair, which label likelihood would "
            f"not read (prompt_template {template!r}); put {{text_pair}} in the task's "
            "prompt_template, or score with the model's trained head (classifier: head)"
        )


def run_classification(model: EvalModel, spec: TaskSpec, _: GenerationSettings) -> TaskResult:
    rows = load_examples(spec)
    use_head = _use_head(model, spec)
    seen = sorted({str(r["label"]) for r in rows})
    labels = model.head.labels if use_head else spec.labels or seen
    unknown = sorted(set(seen) - set(labels))
    if unknown:
        raise InputError(
            f"task '{spec.name}': labels {unknown} are not in the "
            f"{'model head' if use_head else 'task'}'s labels {labels}"
        )
    if not use_head:
        _check_pairs_prompted(spec, rows)
    records, y_true, y_pred = [], [], []
    for i, row in enumerate(rows):
        pair = row.get("text_pair")  # a string or None (task_format checked it)
        if use_head:  # a pair as training read it (evals.heads)
            lls = model.classify(str(row["text"]), pair)
        else:
            lls = choice_loglikelihoods(
                model, task_prompt(spec, row), labels, spec.target_delimiter
            )
        pred, true = labels[int(np.argmax(lls))], str(row["label"])
        gold = labels.index(true)
        others = [ll for j, ll in enumerate(lls) if j != gold]
        y_true.append(true)
        y_pred.append(pred)
        records.append(
            {
                "index": i,
                "text": str(row["text"]),
                **({} if pair is None else {"text_pair": pair}),
                "label": true,
                "predicted": pred,
                "loglikelihoods": dict(zip(labels, lls, strict=True)),
                "margin": lls[gold] - max(others) if others else 0.0,
            }
        )
    metrics = M.classification_metrics(y_true, y_pred, labels)
    metrics["n"] = len(rows)
    metrics["classifier"] = "head" if use_head else "likelihood"
    metrics["scoring"] = f"head ({model.head.reads})" if use_head else model.scorer.scoring
    return TaskResult(metrics, records, (M.confusion_matrix(y_true, y_pred, labels), labels))
