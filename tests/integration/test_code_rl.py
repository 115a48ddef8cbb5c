"""The code-rl recipe: the built-in code problems and the whole path, cut down to micro sizes."""

from __future__ import annotations

import json
import logging
from math import comb
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmforge.align.code_synthetic import (
    ARGS,
    TEMPLATES,
    CodeProblemsConfig,
    build,
    draw_problems,
    problem,
    sft_pair,
    split_constants,
)
from lmforge.artifacts import StageContext
from lmforge.common.code_exec import run_jobs
from lmforge.common.code_problems import code_problem
from lmforge.common.io import read_jsonl
from lmforge.common.logging import MetricsWriter
from lmforge.errors import ConfigError
from lmforge.runner import builtin_recipe, run_recipe

pytestmark = pytest.mark.integration


def problems(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    held = split_constants(rng, 0.3)
    # every template twice in each split (they take turns)
    n = 2 * len(TEMPLATES)
    return draw_problems(rng, n, held, test=False), draw_problems(rng, n, held, test=True)


def test_canonical_solutions_pass_and_a_wrong_answer_fails() -> None:
    train, test = problems()
    records = train + test
    jobs = [code_problem(r, r["task_id"]).job(r["canonical_solution"]) for r in records]
    assert [r.status for r in run_jobs(jobs)] == ["passed"] * len(records)
    # the chat form SFT teaches (the whole function) passes too; an off-by-one does not
    whole = sft_pair(train[0])["output"]
    problem = code_problem(train[0], "train 0")
    assert run_jobs([problem.job(whole)])[0].passed
    wrong = whole.replace("return ", "return 1 + ")
    assert run_jobs([problem.job(wrong)])[0].status == "failed"


def test_test_constants_are_held_out_and_draws_are_seeded() -> None:
    train, test = problems()
    assert {r["template"] for r in test} == {t.name for t in TEMPLATES}
    for t in TEMPLATES:
        seen = {r["constant"] for r in train if r["template"] == t.name}
        unseen = {r["constant"] for r in test if r["template"] == t.name}
        assert seen and unseen and not seen & unseen, t.name
    assert problems(0) == (train, test)
    assert problems(1) != (train, test)


def test_tests_tell_every_two_constants_of_a_template_apart() -> None:
    """A function written with another of its template's constants fails the tests (else a
    model passes a held-out problem without reading its constant)."""
    for t in TEMPLATES:
        tests = {problem(t, c, "f", ARGS[t.kind][0], "t")["test"] for c in t.constants}
        assert len(tests) == len(t.constants), t.name


def test_more_sft_examples_than_train_problems_is_refused() -> None:
    with pytest.raises(ValueError, match="sft_examples=5 exceeds train_problems=4"):
        CodeProblemsConfig(out=Path("x"), train_problems=4, sft_examples=5)


def test_more_problems_than_the_templates_give_is_refused() -> None:
    rng = np.random.default_rng(0)
    held = split_constants(rng, 0.3)
    with pytest.raises(ConfigError, match="train_problems=2000, but the templates give only 530"):
        draw_problems(rng, 2000, held, test=False)


def test_rl_constants_reach_only_the_rl_prompts(tmp_path: Path) -> None:
    """rl_fraction keeps a share of train constants out of the corpus and the SFT pairs: their
    problems are RL prompts whose functions pretraining never showed."""
    cfg = CodeProblemsConfig(out=tmp_path, sft_examples=400, rl_fraction=0.2)
    ctx = StageContext(tmp_path, "problems", logging.getLogger("t"), MetricsWriter(tmp_path / "m"))
    build(cfg, ctx)
    train = list(read_jsonl(tmp_path / "problems_train.jsonl"))
    rl = list(read_jsonl(tmp_path / "problems_rl.jsonl"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    corpus = "".join(r["text"] for r in read_jsonl(tmp_path / "corpus.jsonl"))
    sft = "".join(r["instruction"] for r in read_jsonl(tmp_path / "sft.jsonl"))
    assert 0 < len(rl) == stats["rl"] < len(train) and all(r in train for r in rl)
    for t in TEMPLATES:
        rl_constants = set(stats["rl_constants"][t.name])
        kept = {r["constant"] for r in train if r["template"] == t.name} - rl_constants
        assert kept and not rl_constants & set(stats["heldout_constants"][t.name]), t.name
        assert rl_constants == {r["constant"] for r in rl if r["template"] == t.name}
    assert not any(r["prompt"] in corpus or r["prompt"] in sft for r in rl)
    # more SFT pairs asked for than the corpus has: every corpus problem, none of the RL ones
    assert len(list(read_jsonl(tmp_path / "sft.jsonl"))) == stats["sft"] == len(train) - len(rl)


def test_no_rl_fraction_draws_what_it_drew_before(tmp_path: Path) -> None:
    """rl_fraction 0 writes no problems_rl.jsonl and the problems of the same seed as ever."""
    ctx = StageContext(tmp_path, "problems", logging.getLogger("t"), MetricsWriter(tmp_path / "m"))
    build(
        CodeProblemsConfig(out=tmp_path, train_problems=22, test_problems=22, sft_examples=4), ctx
    )
    assert not (tmp_path / "problems_rl.jsonl").exists()
    assert list(read_jsonl(tmp_path / "problems_train.jsonl")) == problems()[0]


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k) / comb(n, k)


def micro_recipe(folder: Path) -> Path:
    """The built-in code-rl recipe at micro sizes (a list item has no --set key, so the eval
    task's code section is cut down in a copy of the file)."""
    recipe = yaml.safe_load(builtin_recipe("code-rl").read_text())
    stages = recipe["stages"]
    stages["problems"].update(train_problems=40, test_problems=4, sft_examples=8)
    stages["tokenizer"]["vocab_size"] = 300
    stages["pretrain"]["model"] = {"preset": "micro"}
    stages["grpo"]["grpo"].update(
        num_generations=2, rollout_prompts=2, eval_prompts=2, max_new_tokens=8
    )
    stages["eval"]["tasks"][0]["code"].update(n=3, k=[1, 2], max_new_tokens=8)
    for stage in ("pretrain", "sft", "grpo"):
        stages[stage]["train"].update(
            max_steps=2, micro_batch_size=4, seq_len=96, warmup_steps=0, eval_every=2,
            eval_steps=1,
        )  # fmt: skip
    path = folder / "code-rl.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_code_rl_recipe_micro(tmp_path: Path) -> None:
    results = dict(run_recipe(micro_recipe(tmp_path), out=tmp_path / "run"))
    assert list(results) == [
        "problems", "data", "tokenizer", "tokens", "pretrain", "sft", "grpo", "eval",
    ]  # fmt: skip
    run = tmp_path / "run"
    assert len(list(read_jsonl(run / "problems/problems_test.jsonl"))) == 4
    assert len(list(read_jsonl(run / "problems/sft.jsonl"))) == 8
    first = next(iter(read_jsonl(run / "problems/problems_train.jsonl")))
    corpus = next(iter(read_jsonl(run / "problems/corpus.jsonl")))["text"]
    assert corpus == first["prompt"] + sft_pair(first)["output"]  # the prompt, then its answer
    assert (run / "grpo/final").is_dir()
    manifest = json.loads((run / "problems/manifest.json").read_text())
    assert len(manifest["inputs"]["code_problems"]) == 16  # the generator's bytes key the cache
    eval_json = json.loads((run / "eval/eval.json").read_text())
    for model in ("sft", "grpo"):
        result = eval_json["results"][model]["heldout_code"]
        assert result["n"] == 4 and result["samples_per_problem"] == 3
        assert sum(result["status_counts"].values()) == 12
        passed = [p["passed"] for p in result["per_problem"]]
        assert sum(passed) == result["status_counts"]["passed"]
        for k in (1, 2):
            expected = np.mean([unbiased_pass_at_k(3, c, k) for c in passed])
            assert result[f"pass@{k}"] == pytest.approx(expected)
        assert result["pass@1"] <= result["pass@2"]
