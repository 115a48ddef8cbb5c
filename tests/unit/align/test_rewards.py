"""GRPO's reward functions and prompt records: values, weights, and the errors they raise."""

import json

import pytest
import torch

from lmforge.align.config import GRPOOptions, RewardSpec
from lmforge.align.grpo_data import load_prompt_records, require_references
from lmforge.align.rewards import Answers, build_rewards, reward_stats, score_answers
from lmforge.errors import ConfigError, InputError

PROMPT = [{"role": "user", "content": "q"}]


def _answers(texts, references=None, lengths=None):
    n = len(texts)
    return Answers([PROMPT] * n, texts, references or [None] * n, lengths or [1] * n)


def _score(specs, answers):
    fns = build_rewards([RewardSpec(**s) for s in specs], tok=None, vocab_size=0, seq_len=0)
    return score_answers(fns, answers)


def test_text_rewards_against_the_reference():
    refs = ["The  Cat sat", "the cat sat", "a dog"]
    answers = _answers(["the cat sat", "The cat sat on the mat", "cat"], refs)
    _, each = _score([{"kind": "exact"}, {"kind": "contains"}, {"kind": "rouge_l"}], answers)
    assert each["exact"].tolist() == [1.0, 0.0, 0.0]  # case and whitespace runs normalised
    assert each["contains"].tolist() == [1.0, 1.0, 0.0]
    # ROUGE-L F1: 3 common words of 6 and 3 -> 2 * 0.5 * 1 / 1.5
    assert each["rouge_l"].tolist() == pytest.approx([1.0, 2 / 3, 0.0])


def test_regex_length_weights_and_their_sum():
    answers = _answers(["yes: 42", "42", "no"], lengths=[5, 1, 9])
    specs = [
        {"kind": "regex", "pattern": r"\d+", "name": "full"},
        {"kind": "regex", "pattern": r"\d+", "match": "search", "name": "anywhere", "weight": 2},
        {"kind": "length", "min_tokens": 2, "max_tokens": 6, "weight": 0.5},
    ]
    total, each = _score(specs, answers)
    assert each["full"].tolist() == [0.0, 1.0, 0.0] and each["anywhere"].tolist() == [1, 1, 0]
    assert each["length"].tolist() == [0.0, -1.0, -3.0]  # 1 below 2 tokens, 3 above 6
    assert total.tolist() == pytest.approx([2.0, 2.5, -1.5])
    stats = reward_stats(total, each)
    assert stats["rewards/length/mean"] == pytest.approx(-4 / 3)
    assert stats["rewards/full/std"] == pytest.approx(float(torch.tensor([0.0, 1, 0]).std()))


def test_python_rewards_from_a_module_or_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def by_len(prompts, answers, references):\n"
        "    return [float(len(a)) for a in answers]\n"
        "def short(prompts, answers, references):\n"
        "    return [1.0]\n"
        "def words(prompts, answers, references):\n"
        "    return ['many'] * len(answers)\n"
        "def nan(prompts, answers, references):\n"
        "    return [float('nan')] * len(answers)\n"
        "def fails(prompts, answers, references):\n"
        "    return [1 / 0 for a in answers]\n"
    )
    (tmp_path / "typed.py").write_text(  # dataclasses look their module up in sys.modules
        "from __future__ import annotations\nfrom dataclasses import dataclass\n"
        "@dataclass\nclass Score:\n    value: float\n"
        "def score(prompts, answers, references):\n    return [Score(0.5).value for a in answers]\n"
    )
    (tmp_path / "broken.py").write_text("def f(prompts, answers, references:\n")
    answers = _answers(["ab", "abcd"])
    by_file = {"kind": "python", "function": f"{tmp_path / 'my_rewards.py'}:by_len"}
    assert _score([by_file], answers)[0].tolist() == [2.0, 4.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _score([{"kind": "python", "function": "my_rewards:by_len"}], answers)[0][1] == 4.0
    typed = {"kind": "python", "function": f"{tmp_path / 'typed.py'}:score"}
    assert _score([typed], answers)[0].tolist() == [0.5, 0.5]
    for name, error in (("short", "returned 1 values for 2 answers"),
                        ("words", "returned .*not a list of 2 numbers"), ("nan", "returned .*NaN"),
                        ("fails", "raised ZeroDivisionError")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"my_rewards:{name} {error}"):
            _score([{"kind": "python", "function": f"my_rewards:{name}"}], answers)
    for spec, error in (("my_rewards:absent", "has no function absent"),
                        ("no_such_module_x:f", "cannot import .*path/to/file.py:function"), ("by_len", "module:function"),
                        (f"{tmp_path / 'gone.py'}:f", "is not a file"),
                        (f"{tmp_path / 'broken.py'}:f", "cannot import .*SyntaxError")):  # fmt: skip
        with pytest.raises(ConfigError, match=error):
            _score([{"kind": "python", "function": spec}], answers)


def test_reward_config_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="regex reward needs `pattern`"):
        RewardSpec(kind="regex")
    with pytest.raises(
        ValueError, match=r"a rouge_l reward does not read `pattern` \(pattern: regex"
    ):
        RewardSpec(kind="rouge_l", pattern="[A-Z].*")
    with pytest.raises(ValueError, match=r"regex reward does not read `max_tokens`, `model`"):
        RewardSpec(kind="regex", pattern="x", model="rm", max_tokens=3)
    spec = RewardSpec(kind="regex", pattern="x", match="search", weight=0.5, name="starts")
    assert RewardSpec.model_validate(spec.model_dump()) == spec  # a dumped config reads again
    with pytest.raises(ValueError, match="needs `min_tokens` or `max_tokens`"):
        RewardSpec(kind="length")
    with pytest.raises(ValueError, match="max_tokens is below min_tokens"):
        RewardSpec(kind="length", min_tokens=5, max_tokens=2)
    with pytest.raises(ConfigError, match=r"needs grpo\.rewards"):
        build_rewards(GRPOOptions().rewards, None, 0, 0)
    with pytest.raises(ConfigError, match="named 'rouge_l'"):
        _score([{"kind": "rouge_l"}, {"kind": "rouge_l"}], _answers(["a"], ["a"]))
    with pytest.raises(ConfigError, match="pattern '\\('"):
        _score([{"kind": "regex", "pattern": "("}], _answers(["a"]))


def test_prompt_records_take_their_reference_and_refuse_data_without_one(tmp_path):
    rows = [
        {"prompt": "a", "reference": "ra"},
        {"prompt": "b", "answer": "rb"},
        {"prompt": "c", "chosen": "rc", "rejected": "x"},
        {"prompt": "c", "chosen": "later", "rejected": "y"},  # the same prompt keeps its first
        {"prompt": "d", "ranked": ["best", "worse"]},
        {"prompt": [{"role": "user", "content": "e"}]},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_prompt_records(path)
    assert [r.reference for r in records] == ["ra", "rb", "rc", "best", None]
    assert records[4].prompt == [{"role": "user", "content": "e"}]
    require_references(records, [])  # nothing needs one
    with pytest.raises(InputError, match=r"p\.jsonl line 6: no reference answer.*rouge_l"):
        require_references(records, ["rouge_l"])
    path.write_text('{"prompt": "a"}\n{"reference": "r"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl line 2: .* has no prompt"):
        load_prompt_records(path)
