"""GRPO's verifiable rewards: `grpo.rewards` built into named, weighted functions and summed.

Each function maps a batch of answers to one float per answer. It reads `Answers`: the prompts
(messages), the sampled answer texts (decoded without the stop token, stripped), the records'
reference answers (None where a record has none) and each answer's token count. Kinds:

- reward_model: the score of an `align --method reward` model (align.ppo.score; a tool
  conversation rendered as its pairs were).
- rouge_l: ROUGE-L F1 against the reference (finetune.evaluate.rouge_l).
- exact / contains: 1.0 if the answer equals / contains the reference, else 0.0; both sides are
  lowercased and their whitespace runs collapsed to one space first.
- regex: 1.0 if `pattern` matches the answer (re.fullmatch, or re.search with match=search).
- length: minus the number of answer tokens outside [min_tokens, max_tokens] (0 inside).
- python: a user function "module:function" or "path/to/file.py:function", called as
  f(prompts, answers, references) with lists (each prompt's messages as its record wrote them,
  a tool conversation's in OpenAI's form), returning one finite number per answer.
- code_tests: the answer as decoded (not stripped: a body keeps its indentation; its first
  ```python block if it has one; cut at the problem's stop strings, as the code eval reads a
  chat answer) run against its record's
  HumanEval/MBPP tests in the code sandbox (common.code_exec), all answers of a batch in
  parallel: 1.0 if it passes, else 0.0; with partial, the fraction of the asserts passed.
  Refused unless the spec sets allow_code_execution.

The total is sum(weight * reward); every function's raw values are kept for logging.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.common.code_exec import SandboxLimits, require_opt_in, run_jobs
from lmforge.common.code_problems import CodeProblem
from lmforge.errors import ConfigError
from lmforge.evals.code_eval import answer_code
from lmforge.finetune.evaluate import rouge_l

NEEDS_REFERENCE = ("rouge_l", "exact", "contains")


@dataclass
class Answers:
    """One batch of sampled answers and what rewards may read about them."""

    prompts: list[list[dict[str, str]]]
    texts: list[str]
    references: list[str | None]
    lengths: list[int]
    code: list[CodeProblem | None] = field(default_factory=list)  # each record's tests
    # each record's tool conversation (OpenAI form and tools, align.prefs.prompt_fields) or None
    tool_conversations: list[dict[str, Any] | None] = field(default_factory=list)
    # the answers as decoded, not stripped (code rewards: an indented body is a program); when
    # not given (answers built by hand), texts
    raw_texts: list[str] = field(default_factory=list)

    def as_written(self) -> list[list[dict[str, Any]]]:
        """Each prompt as its record wrote it: a tool conversation's OpenAI messages (assistant
        tool_calls, tool results), not the Hermes turns `prompts` holds for it."""
        tools = self.tool_conversations or [None] * len(self.prompts)
        return [t["messages"] if t else p for p, t in zip(self.prompts, tools, strict=True)]


@dataclass
class RewardFn:
    """A named reward: fn(answers) -> (N,) float tensor, and its weight in the sum."""

    name: str
    weight: float
    needs_reference: bool
    fn: Callable[[Answers], Tensor]
    model: nn.Module | None = None  # a reward model, moved to the policy's device
    needs_tests: bool = False  # code_tests: every record must carry code tests


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _per_answer(values: Any, n: int, where: str) -> Tensor:
    """values as a (n,) float tensor; a ConfigError naming `where` if it is not n finite numbers."""
    try:
        out = torch.as_tensor(
            values.tolist() if hasattr(values, "tolist") else list(values), dtype=torch.float32
        ).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"{where} returned {type(values).__name__}, not a list of {n} numbers: {err}"
        ) from None
    if out.numel() != n:
        raise ConfigError(f"{where} returned {out.numel()} values for {n} answers; return one each")
    if not torch.isfinite(out).all():
        raise ConfigError(f"{where} returned a NaN or infinite reward; return finite numbers")
    return out


def load_function(spec: str) -> Callable[..., Any]:
    """The callable named by "module:function" or "path/to/file.py:function"."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(
            f'reward function {spec!r}: write "module:function" or "path/to/file.py:function"'
        )
    try:
        module = (
            _import_file(Path(where)) if where.endswith(".py") else importlib.import_module(where)
        )
    except FileNotFoundError:
        raise ConfigError(f"reward function {spec!r}: {where} is not a file") from None
    except Exception as err:  # the user's module: a SyntaxError, a missing import, anything
        hint = ""
        if isinstance(err, ModuleNotFoundError) and f"{where}.".startswith(f"{err.name}."):
            hint = (" (the current directory is not on the lmforge command's import path: name "
                    'the file, "path/to/file.py:function")')  # fmt: skip
        raise ConfigError(
            f"reward function {spec!r}: cannot import {where}: {type(err).__name__}: {err}{hint}"
        ) from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {where} has no function {name}")
    return fn


def _import_file(path: Path) -> Any:
    """The module of a .py file, registered in sys.modules as importing it would (dataclasses
    and pickling look their module up there)."""
    if not path.is_file():
        raise FileNotFoundError(path)
    name = f"lmforge_reward_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _python(spec: str) -> Callable[[Answers], Tensor]:
    user = load_function(spec)

    def call(a: Answers) -> Tensor:
        try:
            values = user(a.as_written(), list(a.texts), list(a.references))
        except Exception as err:
            raise ConfigError(
                f"reward function {spec} raised {type(err).__name__}: {err}; make it return a "
                "number for every answer"
            ) from err
        return _per_answer(values, len(a.texts), f"reward function {spec}")

    return call


