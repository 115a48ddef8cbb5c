"""The code task: the pass@k estimator, the runner's counts against its samples, the eval stage
end to end (eval.json, errors.jsonl, the report), and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, InputError
from lmforge.evals.code_eval import answer_code, pass_at_k, pass_metrics
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.report import StageInfo
from lmforge.evals.report_eval import eval_section
from lmforge.evals.stage import evaluate
from lmforge.evals.task_format import TaskSpec, load_examples
from lmforge.evals.tasks import infer_type, run_task

# the prompt is already a whole solution ending in a comment; stopping at the end of the line
# keeps any continuation inside that comment, so the first problem passes and the second fails
PROBLEMS = [
    {"prompt": "def add(a, b):\n    return a + b\n# ", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"prompt": "def add(a, b):\n    return a - b\n# ", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5, 'wrong sum'\n"},
]  # fmt: skip
CODE = {"allow_code_execution": True, "n": 3, "k": [2, 5], "stop": ["\n", "\r"],
        "max_new_tokens": 6, "timeout_s": 5}  # fmt: skip


def task(**code: object) -> dict:
    return {"name": "add", "type": "code", "examples": PROBLEMS, "code": {**CODE, **code}}


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(5, 2, 1, 0.4), (5, 2, 2, 0.7), (10, 3, 5, 1 - 21 / 252), (4, 4, 3, 1.0), (6, 0, 2, 0.0),
     (3, 2, 2, 1.0)],
)  # fmt: skip
def test_pass_at_k_hand_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_combinatorial_formula_at_large_n() -> None:
    expected = 1 - math.comb(190, 100) / math.comb(200, 100)
    assert pass_at_k(200, 10, 100) == pytest.approx(expected, rel=1e-12)


def test_pass_at_1_is_the_naive_pass_rate() -> None:
    passed, n = [0, 3, 7, 10], 10
    assert pass_metrics(passed, n, [1])["pass@1"] == pytest.approx(sum(passed) / (n * 4))


def test_k_above_n_is_skipped_with_a_note() -> None:
    out = pass_metrics([1, 2], 3, [1, 2, 10])
    assert set(out) == {"pass@1", "pass@2", "skipped"}
    assert out["skipped"] == (
        "pass@10 not computed: needs at least k samples per problem (code.n=3)"
    )
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)


def test_metrics_follow_the_sampled_programs_statuses(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    result = run_task(model, TaskSpec.model_validate(task()), GenerationSettings())
    m, records = result.metrics, result.records
    assert len(records) == 6 and [r["index"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert all("\n" not in r["completion"] for r in records)
    passed = [sum(r["status"] == "passed" for r in records if r["index"] == i) for i in (0, 1)]
    assert passed[0] >= 1 and passed[1] == 0  # the continuation stays inside the comment
    assert {r["status"] for r in records if r["index"] == 1} <= {"failed", "error"}
    assert any("wrong sum" in r["detail"] for r in records if r["status"] == "failed")
    assert [p["passed"] for p in m["per_problem"]] == passed
    assert m["status_counts"]["passed"] == sum(passed)
    assert sum(m["status_counts"].values()) == 6
    assert m["pass@1"] == pytest.approx(sum(passed) / 6)
    assert m["pass@2"] == pytest.approx(sum(pass_at_k(3, c, 2) for c in passed) / 2)
    assert "pass@5" not in m and "code.n=3" in m["skipped"]
    assert m["generation"]["temperature"] == 0.8 and m["samples_per_problem"] == 3
    assert len({r["completion"] for r in records}) > 2  # sampled, so the rerun checks seeding
    again = run_task(model, TaskSpec.model_validate(task()), GenerationSettings())
    assert [r["completion"] for r in again.records] == [r["completion"] for r in records]
    assert {k: again.metrics[k] for k in ("pass@1", "pass@2")} == {
        "pass@1": m["pass@1"],
        "pass@2": m["pass@2"],
    }


def test_eval_stage_writes_pass_at_k_errors_and_a_comparison(
    model_dir: Path, model_dir_b: Path, tmp_path: Path
) -> None:
    out = evaluate({"models": [str(model_dir), str(model_dir_b)], "tasks": [task()],
                    "out": str(tmp_path / "ev")})  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    assert report["tasks"][0]["main_metric"] == "pass@1"
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    for name, metrics in report["results"].items():
        counts = metrics["add"]["status_counts"]
        failures = [e for e in errors if e["model"] == name]
        assert len(failures) == min(5, 6 - counts["passed"])
        assert all(e["status"] != "passed" and e["detail"] for e in failures)
    blocks = eval_section(StageInfo("ev", "eval", out, {}, tmp_path / "assets"))
    header = blocks[2].table[0]
    assert header[2] == "add: pass@1 ↑" and len(blocks[2].table) == 3  # one row per model
    names = [m["name"] for m in report["models"]]
    assert any(f"programs {names[0]}: " in (b.text or "") for b in blocks)
    assert any(b.table and b.table[0][-1] == "got" for b in blocks)


def test_refused_without_the_opt_in(model_dir: Path, tmp_path: Path) -> None:
    refusal = r"task '(add|code)'.* runs model-written .* set code\.allow_code_execution: true"
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    for item in (task(allow_code_execution=False), str(data)):  # a JSONL file: no code section
        with pytest.raises(ConfigError, match=refusal):
            evaluate({"models": [str(model_dir)], "tasks": [item], "out": str(tmp_path / "ev")})
    assert not (tmp_path / "ev").exists()  # refused before anything ran
    with pytest.raises(
        ConfigError,
        match=r"task 'code' \(no code: section; give it as a task "
        r"YAML \{type: code, data: .*code\.jsonl, code: \{allow_code_execution",
    ):
        evaluate({"models": [str(model_dir)], "tasks": [str(data)], "out": str(tmp_path / "ev")})
    with pytest.raises(ConfigError, match=refusal):  # the runner checks too
        run_task(EvalModel.load(model_dir), TaskSpec(name="add", type="code", examples=PROBLEMS),
                 GenerationSettings())  # fmt: skip


def test_sampling_keys_belong_to_the_code_section(model_dir: Path) -> None:
    spec = TaskSpec.model_validate({**task(), "generation": {"temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"set code\.temperature instead"):
        run_task(EvalModel.load(model_dir), spec, GenerationSettings())
    with pytest.raises(ValueError, match="temperature 0 would repeat"):
        TaskSpec.model_validate(task(temperature=0))


def test_code_records_are_recognised_and_checked() -> None:
    assert infer_type({"prompt", "test", "entry_point", "task_id"}) == "code"
    assert infer_type({"text", "test_list", "test_setup_code"}) == "code"
    # a whole record of another type with a field that happens to be named `tests`
    assert infer_type({"prompt", "reference", "tests"}) == "generation"
    assert infer_type({"text", "label", "test_list"}) == "classification"
    bad = TaskSpec(name="bad", type="code", examples=[{"prompt": "x", "tests": "assert 1"}])
    with pytest.raises(InputError, match="task 'bad' record 1: no tests"):
        load_examples(bad)


def test_checkpoint_generation_defaults_key_and_record_a_code_result(
    model_dir: Path, tmp_path: Path
) -> None:
    """A code task samples through the checkpoint's generation_config.json as a generation
    task does: a changed file changes the cache key, and eval.json says what it applied."""
    from lmforge.evals.stage import EvalConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    cfg = EvalConfig.model_validate({"models": [str(ckpt)], "tasks": [task(n=1, k=None)],
                                     "out": str(tmp_path / "ev")})  # fmt: skip

    def applied() -> dict:
        versions = cfg.input_versions().items()
        return {k: json.loads(v) for k, v in versions if k.startswith("generation_defaults:")}

    before = applied()
    (ckpt / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3}))
    after = applied()
    assert after != before and list(after.values()) == [{"repetition_penalty": 1.3}]
    (result,) = json.loads((evaluate(cfg) / "eval.json").read_text())["results"].values()
    generation = result["add"]["generation"]
    assert generation["checkpoint"]["used"] == {"repetition_penalty": 1.3}
    assert generation["repetition_penalty"] == 1.3 and generation["temperature"] == 0.0


def test_a_chat_answer_is_its_fenced_code_cut_at_the_stops() -> None:
    from lmforge.common.code_exec import run_job
    from lmforge.common.code_problems import HUMANEVAL_STOPS, code_problem

    answer = (
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```\nDone."
    )
    code = answer_code(answer, HUMANEVAL_STOPS, chat=True)
    assert code == "def add(a, b):\n    return a + b\n"
    assert run_job(code_problem(PROBLEMS[0], "p").job(code)).status == "passed"
    # a raw continuation is only cut, never searched for fences
    assert answer_code("    return a + b\n\ndef g():", HUMANEVAL_STOPS, chat=False) == (
        "    return a + b\n"
    )
