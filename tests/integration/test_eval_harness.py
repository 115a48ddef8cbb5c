"""lm-evaluation-harness runs on our models through the "lmforge" adapter, on local tasks.

The tasks are YAML files over local JSONL data written here (nothing is downloaded); the
harness's numbers must equal our own runners' on the same data, since both score the same
requests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from unit.evals.helpers import CORPUS, make_model_dir

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm_eval not installed: pip install 'lmforge[eval]'"
)

MC = [
    {"query": "def add(a, b):\n    return", "choices": ["a + b", "the lazy dog"], "gold": 0},
    {"query": "The quick brown fox jumps over the", "choices": ["lazy dog.", "a + b"], "gold": 0},
    {"query": "import os\nprint(", "choices": ["os.getcwd())", "immutable sequences"], "gold": 1},
]

TASKS = """
task: lmforge_local_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {mc}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
---
task: lmforge_local_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {text}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: bits_per_byte}}]
---
task: lmforge_local_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {gen}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 6}}
metric_list: [{{metric: exact_match}}]
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness")
    files = {
        "mc": [json.dumps(r) for r in MC],
        "text": [json.dumps({"text": t}) for t in CORPUS[:4]],
        "gen": [json.dumps({"prompt": t[:15], "reference": t[15:]}) for t in CORPUS[:2]],
    }
    paths = {}
    for name, lines in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    for i, body in enumerate(TASKS.format(**paths).split("---")):
        (tasks / f"task_{i}.yaml").write_text(body)
    return {"root": root, "tasks": tasks, "model": make_model_dir(root / "model"), **paths}


def test_harness_scores_equal_our_runners(local: dict[str, Path]) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import lmforge.evals.harness  # noqa: F401  (registers "lmforge")
    from lmforge.evals.lm import EvalModel, GenerationSettings
    from lmforge.evals.perplexity import perplexity
    from lmforge.evals.tasks import TaskSpec, run_task

    out = simple_evaluate(
        model="lmforge",
        model_args=f"pretrained={local['model']}",
        tasks=["lmforge_local_mc", "lmforge_local_ppl", "lmforge_local_gen"],
        task_manager=TaskManager(include_path=str(local["tasks"]), include_defaults=False),
        log_samples=True,
    )
    res = out["results"]
    ours = EvalModel.load(local["model"])
    mc = run_task(
        ours, TaskSpec(name="mc", type="multiple_choice", data=local["mc"]), GenerationSettings()
    )
    assert res["lmforge_local_mc"]["acc,none"] == pytest.approx(mc.metrics["acc"])
    assert res["lmforge_local_mc"]["acc_norm,none"] == pytest.approx(mc.metrics["acc_norm"])
    ppl = perplexity(ours, CORPUS[:4], stride=ours.block_size).metrics()
    assert res["lmforge_local_ppl"]["bits_per_byte,none"] == pytest.approx(
        ppl["bits_per_byte"], rel=1e-5
    )
    assert not math.isnan(res["lmforge_local_gen"]["exact_match,none"])
    sample = out["samples"]["lmforge_local_gen"][0]
    settings = GenerationSettings(max_new_tokens=6, stop=["\n\n"])
    assert sample["resps"][0][0] == ours.generate(CORPUS[0][:15], settings)


@pytest.mark.slow  # ~25 s: lm_eval's command line indexes all its built-in tasks first
def test_harness_command_line_knows_lmforge(local: dict[str, Path]) -> None:
    cmd = [
        sys.executable, "-m", "lmforge.evals.harness", "--model", "lmforge",
        "--model_args", f"pretrained={local['model']}", "--tasks", "lmforge_local_mc",
        "--include_path", str(local["tasks"]), "--output_path", str(local["root"] / "out"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=local["root"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "lmforge_local_mc" in res.stdout and "acc_norm" in res.stdout
    assert list((local["root"] / "out").rglob("results_*.json"))
