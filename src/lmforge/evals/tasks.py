"""Evaluation tasks: a small file format users extend without code, and the runners behind it.

A task is a `TaskSpec`: a type plus where its examples are. Four types are built in:

- perplexity: texts ({"text"}), or a data stage directory (its `val` split); perplexity and
  bits-per-byte with a sliding window, plus the unigram baseline when a train split is at hand;
- generation: {"prompt", "reference"}; greedy continuation by default, BLEU/ROUGE/exact match;
- classification: {"text", "label"}; each label scored as a continuation of the prompt (the
  label with the highest log-likelihood wins), accuracy/precision/recall/F1 and a confusion matrix;
- multiple_choice: {"query", "choices", "gold"}; scored by log-likelihood the way
  lm-evaluation-harness does: acc (argmax of log p) and acc_norm (argmax of log p per UTF-8 byte);
- counterfactual: {"text"}; demographic terms swapped to each side of a group and both versions
  scored (class probability or log-likelihood per token); the gap per group (evals/bias.py).

A task is given as a YAML file (a TaskSpec; its `data` is relative to the file, or `examples` are
inline), a JSONL file (type inferred from the first record's fields), or a data directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge.common.io import read_jsonl
from lmforge.config import Section, load_yaml, validate
from lmforge.errors import ConfigError, InputError
from lmforge.evals import metrics as M
from lmforge.evals.lm import EvalModel, GenerationSettings, nll_to_ppl
from lmforge.evals.perplexity import perplexity, read_texts, split_file, unigram_baseline

TaskTypeName = Literal[
    "perplexity", "generation", "classification", "multiple_choice", "counterfactual", "tagging"
]


class TaskSpec(Section):
    """One evaluation task (the YAML task format: every key below)."""

    name: str = Field("", description="name in tables (default: the file name)")
    type: TaskTypeName = Field(
        description="perplexity | generation | classification | multiple_choice | counterfactual"
        " | tagging"
    )
    data: Path | None = Field(None, description="JSONL file or data stage directory")
    examples: list[dict[str, Any]] | None = Field(
        None, description="inline examples instead of data"
    )
    split: str = Field("val", description="split to read when data is a data stage directory")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="task field -> record field, for records named otherwise (e.g. {prompt: "
        "context, label: intent})",
    )
    max_examples: int | None = Field(None, ge=1, description="evaluate only the first N examples")
    prompt_template: str | None = Field(
        None, description="str.format template over the example's fields (default per type)"
    )
    target_delimiter: str = Field(" ", description="between prompt and each choice/label")
    labels: list[str] | None = Field(None, description="classification labels (default: seen)")
    max_length: int | None = Field(None, ge=1, description="perplexity window (default block)")
    stride: int | None = Field(None, ge=1, description="perplexity window stride (default half)")
    baseline: bool = Field(True, description="perplexity: also score the unigram baseline")
    baseline_max_documents: int = Field(2000, ge=1, description="train docs for the baseline")
    generation: GenerationSettings | None = Field(None, description="overrides eval generation")
    chat: bool | None = Field(
        None, description="generation: prompt as a chat turn (default: if the model has a template)"
    )
    classifier: Literal["auto", "head", "likelihood"] = Field(
        "auto",
        description="classification: the model's trained head (a sequence classifier) or label "
        "likelihood; auto = the head when the model has one",
    )
    terms: Path | None = Field(
        None, description="counterfactual: term groups file (default: the built-in list)"
    )
    groups: list[str] | None = Field(None, description="counterfactual: only these groups")
    target_label: str | None = Field(
        None, description="counterfactual with a head: the class whose probability is compared"
    )


@dataclass
class TaskResult:
    """What running one task on one model produced."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # one per example, JSON-able
    confusion: tuple[np.ndarray, list[str]] | None = None


Runner = Callable[[EvalModel, TaskSpec, GenerationSettings], TaskResult]


