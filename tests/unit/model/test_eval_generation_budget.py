"""The eval stage's own token budget over a decoder checkpoint's max_length (Llama-2-style
generation_configs set it to the whole context; lm-evaluation-harness ignores it), recorded as
ignored in eval.json and in the cache key; and the settings' warnings logged once per run."""

from __future__ import annotations

import json

import pytest

from lmforge.config import config_hash, validate
from lmforge.evals.lm import EvalModel, GenerationSettings

from .test_generation_defaults import PROMPTS, hf_new_ids, peaked, save_hf

transformers = pytest.importorskip("transformers")

TASK = {"name": "g", "type": "generation", "examples": [{"prompt": p, "reference": "b"}
                                                        for p in PROMPTS]}  # fmt: skip


@pytest.fixture
def tok(tmp_path):
    from ..finetune.helpers import make_tokenizer_dir

    return make_tokenizer_dir(tmp_path / "tok")


def llama_with_max_length(tmp_path, tok, max_length: int):
    """A peaked tiny Llama (context 128: room for eval's 64 new tokens) whose
    generation_config sets max_length, as Llama-2's sets its context."""
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    hf = peaked(transformers.LlamaForCausalLM(cfg), 0.2)
    gen = {"bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2, "max_length": max_length}
    save_hf(hf, gen, tmp_path / "llama", tok, in_config_json=False)
    return tmp_path / "llama", hf


def test_eval_keeps_its_budget_over_a_decoders_max_length_and_records_it_ignored(tmp_path, tok):
    from lmforge.evals import evaluate
    from lmforge.evals.stage import EvalConfig

    path, hf = llama_with_max_length(tmp_path, tok, max_length=20)
    evaluating = EvalModel.load(path, checkpoint_max_length=False)  # as the eval stage loads it
    starts = [evaluating.start(p) for p in PROMPTS]
    resolved = evaluating.settings_for(GenerationSettings())
    assert (resolved.max_new_tokens, resolved.length_limit()) == (64, None)
    rows = evaluating.scorer.generate(PROMPTS, resolved, False, 2)
    for ids, row in zip(starts, rows, strict=True):  # transformers with eval's budget
        assert row == hf_new_ids(hf, ids, len(ids), [2], max_new_tokens=64)
    assert max(len(s) + len(r) for s, r in zip(starts, rows, strict=True)) > 20  # not cut
    # the user's own eval max_length still applies, the prompt included
    given = evaluating.settings_for(GenerationSettings(max_length=len(starts[0]) + 3))
    assert len(evaluating.scorer.generate(PROMPTS[:1], given, False, 1)[0]) <= 3
    # `lmforge generate` (EvalModel's default) keeps following the checkpoint, as transformers
    following = EvalModel.load(path).settings_for(GenerationSettings())
    assert following.length_limit() == 20
    cfg = validate(EvalConfig, {"models": [path], "tasks": [TASK], "out": tmp_path / "e"})
    versions = cfg.input_versions()
    ignored = next(v for k, v in versions.items() if k.startswith("generation_ignored:"))
    assert json.loads(ignored) == {"max_length": 20}  # a result that took it is not reused
    assert not any(k.startswith("generation_defaults:") for k in versions)  # none applied
    (result,) = json.loads((evaluate(cfg) / "eval.json").read_text())["results"].values()
    assert result["g"]["generation"]["checkpoint"] == {"used": {}, "ignored": {"max_length": 20}}
    assert result["g"]["generation"]["max_new_tokens"] == 64


def test_a_quickstart_like_eval_config_hashes_as_before():
    """Our own models set no generation keys (their input_versions stay {}: the test of the
    eval cache key); the config's own hash is pinned to its value before eval left a
    checkpoint's max_length out, so a quickstart's cached eval stays valid."""
    from lmforge.evals.stage import EvalConfig

    models = [
        {"name": "base", "path": "runs/pretrain/final"},
        {"name": "sft", "path": "runs/sft/final"},
    ]
    tasks = [
        {"name": "heldout_text", "type": "perplexity", "data": "runs/data", "max_examples": 60},
        {"name": "explain", "type": "generation", "data": "runs/tasks/explain_test.jsonl",
         "max_examples": 120},
    ]  # fmt: skip
    cfg = {"models": models, "tasks": tasks, "generation": {"max_new_tokens": 32},
           "out": "runs/eval"}  # fmt: skip
    assert config_hash(validate(EvalConfig, cfg)) == "b04812a035d9565d"


def test_both_minimums_given_warn_once_per_eval_task(tmp_path, tok, monkeypatch):
    """run_generation resolves its settings once: checkpoint_record reads that resolution."""
    from lmforge.evals import lm
    from lmforge.evals.task_format import TaskSpec
    from lmforge.evals.task_runners import run_generation

    path, _ = llama_with_max_length(tmp_path, tok, max_length=20)
    warnings: list[str] = []
    monkeypatch.setattr(lm.log, "warning", lambda msg, *args: warnings.append(msg % args))
    both = {"min_length": 3, "min_new_tokens": 2, "max_new_tokens": 4}
    spec = validate(TaskSpec, {**TASK, "generation": both})
    result = run_generation(EvalModel.load(path), spec, GenerationSettings())
    assert [w for w in warnings if "min_new_tokens applies alone" in w] == [
        "min_new_tokens (2) and min_length (3) are both set: min_new_tokens applies alone, as in "
        "transformers"
    ]
    generation = result.metrics["generation"]
    assert (generation["min_length"], generation["min_new_tokens"]) == (0, 2)
