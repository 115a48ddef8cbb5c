"""Evaluation tasks: a small file format users extend without code, and the runners behind it.

A task is a `TaskSpec`: a type plus where its examples are. Seven types are built in:

- perplexity: texts ({"text"}), or a data stage directory (its `val` split); perplexity and
  bits-per-byte with a sliding window, plus the unigram baseline when a train split is at hand;
- generation: {"prompt", "reference"}; greedy continuation by default, BLEU/ROUGE/exact match;
- classification: {"text", "label"}; each label scored as a continuation of the prompt (the
  label with the highest log-likelihood wins), accuracy/precision/recall/F1 and a confusion matrix;
- multiple_choice: {"query", "choices", "gold"}; scored by log-likelihood the way
  lm-evaluation-harness does: acc (argmax of log p) and acc_norm (argmax of log p per UTF-8 byte);
- counterfactual: {"text"}; demographic terms swapped to each side of a group and both versions
  scored (class probability or log-likelihood per token); the gap per group (evals/bias.py);
- tagging: {"tokens", "tags"}; an encoder's token-classification head tags each word; word
  accuracy and, for BIO tags, entity precision/recall/F1 per type (evals/tagging.py);
- code: HumanEval {"prompt", "test", "entry_point"} or MBPP {"text", "test_list"} records; n
  sampled programs per problem run against the tests in a sandbox, pass@k (evals/code_eval.py).

A task is given as a YAML file (a TaskSpec; its `data` is relative to the file, or `examples` are
inline), a JSONL file (type inferred from the first record's fields), or a data directory.

This module is the registry of task types and turns what a user names into a TaskSpec; the format
(TaskSpec, examples, prompts, TaskResult) is task_format.py, the runners are task_runners.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.common.code_problems import has_tests
from lmforge.common.io import read_jsonl
from lmforge.config import load_yaml, validate
from lmforge.errors import ConfigError, InputError
from lmforge.evals.bias import run_counterfactual
from lmforge.evals.code_eval import require_code_opt_in, run_code
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.tagging import run_tagging
from lmforge.evals.task_format import TaskResult, TaskSpec
from lmforge.evals.task_runners import (
    run_classification,
    run_generation,
    run_multiple_choice,
    run_perplexity,
)

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
    "code": TaskType(run_code, (), "pass@1", True),  # its record shapes: common.code_problems
}


def task_type(name: str) -> TaskType:
    """Registry lookup with an error listing the valid types."""
    if name not in TASK_TYPES:
        raise ConfigError(f"unknown task type '{name}' (valid: {', '.join(TASK_TYPES)})")
    return TASK_TYPES[name]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".zst", ".gz", ".jsonl", ".json", ".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return name


def infer_type(keys: set[str]) -> str:
    """The task type whose fields a record has (the most specific one wins). Code tests
    (common.code_problems.has_tests) come after the other types' whole records, so a generation
    or classification file with a field named `tests` keeps its type."""
    order = ("multiple_choice", "tagging", "generation", "classification", "code", "perplexity")
    for name in order:
        if has_tests(keys) if name == "code" else set(TASK_TYPES[name].fields) <= keys:
            return name
    if {"instruction", "output"} <= keys:
        return "generation"  # Alpaca records
    valid = "; ".join(f"{n}: {', '.join(t.fields)}" for n, t in TASK_TYPES.items())
    raise InputError(f"records with fields {sorted(keys)} match no task type ({valid})")


def load_task(item: str | Path | dict[str, Any]) -> TaskSpec:
    """A TaskSpec from an inline mapping, a YAML task file, a JSONL file or a data directory; a
    code task without its opt-in is refused here, before any model loads."""
    spec = _task_spec(item)
    if spec.type == "code":
        require_code_opt_in(spec)
    return spec


def _task_spec(item: str | Path | dict[str, Any]) -> TaskSpec:
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
