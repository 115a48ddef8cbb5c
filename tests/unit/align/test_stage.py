"""The align stage on a micro model: reward model and DPO (full and LoRA) end to end."""

import json

import pytest
import torch

from lmforge.align.stage import AlignConfig, align
from lmforge.artifacts import read_manifest
from lmforge.errors import InputError

FAST = {"max_steps": 25, "seq_len": 48, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
        "eval_every": 0, "eval_steps": 2, "ckpt_every": 0}  # fmt: skip
WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value", "number", "path"]


def _prefs(path, n=48):
    rows = [{"prompt": f"Say {w} {i}", "chosen": f"The {w} is here.", "rejected": "no no no no"}
            for i, w in enumerate(WORDS * (n // len(WORDS)))]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, model_dir, method, **extra):
    return AlignConfig(
        model=model_dir, data=_prefs(tmp_path / "prefs.jsonl"), out=tmp_path / method,
        method=method, train=FAST, eval={"rouge_examples": 2, "max_new_tokens": 4}, **extra,
    )  # fmt: skip


def test_reward_model_learns_pairs_and_exports_a_one_label_hf_classifier(tmp_path, model_dir):
    transformers = pytest.importorskip("transformers")
    out = align(_cfg(tmp_path, model_dir, "reward"))
    m = read_manifest(out)["metrics"]
    assert m["base_val_pair_accuracy"] <= 0.8 and m["val_pair_accuracy"] == 1.0
    assert m["val_reward_margin"] > 0 and m["steps"] == 25
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["num_labels"] == 1 and config["architectures"][0].endswith(
        "ForSequenceClassification"
    )
    # transformers' reward for a chosen and a rejected conversation ranks them as ours did
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(out / "final"))
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Say beta 1"}, {"role": "assistant", "content": reply}],
            tokenize=False,
        )
        for reply in ("The beta is here.", "no no no no")
    ]
    with torch.no_grad():
        rewards = [hf(**tok(t, return_tensors="pt")).logits.item() for t in texts]
    assert rewards[0] > rewards[1]


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_dpo_raises_the_held_out_log_prob_margin(tmp_path, model_dir, tuning):
    out = align(_cfg(tmp_path, model_dir, "dpo", tuning=tuning, dpo={"beta": 0.5}))
    m = read_manifest(out)["metrics"]
    assert m["val_logp_margin"] > m["ref_logp_margin"] + 1.0
    assert m["val_pref_accuracy"] >= 0.9 and m["val_reward_margin"] > 0
    assert {"rouge_l", "ref_rouge_l"} <= set(m)
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "adapter").is_dir() == (tuning == "lora")
    assert (m["trainable_fraction"] < 0.5) == (tuning == "lora")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "pref_acc", "chosen_reward", "rejected_reward"} <= set(rows[0])


def test_bad_preference_file_fails_before_training(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    cfg = _cfg(tmp_path, model_dir, "dpo").model_copy(update={"data": bad})
    with pytest.raises(InputError, match=r"bad\.jsonl line 2"):
        align(cfg)
    assert not (tmp_path / "dpo" / "manifest.json").exists()
