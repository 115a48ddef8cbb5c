"""GRPO's code_tests reward: hand-written answers against their records' tests, the opt-in, and
code tests read from prompt records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmforge.align.config import RewardSpec
from lmforge.align.grpo_data import load_prompt_records, require_tests
from lmforge.align.rewards import Answers, build_rewards, score_answers
from lmforge.common.code_problems import code_problem
from lmforge.errors import ConfigError, InputError

PROMPT = [{"role": "user", "content": "Write dbl."}]
MBPP = {
    "prompt": "Write dbl(x), twice x.",
    "test_list": ["assert dbl(2) == 4", "assert dbl(0) == 0"],
}
HUMANEVAL = {"prompt": "def inc(x):\n", "entry_point": "inc",
             "test": "def check(f):\n    assert f(1) == 2\n"}  # fmt: skip
ANSWERS = [
    "def dbl(x):\n    return 2 * x\n",  # passes both
    "def dbl(x):\n    return x * x\n",  # dbl(2) == 4 passes, dbl(0) == 0 passes too: 0*0
    "def dbl(x):\n    return x + 2\n",  # dbl(2) == 4 passes, dbl(0) == 0 fails
    "Sure:\n```python\ndef dbl(x):\n    return x << 1\n```\nDone.",  # a fenced block
    "def dbl(x):\n    while True:\n        pass\n",  # times out
    "def dbl(x) return 2x",  # does not parse
]


def _rewards(answers: list[str], problems: list, **spec: object) -> list[float]:
    fns = build_rewards(
        [RewardSpec(kind="code_tests", allow_code_execution=True, timeout_s=1.0, **spec)],
        tok=None, vocab_size=0, seq_len=0,
    )  # fmt: skip
    n = len(answers)
    total, each = score_answers(fns, Answers([PROMPT] * n, answers, [None] * n, [1] * n, problems))
    assert each["code_tests"].tolist() == total.tolist()
    return total.tolist()


def test_pass_or_fail_per_answer() -> None:
    problem = code_problem(MBPP, "mbpp")
    assert _rewards(ANSWERS, [problem] * 6) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_partial_is_the_fraction_of_asserts_passed() -> None:
    problem = code_problem(MBPP, "mbpp")
    assert _rewards(ANSWERS, [problem] * 6, partial=True) == [1.0, 1.0, 0.5, 1.0, 0.0, 0.0]


def test_humaneval_answer_completes_the_prompt_or_restates_the_function() -> None:
    problem = code_problem(HUMANEVAL, "he")
    answers = ["    return x + 1\n", "def inc(x):\n    return x + 1\n", "    return x\n"]
    assert _rewards(answers, [problem] * 3) == [1.0, 1.0, 0.0]


def test_refused_without_the_opt_in(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"code_tests reward runs model-written code .* "
                       r"set allow_code_execution: true"):  # fmt: skip
        RewardSpec(kind="code_tests")
    with pytest.raises(ValueError, match=r"regex reward does not read `partial`"):
        RewardSpec(kind="regex", pattern="x", partial=True)
    monkeypatch.setattr(sys, "platform", "win32")  # refused before training, not at each batch
    with pytest.raises(ConfigError, match=r"^a code_tests reward .* needs Linux"):
        _rewards(["x = 1"], [code_problem(MBPP, "mbpp")])


def test_an_answer_without_tests_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs every answer's record to carry tests"):
        _rewards(["x = 1"], [None])


def test_prompt_records_carry_their_tests(tmp_path: Path) -> None:
    path = tmp_path / "code.jsonl"
    rows = [MBPP, {**HUMANEVAL, "prompt": "def inc(x):\n"}, {"prompt": "no tests here"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_prompt_records(path, with_tests=True)
    assert (
        records[0].code.tests == tuple(MBPP["test_list"]) and records[1].code.style == "humaneval"
    )
    assert records[2].code is None
    require_tests(records[:2], ["code_tests"])
    require_tests(records, [])  # nothing runs tests
    with pytest.raises(InputError, match=r"code\.jsonl line 3: no code tests.*code_tests"):
        require_tests(records, ["code_tests"])
    path.write_text(json.dumps({"prompt": "p", "tests": ["assert 1", 2]}) + "\n")
    with pytest.raises(InputError, match=r"code\.jsonl line 1: no tests"):
        load_prompt_records(path, with_tests=True)


def test_an_mbpp_record_with_only_text_is_prompted_as_the_code_eval_prompts_it(tmp_path) -> None:
    path = tmp_path / "mbpp.jsonl"
    text_only = {"text": "Write dbl(x), twice x.", "test_list": MBPP["test_list"]}
    path.write_text(json.dumps(text_only) + "\n")
    (record,) = load_prompt_records(path, with_tests=True)
    shown = record.code.default_prompt()
    assert record.prompt == [{"role": "user", "content": shown}]
    assert "Write dbl(x)" in shown and "assert dbl(2) == 4" in shown
    with pytest.raises(InputError, match=r"mbpp\.jsonl line 1: record with keys .* no prompt"):
        load_prompt_records(path)  # without a code_tests reward a prompt is still needed


def test_tests_fields_are_ordinary_data_without_a_code_tests_reward(tmp_path: Path) -> None:
    # a `tests` field that is not a list of asserts, or HumanEval-like keys, in data read for
    # other rewards: neither parsed nor refused
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": "p1", "reference": "a", "tests": {"owner": "qa"}},
            {**HUMANEVAL, "prompt": "p2", "reference": "b", "test": 3}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_prompt_records(path)
    assert [(r.reference, r.code) for r in records] == [("a", None), ("b", None)]
    with pytest.raises(InputError, match=r"qa\.jsonl line 1: no tests"):
        load_prompt_records(path, with_tests=True)


def test_grpo_trains_on_code_tests_and_refuses_records_without_tests(tmp_path, model_dir) -> None:
    from lmforge.align.stage import AlignConfig, align
    from lmforge.artifacts import read_manifest

    rows = [{"prompt": f"Write dbl, case {i}.", "test_list": [f"assert dbl({i}) == {2 * i}"],
             "test_setup_code": "def dbl(x):\n    return 2 * x\n"} for i in range(12)]  # fmt: skip
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"max_steps": 2, "seq_len": 48, "micro_batch_size": 8, "lr": 1e-3,
             "warmup_steps": 1, "eval_every": 0, "ckpt_every": 0}  # fmt: skip
    reward = {"kind": "code_tests", "allow_code_execution": True, "timeout_s": 5}
    cfg = AlignConfig(
        model=model_dir, data=data, out=tmp_path / "grpo", method="grpo", train=train,
        grpo={"rewards": [reward], "num_generations": 4, "rollout_prompts": 2,
              "max_new_tokens": 4, "eval_prompts": 2}, eval={"max_new_tokens": 4},
    )  # fmt: skip
    m = read_manifest(align(cfg))["metrics"]
    assert 0.0 <= m["val_reward_code_tests"] <= 1.0 and m["steps"] == 2
    data.write_text(data.read_text() + json.dumps({"prompt": "no tests"}) + "\n")
    with pytest.raises(InputError, match=r"code\.jsonl line 13: no code tests.*code_tests"):
        align(cfg.model_copy(update={"out": tmp_path / "again"}))


class _Tok:
    """decode/stop_ids of a character tokenizer: ids are code points, 0 the stop token."""

    def stop_ids(self) -> list[int]:
        return [0]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_code_rewards_read_the_answer_as_decoded_and_as_the_eval_cuts_it() -> None:
    """GRPO strips answers for text rewards, but a completion's body keeps its indentation for
    code_tests, and an answer is cut at the problem's stop strings as the code eval cuts it."""
    from lmforge.align.rollout import answer_texts

    body = [ord(c) for c in "    return x + 1\n"] + [0]
    assert answer_texts(_Tok(), [body]) == ["return x + 1"]
    raw = answer_texts(_Tok(), [body], strip=False)
    assert raw == ["    return x + 1\n"]
    problem = code_problem(HUMANEVAL, "he")
    fns = build_rewards([RewardSpec(kind="code_tests", allow_code_execution=True, timeout_s=1.0)],
                        tok=None, vocab_size=0, seq_len=0)  # fmt: skip
    trailing = "def inc(x):\n    return x + 1\nprint(undefined_name)\n"  # cut at "\nprint"
    texts = ["return x + 1", trailing.strip()]
    batch = Answers([PROMPT] * 2, texts, [None] * 2, [1] * 2, [problem] * 2, [], [raw[0], trailing])
    assert score_answers(fns, batch)[0].tolist() == [1.0, 1.0]
    stripped_only = Answers([PROMPT], texts[:1], [None], [1], [problem])
    assert score_answers(fns, stripped_only)[0].tolist() == [0.0]  # the body lost its indent
