"""`lmforge align` / `lmforge preferences` in real processes, and the align-quickstart recipe."""

from __future__ import annotations

import json

import pytest
from unit.finetune.helpers import make_model_dir, make_tokenizer_dir

from integration.test_finetune_cli import lmforge
from lmforge.artifacts import read_manifest
from lmforge.runner import run_recipe

pytestmark = pytest.mark.integration


def test_align_command_reports_a_bad_record_in_one_line(tmp_path):
    model = make_model_dir(tmp_path / "model", make_tokenizer_dir(tmp_path / "tok"))
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "ranked": 3}\n'
    )
    proc = lmforge("align", "--model", str(model), "--data", str(bad), "--out", "rm",
                   "--method", "reward", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "prefs.jsonl line 2: ranked must list at least two" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "rm" / "manifest.json").exists()
    proc = lmforge("align", "--model", str(model), "--data", str(bad), "--out", "x",
                   "--method", "ppo2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "method" in proc.stderr


def test_align_quickstart_recipe_runs_from_quickstart_outputs(tmp_path, monkeypatch):
    """The recipe's inputs are a quickstart's tasks/ and sft/; here a micro model stands in."""
    from lmforge.finetune.builtin_tasks import TasksConfig, make_tasks

    monkeypatch.chdir(tmp_path)
    make_tasks(TasksConfig(out=tmp_path / "runs/quickstart/tasks"))
    make_model_dir(tmp_path / "runs/quickstart/sft/final", make_tokenizer_dir(tmp_path / "tok"))
    overrides = [
        "train.max_steps=3", "train.micro_batch_size=2", "train.seq_len=64",
        "train.warmup_steps=0", "train.eval_every=0", "train.eval_steps=1",
        "dpo.eval.rouge_examples=2", "dpo.eval.max_new_tokens=4",
        "kto.eval.rouge_examples=2", "kto.eval.max_new_tokens=4",
        "ppo.ppo.rollout_prompts=4", "ppo.ppo.max_new_tokens=4", "ppo.ppo.eval_prompts=4",
        "grpo.grpo.max_new_tokens=4", "grpo.grpo.eval_prompts=4",
        "grpo.eval.rouge_examples=2", "grpo.eval.max_new_tokens=4",
        "eval.generation.max_new_tokens=4",
        "eval.tasks=[{name: explain, type: generation, max_examples: 4,"
        " data: runs/quickstart/tasks/explain_test.jsonl}]",
    ]  # fmt: skip
    run_recipe("align-quickstart", out=tmp_path / "run", overrides=overrides)
    prefs = read_manifest(tmp_path / "run/prefs")["metrics"]
    assert prefs["train_pairs"] > 100 and prefs["val_pairs"] > 10
    reward = read_manifest(tmp_path / "run/reward")["metrics"]
    assert 0 <= reward["val_pair_accuracy"] <= 1 and reward["steps"] == 3
    dpo = read_manifest(tmp_path / "run/dpo")["metrics"]
    assert {"val_logp_margin", "ref_logp_margin", "rouge_l", "ref_rouge_l"} <= set(dpo)
    kto = read_manifest(tmp_path / "run/kto")["metrics"]  # the same pairs, unpaired
    assert kto["train_desirable"] == kto["train_undesirable"] > 100 and kto["steps"] == 3
    assert {"val_reward_auc", "val_pair_accuracy", "val_logp_margin", "rouge_l"} <= set(kto)
    ppo = read_manifest(tmp_path / "run/ppo")["metrics"]
    assert {"val_reward", "val_reward_before", "val_kl"} <= set(ppo) and ppo["steps"] == 3
    assert (tmp_path / "run/ppo/adapter").is_dir()
    grpo = read_manifest(tmp_path / "run/grpo")["metrics"]
    assert {"val_reward_rouge_l", "val_reward_before", "rouge_l", "ref_rouge_l"} <= set(grpo)
    assert grpo["steps"] == 3 and (tmp_path / "run/grpo/adapter").is_dir()
    results = json.loads((tmp_path / "run/eval/eval.json").read_text())["results"]
    assert set(results) == {"sft", "dpo", "ppo", "grpo"}
