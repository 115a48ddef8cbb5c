"""Issue 7's "done when", measured on the built-in stdlib tasks with the tiny preset (slow: minutes).

Pretrains a tiny base on the docstrings of the explain task's *train* modules only (so held-out
answers were never seen), then: full SFT and LoRA SFT on explain pairs, scored by ROUGE-L on the
held-out modules against the base model, and a classifier on docstring -> module family against
the majority baseline. Run with: pytest -m slow tests/integration/test_finetune_quality.py
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from unit.finetune.helpers import CHATML, SPECIALS

from lmforge.artifacts import StageContext
from lmforge.common.logging import MetricsWriter
from lmforge.finetune.builtin_tasks import TasksConfig, make_tasks, split_of, stdlib_functions
from lmforge.finetune.stage import FinetuneConfig, finetune

pytestmark = pytest.mark.slow
SFT_TRAIN = {"seq_len": 128, "micro_batch_size": 8, "warmup_steps": 10, "eval_every": 0,
             "ckpt_every": 0, "eval_steps": 10, "max_steps": 150}  # fmt: skip


def _pretrained_base(root, tasks_cfg):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.train.config import TrainConfig
    from lmforge.train.loader import RowBatches, pack_documents
    from lmforge.train.loop import train
    from lmforge.train.pretrain import lm_loss

    docs = [f"{f.qualname}{f.signature}\n{f.docstring}" for f in stdlib_functions()
            if split_of(f.module, tasks_cfg) == "train"]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(docs, trainer)
    eos = tok.token_to_id("<|im_end|>")
    rows, _ = pack_documents([[*tok.encode(d).ids, eos] for d in docs], 256)
    torch.manual_seed(0)
    model = Transformer(preset_config("tiny", vocab_size=tok.get_vocab_size()))
    tc = TrainConfig(max_steps=300, lr=3e-3, micro_batch_size=16, seq_len=256, warmup_steps=20,
                     eval_every=0, ckpt_every=0)  # fmt: skip
    out = root / "pretrain"
    ctx = StageContext(out, "pretrain", logging.getLogger("t"), MetricsWriter(out / "m.jsonl"))
    result = train(model, lm_loss, RowBatches(rows, 16, seed=0), tc, ctx, resume=False)
    base = root / "base"
    save_pretrained(result.model, base, extra_config={"eos_token_id": eos})
    tok.save(str(base / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return base


def _run(root, base, tasks, name, data, **spec):
    cfg = FinetuneConfig.model_validate({
        "model": base, "data": tasks / f"{data}_train.jsonl", "val_data": tasks / f"{data}_val.jsonl",
        "out": root / name, "eval": {"rouge_examples": 48, "compare_base": True}, **spec,
    })  # fmt: skip
    return json.loads((finetune(cfg) / "manifest.json").read_text())["metrics"]


def test_sft_lora_and_classifier_meet_the_bar(tmp_path):
    tasks_cfg = TasksConfig(out=tmp_path / "tasks")
    tasks = make_tasks(tasks_cfg)
    base = _pretrained_base(tmp_path, tasks_cfg)
    full = _run(tmp_path, base, tasks, "full", "explain", train={**SFT_TRAIN, "lr": 1e-3})
    lora = _run(tmp_path, base, tasks, "lora", "explain", method="lora",
                lora={"r": 6, "alpha": 24}, train={**SFT_TRAIN, "lr": 5e-3, "weight_decay": 0.0})  # fmt: skip
    clf = _run(tmp_path, base, tasks, "clf", "classify", task="classify",
               freeze={"head_lr": 3e-3}, train={**SFT_TRAIN, "lr": 1e-3})  # fmt: skip
    assert full["rouge_l"] > full["base_rouge_l"] and lora["rouge_l"] > full["base_rouge_l"]
    assert lora["trainable_fraction"] < 0.05
    # gain in held-out loss (measured: LoRA ~113% of full's); in ROUGE-L it was ~78% at this size
    gain_full = full["base_val_loss"] - full["val_loss"]
    assert lora["base_val_loss"] - lora["val_loss"] >= 0.9 * gain_full
    assert clf["macro_f1"] > clf["majority_macro_f1"]