@dataclass(frozen=True)
class TaskType:
    """A registry entry: how to run a type, what its examples need, its headline metric."""

    run: Runner
    fields: tuple[str, ...]
    main_metric: str
    higher_is_better: bool
    default_template: str = ""
    fallback_metric: str = ""  # the headline when a result lacks main_metric

    def headline_metric(self, *results: dict[str, Any]) -> str:
        """main_metric, or fallback_metric where a result has no main_metric (tagging without
        BIO tags has no entities, only word accuracy): one metric every model's result has."""
        if all(self.main_metric in metrics for metrics in results):
            return self.main_metric
        return self.fallback_metric


def load_examples(spec: TaskSpec) -> list[dict[str, Any]]:
    """The task's examples, each checked for the fields its type needs."""
    needed = TASK_TYPES[spec.type].fields
    if spec.examples is not None:
        rows, where = spec.examples, f"task '{spec.name}'"
    elif spec.data is not None:
        file = split_file(spec.data, spec.split)
        rows, where = list(read_jsonl(file)), str(file)
    else:
        raise ConfigError(f"task '{spec.name}': give 'data' (a JSONL file) or inline 'examples'")
    rows = rows[: spec.max_examples] if spec.max_examples else rows
    if spec.fields:
        rows = [renamed(r, spec.fields, f"{where} record {i + 1}") for i, r in enumerate(rows)]
    if spec.type == "generation":
        rows = [from_alpaca(r) if isinstance(r, dict) else r for r in rows]
    for i, row in enumerate(rows):
        missing = [f for f in needed if not isinstance(row, dict) or f not in row]
        if missing:
            raise InputError(
                f"{where} record {i + 1}: missing field(s) {', '.join(missing)} "
                f"(a {spec.type} task needs {', '.join(needed)}; 'fields' maps them from other "
                "names)"
            )
    if not rows:
        raise InputError(f"{where}: no examples")
    return rows


def renamed(row: Any, fields: dict[str, str], where: str) -> Any:
    """The record with each task field taken from the record field `fields` names for it; a
    named field the record lacks is an error (the record's own field of that name is not used
    in its place)."""
    if not isinstance(row, dict):
        return row  # the field check names it
    absent = [f"'{v}' (for {k})" for k, v in fields.items() if v not in row]
    if absent:
        raise InputError(
            f"{where}: no field(s) {', '.join(absent)}, which the task's 'fields' maps from; "
            f"the record has {', '.join(sorted(map(str, row))) or 'no fields'}"
        )
    return {**row, **{k: row[v] for k, v in fields.items()}}


def from_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    """An Alpaca record ({instruction, input, output}) as a prompt/reference pair."""
    if "prompt" in row or "instruction" not in row or "output" not in row:
        return row
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {**row, "prompt": prompt, "reference": row["output"]}


def _prompt(spec: TaskSpec, row: dict[str, Any]) -> str:
    template = spec.prompt_template or TASK_TYPES[spec.type].default_template
    try:
        return template.format(**row)
    except (KeyError, IndexError) as exc:
        raise ConfigError(
            f"task '{spec.name}': prompt_template {template!r} uses {exc}, which the example "
            f"lacks (fields: {', '.join(row)})"
        ) from None


# -- runners -----------------------------------------------------------------------------------


