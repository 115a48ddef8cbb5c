"""The evaluation task format: TaskSpec (the YAML task file's keys), a task's examples read and
checked for the fields its type needs (renamed by `fields`, Alpaca records as prompt/reference),
the prompt each example becomes, and TaskResult, what running a task produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge.common.code_problems import code_problem
from lmforge.common.io import read_jsonl
from lmforge.config import Section
from lmforge.errors import ConfigError, InputError
from lmforge.evals.code_options import CodeTaskOptions
from lmforge.evals.lm import GenerationSettings
from lmforge.evals.perplexity import split_file

TaskTypeName = Literal[
    "perplexity", "generation", "classification", "multiple_choice", "counterfactual", "tagging",
    "code",
]  # fmt: skip


class TaskSpec(Section):
    """One evaluation task (the YAML task format: every key below)."""

    name: str = Field("", description="name in tables (default: the file name)")
    type: TaskTypeName = Field(
        description="perplexity | generation | classification | multiple_choice | counterfactual"
        " | tagging | code"
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
    code: CodeTaskOptions | None = Field(
        None,
        description="code: samples, pass@k, sampling and sandbox settings (evals.code_options)",
    )


@dataclass
class TaskResult:
    """What running one task on one model produced."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # one per example, JSON-able
    confusion: tuple[np.ndarray, list[str]] | None = None


def load_examples(spec: TaskSpec) -> list[dict[str, Any]]:
    """The task's examples, each checked for the fields its type needs."""
    from lmforge.evals.tasks import TASK_TYPES  # the registry imports the runners, which use this

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
        if spec.type == "classification":  # the pair rule finetune reads its data by
            _check_text_pair(row, f"{where} record {i + 1}")
        if spec.type == "code":  # HumanEval or MBPP shape
            code_problem(row, f"{where} record {i + 1}")
    if not rows:
        raise InputError(f"{where}: no examples")
    return rows


def _check_text_pair(row: dict[str, Any], where: str) -> None:
    from lmforge.finetune.formats import text_pair

    try:
        text_pair(row)
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


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


def task_prompt(spec: TaskSpec, row: dict[str, Any]) -> str:
    """The example as its prompt: spec.prompt_template, else its type's default template."""
    from lmforge.evals.tasks import TASK_TYPES  # the registry imports the runners, which use this

    template = spec.prompt_template or TASK_TYPES[spec.type].default_template
    try:
        return template.format(**row)
    except (KeyError, IndexError) as exc:
        raise ConfigError(
            f"task '{spec.name}': prompt_template {template!r} uses {exc}, which the example "
            f"lacks (fields: {', '.join(row)})"
        ) from None
