"""Built-in small Python problems in HumanEval form for RL on code (kind `code_problems`).

Each problem is a one-line function from a template (arithmetic on an int, a string edit, a list
comprehension) with a drawn argument name (the function is named after both) and constant: a
HumanEval record {task_id, prompt (signature + docstring), canonical_solution, test, entry_point}. The constants
split by a seeded draw: a held-out share of each template's constants appears only in test
problems, so a model passes them by reading the docstring, not by recalling a training function.
Writes problems_{train,test}.jsonl (what eval's `code` task and GRPO's `code_tests` reward read),
corpus.jsonl (each train problem's prompt followed by the whole function that answers it, as
{"text"}, for pretraining: a model that never saw a prompt restated does not copy its function
name), sft.jsonl (the first `sft_examples` train problems as chat pairs: the prompt, the whole
function) and stats.json. With `rl_fraction`, a further share of each template's train constants
is kept out of corpus.jsonl and sft.jsonl: their problems go to problems_rl.jsonl, prompts whose
reward a model earns only by reading the docstring's constant, as it must on test problems (on a
problem pretraining showed verbatim, recalling the function earns it just as well).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from lmforge.artifacts import StageContext
from lmforge.common.io import write_jsonl
from lmforge.config import StageConfig
from lmforge.errors import ConfigError

NUMBERS = tuple(range(2, 30))
WORDS = ("ab", "cat", "dog", "sun", "pre", "top", "red", "max", "low", "net", "fox", "key")
# the tests' inputs tell every two constants of a template apart: ints above the largest
# constant (x % 22 and x % 26 agree on every x below 22, so a wrong constant passed) and list
# items covering 0..12 (v > 9 and v > 10 agree unless an item is 10)
INPUTS = {"int": [0, 1, 3, 7, 12, 45, 100], "str": ["", "a", "hello", "xyz"],
          "list": [[], [1, 2, 3], [5, 0, 9, 4], [7, 7, 2, 11, 3, 8], [10, 6, 12]]}  # fmt: skip
ARGS = {
    "int": ("x", "n", "a", "num"),
    "str": ("s", "text", "word"),
    "list": ("xs", "items", "nums"),
}


@dataclass(frozen=True)
class Template:
    """A one-line function: its docstring and body with {c} (constant) and {a} (argument)."""

    name: str
    kind: str  # the argument's type: int, str or list (INPUTS, ARGS)
    doc: str
    body: str
    constants: tuple[Any, ...] = NUMBERS


TEMPLATES = (
    Template("add", "int", "Return {a} plus {c}.", "{a} + {c}"),
    Template("sub", "int", "Return {a} minus {c}.", "{a} - {c}"),
    Template("mul", "int", "Return {a} times {c}.", "{a} * {c}"),
    Template("mod", "int", "Return the remainder of {a} divided by {c}.", "{a} % {c}"),
    Template("repeat", "str", "Return {a} repeated {c} times.", "{a} * {c}", tuple(range(2, 6))),
    Template("prefix", "str", "Return {a} with '{c}' in front.", "'{c}' + {a}", WORDS),
    Template("suffix", "str", "Return {a} with '{c}' at the end.", "{a} + '{c}'", WORDS),
    Template("scale", "list", "Return each item of {a} times {c}.", "[v * {c} for v in {a}]"),
    Template("above", "list", "Return the items of {a} greater than {c}.",
             "[v for v in {a} if v > {c}]", tuple(range(0, 12))),
    Template("head", "list", "Return the first {c} items of {a}.", "{a}[:{c}]", tuple(range(1, 6))),
    Template("shift", "list", "Return the largest item of {a} plus {c}, or {c} if it is empty.",
             "max({a}, default=0) + {c}"),
)  # fmt: skip


class CodeProblemsConfig(StageConfig):
    """`stage: code_problems` in a recipe: seeded one-line Python problems, HumanEval form."""

    train_problems: int = Field(
        530, ge=1, description="problems in problems_train.jsonl (530: every distinct one)"
    )
    test_problems: int = Field(48, ge=1, description="held-out problems in problems_test.jsonl")
    sft_examples: int = Field(
        32, ge=0, description="train problems also written as chat pairs to sft.jsonl (few, so "
        "RL has room to improve)",
    )  # fmt: skip
    heldout_fraction: float = Field(
        0.3, gt=0, lt=1, description="share of each template's constants kept for test problems"
    )
    rl_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of each template's constants whose train problems "
        "only problems_rl.jsonl holds (not corpus.jsonl or sft.jsonl): RL prompts with constants "
        "the model never saw in a function (0: none, no problems_rl.jsonl)",
    )  # fmt: skip
    seed: int = Field(0, description="seed of the constant split and of every draw")

    def input_versions(self) -> dict[str, str]:
        """This module's bytes: the problems come from its templates, so a changed template (or
        naming) rebuilds a cached stage as a changed setting would."""
        return {"code_problems": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}

    @model_validator(mode="after")
    def _sft_within_train(self) -> CodeProblemsConfig:
        if self.sft_examples > self.train_problems:
            raise ValueError(
                f"sft_examples={self.sft_examples} exceeds train_problems="
                f"{self.train_problems}; the SFT pairs are train problems"
            )
        return self


def problem(template: Template, c: Any, func: str, arg: str, task_id: str) -> dict[str, Any]:
    """The HumanEval record of one template instance; its tests are the canonical solution's
    outputs on the template's fixed inputs."""
    doc = template.doc.format(a=arg, c=c)
    body = template.body.format(a=arg, c=c)
    prompt = f'def {func}({arg}):\n    """{doc}\n    """\n'
    solution = f"    return {body}\n"
    scope: dict[str, Any] = {}
    exec(prompt + solution, scope)  # our own generated one-liner, to record its outputs
    asserts = "".join(
        f"    assert candidate({v!r}) == {scope[func](v)!r}\n" for v in INPUTS[template.kind]
    )
    return {
        "task_id": task_id, "prompt": prompt, "canonical_solution": solution,
        "test": f"def check(candidate):\n{asserts}", "entry_point": func,
        "template": template.name, "constant": c,
    }  # fmt: skip


