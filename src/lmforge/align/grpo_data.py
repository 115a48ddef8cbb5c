"""PPO's and GRPO's prompts and their reference answers, read from the align stage's data files.

A record (one per line of .jsonl[.gz|.zst] files, align.prefs.record_files) needs a `prompt` (a
string or messages, as align.prefs) and may carry a reference answer: `reference`, else `answer`,
else a preference pair's `chosen`, else a ranked list's best, and, when a code_tests reward runs
them, code tests (HumanEval's `test` + `entry_point`, or MBPP's `test_list`/`tests`,
common.code_problems; without such a reward those fields are ordinary data, never parsed; an
MBPP record with only `text` is prompted as the code eval prompts it: its text and first test). A
prompt seen again keeps its first record; a tool conversation keeps its OpenAI form, which the
prompt is sampled from as it was served. Rewards that compare with a reference (rouge_l, exact,
contains) refuse data in which a record has none, and code_tests data without tests, naming its
file and line (PPO reads only the prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.align.prefs import prompt_fields, record_files, response_text
from lmforge.common.code_problems import CodeProblem, code_problem, has_tests
from lmforge.common.io import read_user_jsonl
from lmforge.errors import InputError

REFERENCE_KEYS = ("reference", "answer", "chosen")


@dataclass(frozen=True)
class PromptRecord:
    """A prompt (role/content messages: a tool conversation's Hermes turns), its reference answer
    or None, where it was read, a tool conversation's OpenAI form and tools
    (align.prefs.prompt_fields), which the prompt is rendered from when sampled (encode.prompt_ids),
    and its code tests or None."""

    prompt: list[dict[str, str]]
    reference: str | None
    source: str
    tool_conversation: dict[str, Any] | None = None
    code: CodeProblem | None = None


def _reference(record: dict[str, Any]) -> str | None:
    for key in REFERENCE_KEYS:
        if key in record:
            return response_text(record[key], key)
    if isinstance(record.get("ranked"), list) and record["ranked"]:
        return response_text(record["ranked"][0], "ranked[0]")
    return None


def _record(record: dict[str, Any], where: str, with_tests: bool) -> PromptRecord:
    try:
        code = code_problem(record, where) if with_tests and has_tests(record) else None
        if "prompt" not in record and code is not None:  # MBPP's {text, test_list}
            record = {**record, "prompt": code.default_prompt()}  # as the code eval shows it
        if "prompt" not in record:
            raise ValueError(f"record with keys {sorted(record)} has no prompt")
        fields = prompt_fields(record)
        return PromptRecord(fields["prompt"], _reference(record), where,
                            fields.get("tool_conversation"), code)  # fmt: skip
    except ValueError as err:
        raise InputError(f"{where}: {err}") from None


def load_prompt_records(path: Path, with_tests: bool = False) -> list[PromptRecord]:
    """The distinct prompts of a file or directory, each with its reference answer if any and,
    with_tests (a code_tests reward runs them), its code tests if any."""
    by_prompt: dict[str, PromptRecord] = {}
    with record_files(path) as files:
        for file in files:
            for line, raw in read_user_jsonl(file):
                record = _record(raw, f"{file} line {line}", with_tests)
                by_prompt.setdefault(repr(record.prompt), record)
    if not by_prompt:
        raise InputError(f"{path} holds no prompts; pass records with a prompt")
    return list(by_prompt.values())


def require_references(records: list[PromptRecord], needed_by: list[str]) -> None:
    """InputError naming the first record without a reference when a reward needs one."""
    if not needed_by:
        return
    missing = next((r for r in records if r.reference is None), None)
    if missing is not None:
        raise InputError(
            f"{missing.source}: no reference answer, which the grpo reward(s) "
            f"{', '.join(needed_by)} compare against; give every record a `reference` (or "
            f"`answer`, or a pair's `chosen`), or use rewards that need none (regex, length, "
            "python, reward_model)"
        )


def require_tests(records: list[PromptRecord], needed_by: list[str]) -> None:
    """InputError naming the first record without code tests when a reward runs them."""
    missing = next((r for r in records if r.code is None), None) if needed_by else None
    if missing is not None:
        raise InputError(
            f"{missing.source}: no code tests, which the grpo reward(s) {', '.join(needed_by)} "
            "run the answers against; give every record HumanEval's `test` and `entry_point` or "
            "MBPP's `test_list` of asserts"
        )