def run_perplexity(model: EvalModel, spec: TaskSpec, _: GenerationSettings) -> TaskResult:
    if spec.examples is not None:
        texts = [r["text"] for r in load_examples(spec)]
    elif spec.data is not None:
        texts = read_texts(spec.data, spec.split, spec.max_examples)
    else:
        raise ConfigError(f"task '{spec.name}': give 'data' or inline 'examples'")
    result = perplexity(model, texts, max_length=spec.max_length, stride=spec.stride)
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
    settings = spec.generation or settings
    rows = load_examples(spec)
    prompts = [_prompt(spec, r) for r in rows]
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
    metrics["generation"] = {**settings.model_dump(), "chat": chat}
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
        lls = choice_loglikelihoods(model, _prompt(spec, row), choices, spec.target_delimiter)
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
                "prompt": _prompt(spec, row),
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
    records, y_true, y_pred = [], [], []
    for i, row in enumerate(rows):
        if use_head:
            lls = model.classify(str(row["text"]))
        else:
            lls = choice_loglikelihoods(model, _prompt(spec, row), labels, spec.target_delimiter)
        pred, true = labels[int(np.argmax(lls))], str(row["label"])
        gold = labels.index(true)
        others = [ll for j, ll in enumerate(lls) if j != gold]
        y_true.append(true)
        y_pred.append(pred)
        records.append(
            {
                "index": i,
                "text": str(row["text"]),
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


def run_counterfactual(
    model: EvalModel, spec: TaskSpec, settings: GenerationSettings
) -> TaskResult:
    from lmforge.evals.bias import run_counterfactual as run  # bias.py imports this module

    return run(model, spec, settings)


def run_tagging(model: EvalModel, spec: TaskSpec, settings: GenerationSettings) -> TaskResult:
    from lmforge.evals.tagging import run_tagging as run  # tagging.py imports this module

    return run(model, spec, settings)


TASK_TYPES: dict[str, TaskType] = {
    "perplexity": TaskType(run_perplexity, ("text",), "bits_per_byte", False),
    "generation": TaskType(run_generation, ("prompt", "reference"), "rougeL", True, "{prompt}"),
    "classification": TaskType(
        run_classification, ("text", "label"), "accuracy", True, "{text}\nLabel:"
    ),
    "multiple_choice": TaskType(
        run_multiple_choice, ("query", "choices", "gold"), "acc_norm", True, "{query}"
    ),
    "counterfactual": TaskType(run_counterfactual, ("text",), "max_abs_gap", False),
    "tagging": TaskType(
        run_tagging, ("tokens", "tags"), "entity_f1", True, fallback_metric="token_accuracy"
    ),
}


def task_type(name: str) -> TaskType:
    """Registry lookup with an error listing the valid types."""
    if name not in TASK_TYPES:
        raise ConfigError(f"unknown task type '{name}' (valid: {', '.join(TASK_TYPES)})")
    return TASK_TYPES[name]


# -- loading task specs ------------------------------------------------------------------------


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".zst", ".gz", ".jsonl", ".json", ".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def infer_type(keys: set[str]) -> str:
    """The task type whose fields a record has (the most specific one wins)."""
    for name in ("multiple_choice", "tagging", "generation", "classification", "perplexity"):
        if set(TASK_TYPES[name].fields) <= keys:
            return name
    if {"instruction", "output"} <= keys:
        return "generation"  # Alpaca records
    valid = "; ".join(f"{n}: {', '.join(t.fields)}" for n, t in TASK_TYPES.items())
    raise InputError(f"records with fields {sorted(keys)} match no task type ({valid})")


def load_task(item: str | Path | dict[str, Any]) -> TaskSpec:
    """A TaskSpec from an inline mapping, a YAML task file, a JSONL file or a data directory."""
    if isinstance(item, dict):
        spec = validate(TaskSpec, item, where="task")
        return (
            spec
            if spec.name
            else spec.model_copy(update={"name": _stem(Path(spec.data or "task"))})
        )
    path = Path(item)
    if not path.exists():
        raise InputError(
            f"task {item}: no such file or directory (give a task YAML, a JSONL file of examples "
            "or a data directory)"
        )
    if path.is_dir():
        return TaskSpec(name=path.name, type="perplexity", data=path)
    if path.suffix in (".yaml", ".yml"):
        body = load_yaml(path)
        for key in ("data", "terms"):
            if body.get(key) is not None:
                body[key] = str((path.parent / body[key]).resolve())
        body.setdefault("name", _stem(path))
        return validate(TaskSpec, body, where=str(path))
    first = next(iter(read_jsonl(path)), None)
    if not isinstance(first, dict):
        raise InputError(f"{path}: expected JSON objects, one per line")
    try:
        kind = infer_type(set(first))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return TaskSpec(name=_stem(path), type=kind, data=path)


def run_task(model: EvalModel, spec: TaskSpec, settings: GenerationSettings) -> TaskResult:
    """Runs one task on one model."""
    return task_type(spec.type).run(model, spec, settings)