def split_constants(rng: np.random.Generator, fraction: float) -> dict[str, set[Any]]:
    """Per template, the constants held out for test problems (at least one, never all)."""
    held: dict[str, set[Any]] = {}
    for t in TEMPLATES:
        k = min(len(t.constants) - 1, max(1, round(fraction * len(t.constants))))
        held[t.name] = {t.constants[i] for i in rng.permutation(len(t.constants))[:k]}
    return held


def split_rl_constants(
    rng: np.random.Generator, fraction: float, held: dict[str, set[Any]]
) -> dict[str, set[Any]]:
    """Per template, train constants kept for RL prompts only (none at fraction 0; at least one
    constant stays for pretraining)."""
    rl: dict[str, set[Any]] = {}
    for t in TEMPLATES:
        train = [c for c in t.constants if c not in held[t.name]]
        k = min(len(train) - 1, round(fraction * len(t.constants)))
        rl[t.name] = {train[i] for i in rng.permutation(len(train))[:k]}
    return rl


def draw_problems(
    rng: np.random.Generator, count: int, held: dict[str, set[Any]], test: bool
) -> list[dict[str, Any]]:
    """count problems over the templates in turn, constants from the held-out set (test) or the
    rest (train), with a drawn argument name; a split repeats no (template, constant, name)
    triple."""
    split = "test" if test else "train"
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, Any, str]] = set()
    for i in range(count * 20):
        if len(out) == count:
            break
        t = TEMPLATES[i % len(TEMPLATES)]
        pool = [c for c in t.constants if (c in held[t.name]) == test]
        c = pool[int(rng.integers(len(pool)))]
        arg = ARGS[t.kind][int(rng.integers(len(ARGS[t.kind])))]
        func = f"{t.name}_{arg}"  # drawn names (get_value, ...) were not copied by a tiny model
        if (t.name, c, func) in seen:
            continue
        seen.add((t.name, c, func))
        out.append(problem(t, c, func, arg, f"lmforge/{split}/{len(out)}"))
    if len(out) < count:
        raise ConfigError(
            f"code_problems: {split}_problems={count}, but the templates give only {len(out)} "
            f"distinct {split} problems at this heldout_fraction; ask for at most {len(out)}"
        )
    return out


def sft_pair(record: dict[str, Any]) -> dict[str, str]:
    """A chat SFT example: the HumanEval prompt asks, the whole function answers (what GRPO and
    a chat `code` eval run as prompt + `pass` + answer, common.code_problems)."""
    header = record["prompt"].split("\n", 1)[0]
    return {"instruction": record["prompt"], "output": f"{header}\n{record['canonical_solution']}"}


def build(cfg: CodeProblemsConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes problems_{train,test}.jsonl, corpus.jsonl, sft.jsonl, stats.json and (rl_fraction
    > 0) problems_rl.jsonl."""
    rng = np.random.default_rng(cfg.seed)
    held = split_constants(rng, cfg.heldout_fraction)
    train = draw_problems(rng, cfg.train_problems, held, test=False)
    test = draw_problems(rng, cfg.test_problems, held, test=True)
    # its own stream, so rl_fraction 0 draws the problems it drew before the field existed
    rl = split_rl_constants(np.random.default_rng([cfg.seed, 1]), cfg.rl_fraction, held)
    rl_only = [r for r in train if r["constant"] in rl[r["template"]]]
    seen = [r for r in train if r["constant"] not in rl[r["template"]]]
    write_jsonl(ctx.out / "problems_train.jsonl", train)
    write_jsonl(ctx.out / "problems_test.jsonl", test)
    if cfg.rl_fraction > 0:
        write_jsonl(ctx.out / "problems_rl.jsonl", rl_only)
    pairs = [sft_pair(r) for r in seen]
    write_jsonl(ctx.out / "corpus.jsonl", [{"text": r["prompt"] + p["output"]}
                                           for r, p in zip(seen, pairs, strict=True)])  # fmt: skip
    write_jsonl(ctx.out / "sft.jsonl", pairs[: cfg.sft_examples])
    stats = {
        "train": len(train), "test": len(test), "sft": min(cfg.sft_examples, len(seen)),
        "rl": len(rl_only),
        "train_templates": dict(Counter(r["template"] for r in train)),
        "test_templates": dict(Counter(r["template"] for r in test)),
        "heldout_constants": {k: sorted(v, key=str) for k, v in held.items()},
        "rl_constants": {k: sorted(v, key=str) for k, v in rl.items()},
    }  # fmt: skip
    ctx.atomic_write_json(ctx.out / "stats.json", stats)
    return {"train_problems": len(train), "test_problems": len(test), "sft_examples": stats["sft"]}