def _reward_model(model: nn.Module, tok: Any, seq_len: int) -> Callable[[Answers], Tensor]:
    from lmforge.align.ppo import score

    def call(a: Answers) -> Tensor:
        return score(model, tok, a.prompts, a.texts, seq_len, a.tool_conversations).cpu()

    return call


def _text_reward(test: Callable[[str, str | None], float]) -> Callable[[Answers], Tensor]:
    def call(a: Answers) -> Tensor:
        refs = a.references
        return torch.tensor([test(t, r) for t, r in zip(a.texts, refs, strict=True)])

    return call


def _code_tests(limits: SandboxLimits, partial: bool) -> Callable[[Answers], Tensor]:
    def call(a: Answers) -> Tensor:
        if len(a.code) != len(a.texts) or any(p is None for p in a.code):
            raise ConfigError("a code_tests reward needs every answer's record to carry tests")
        texts = a.raw_texts or a.texts
        # the eval's reading of a chat answer (evals.code_eval.answer_code): its first fenced
        # block, cut at the problem's stop strings, so a reward and pass@k judge the same program
        jobs = [p.job(answer_code(t, p.default_stops, chat=True))
                for p, t in zip(a.code, texts, strict=True)]  # fmt: skip
        results = run_jobs(jobs, limits)
        if partial:
            return torch.tensor([r.tests_passed / max(r.tests_total, 1) for r in results])
        return torch.tensor([float(r.passed) for r in results])

    return call


def _length(lo: int, hi: int | None) -> Callable[[Answers], Tensor]:
    def call(a: Answers) -> Tensor:
        n = torch.tensor(a.lengths, dtype=torch.float32)
        over = (n - hi).clamp(min=0) if hi is not None else torch.zeros_like(n)
        return -((lo - n).clamp(min=0) + over)

    return call


def build_rewards(specs: Sequence[Any], tok: Any, vocab_size: int, seq_len: int) -> list[RewardFn]:
    """The RewardFns of grpo.rewards (RewardSpec); names must be distinct."""
    if not specs:
        raise ConfigError(
            "--method grpo needs grpo.rewards, e.g. [{kind: rouge_l}] or "
            "[{kind: regex, pattern: '...'}]"
        )
    fns: list[RewardFn] = []
    for spec in specs:
        kind, model = spec.kind, None
        if kind == "reward_model":
            from lmforge.align.ppo import load_reward_model

            model = load_reward_model(spec.model, vocab_size, tok, role="grpo.rewards[].model")
            fn = _reward_model(model, tok, seq_len)
        elif kind == "rouge_l":
            fn = _text_reward(rouge_l)
        elif kind == "exact":
            fn = _text_reward(lambda t, r: float(_normalise(t) == _normalise(r)))
        elif kind == "contains":
            fn = _text_reward(lambda t, r: float(_normalise(r) in _normalise(t)))
        elif kind == "regex":
            try:
                pattern = re.compile(spec.pattern)
            except re.error as err:
                raise ConfigError(f"regex reward pattern {spec.pattern!r}: {err}") from None
            test = pattern.fullmatch if spec.match == "fullmatch" else pattern.search
            fn = _text_reward(lambda t, _, test=test: float(test(t) is not None))
        elif kind == "length":
            fn = _length(spec.min_tokens, spec.max_tokens)
        elif kind == "code_tests":  # refused off Linux before any training
            require_opt_in(spec.allow_code_execution, "a code_tests reward", "allow_code_execution")
            fn = _code_tests(SandboxLimits(spec.timeout_s, spec.memory_mb), spec.partial)
        else:
            fn = _python(spec.function)
        name = spec.name or kind
        if any(f.name == name for f in fns):
            raise ConfigError(f"two grpo.rewards are named {name!r}; give each a distinct name")
        fns.append(
            RewardFn(name, spec.weight, kind in NEEDS_REFERENCE, fn, model, kind == "code_tests")
        )
    return fns


def score_answers(fns: Sequence[RewardFn], answers: Answers) -> tuple[Tensor, dict[str, Tensor]]:
    """(total (N,) = sum of weight * reward, each function's raw rewards by name)."""
    each = {f.name: f.fn(answers).float().cpu() for f in fns}
    total = torch.zeros(len(answers.texts))
    for f in fns:
        total += f.weight * each[f.name]
    return total, each


def to_device(fns: Sequence[RewardFn], device: torch.device) -> None:
    """Moves the reward models among fns to the policy's device."""
    for f in fns:
        if f.model is not None:
            f.model.to(device)


def reward_stats(total: Tensor, each: dict[str, Tensor]) -> dict[str, float]:
    """Per-function mean and std, as TRL logs rewards/<name>/mean|std, and the total's mean."""
    stats = {"reward": float(total.mean())}
    for name, values in each.items():
        stats[f"rewards/{name}/mean"] = float(values.mean())
        stats[f"rewards/{name}/std"] = float(values.std()) if values.numel() > 1 else 0.0
    return stats
