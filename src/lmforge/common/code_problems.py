"""Code problems read from records, and the program + tests a model's answer becomes.

Two record shapes, as the usual benchmarks ship them:

- HumanEval: {prompt, test, entry_point}. The model continues the prompt (a signature and
  docstring); the program is prompt + completion, and the one test is `test` followed by
  `check(entry_point)`. An answer that writes the whole function (a chat model's) follows the
  prompt closed with `pass`, so it replaces the prompt's function and keeps its imports.
- MBPP: {text or prompt, test_list or tests: ["assert ...", ...], test_setup_code?}. The model
  writes the whole function; the program is test_setup_code + completion, each assert a test.

Both the eval stage's `code` task and GRPO's `code_tests` reward read records through here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.common.code_exec import CodeJob
from lmforge.errors import InputError

# where a completion-style sample stops: the next top-level statement (Chen et al. 2021)
HUMANEVAL_STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
# bigcode-evaluation-harness's MBPP stops: the function is done when top-level code starts
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class CodeProblem:
    """A problem's prompt text, the tests an answer must pass, and how answers become programs."""

    style: Literal["humaneval", "mbpp"]
    prompt: str
    tests: tuple[str, ...]
    setup: str = ""
    entry_point: str = ""  # HumanEval: the function the test checks

    @property
    def default_stops(self) -> tuple[str, ...]:
        return HUMANEVAL_STOPS if self.style == "humaneval" else MBPP_STOPS

    def default_prompt(self) -> str:
        """What the model is shown: HumanEval's prompt as is; MBPP's text and first test in a
        docstring (bigcode-evaluation-harness's prompt)."""
        if self.style == "humaneval":
            return self.prompt
        return f'"""\n{self.prompt}\n{self.tests[0]}\n"""\n'

    def job(self, completion: str) -> CodeJob:
        """The program the answer makes, with this problem's tests."""
        if self.style == "humaneval":
            restated = re.search(rf"^def {re.escape(self.entry_point)}\(", completion, re.M)
            joint = "    pass\n\n" if restated else ""
            return CodeJob(self.prompt + joint + completion, self.tests)
        return CodeJob(f"{self.setup}\n{completion}" if self.setup else completion, self.tests)


def code_problem(record: Any, where: str) -> CodeProblem:
    """The CodeProblem of a HumanEval or MBPP record; an InputError naming `where` otherwise."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "test" in record and "entry_point" in record:
        for key in ("prompt", "test", "entry_point"):
            if not isinstance(record.get(key), str):
                raise InputError(f"{where}: a HumanEval record needs a string `{key}`")
        test = f"{record['test']}\n\ncheck({record['entry_point']})\n"
        return CodeProblem("humaneval", record["prompt"], (test,), "", record["entry_point"])
    key = "test_list" if "test_list" in record else "tests"
    tests = record.get(key)
    text = record.get("text", record.get("prompt"))
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        if not isinstance(text, str):
            raise InputError(f"{where}: an MBPP record needs its task as a string `text` or "
                             "`prompt`")  # fmt: skip
        setup = record.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise InputError(f"{where}: `test_setup_code` must be a string")
        return CodeProblem("mbpp", text, tuple(tests), setup)
    raise InputError(
        f"{where}: no tests; a code record is HumanEval's {{prompt, test, entry_point}} or "
        f'MBPP\'s {{text|prompt, test_list|tests: ["assert ...", ...], test_setup_code?}} (has '
        f"{', '.join(sorted(map(str, record))) or 'no fields'})"
    )


def has_tests(fields: Collection[str]) -> bool:
    """Whether a record (or its set of keys) carries code tests in either shape (it may still
    be malformed)."""
    return ("test" in fields and "entry_point" in fields) or any(
        k in fields for k in ("test_list", "tests")
    )


def extract_code(answer: str) -> str:
    """A chat answer's first fenced code block (```python ... ```), else the answer itself."""
    match = _FENCE.search(answer)
    return match.group(1) if match else answer
