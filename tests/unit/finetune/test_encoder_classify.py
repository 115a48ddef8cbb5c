"""Encoders (BERT/RoBERTa) as sequence classifiers: first-token pooler + biased head, exported as
*ForSequenceClassification with transformers' logits, and through the finetune stage."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.finetune import heads
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.config import preset_config
from lmforge.model.convert import load_classifier, load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer

from .helpers import make_model_dir

transformers = pytest.importorskip("transformers")
TEXTS = ["The capital is Paris.", "x y", "", "def f(x): return x + 1 and more words here"]


def hf_logits(model_dir, rows) -> torch.Tensor:
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids, last = torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=heads.real_tokens(ids, last)).logits


@pytest.mark.parametrize("offset", [0, 2])
def test_encoder_classifier_matches_transformers_and_reloads(tokenizer_dir, tmp_path, offset):
    tok = load_chat_tokenizer(tokenizer_dir)
    rows, _ = heads.encode_texts(tok, TEXTS, [0] * len(TEXTS), seq_len=20)
    torch.manual_seed(0)
    lm = Transformer(preset_config("bert-micro", vocab_size=tok.vocab_size, pos_offset=offset))
    model = heads.SequenceClassifier(lm, 3).eval()
    with torch.no_grad():
        for p in (model.head.weight, model.head.bias, model.pool.weight, model.pool.bias):
            p.normal_(std=0.5)
        ours = model(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"]))[0]
    save_pretrained(lm, tmp_path, classifier=model.classifier_head(["a", "b", "c"]))
    config = json.loads((tmp_path / "config.json").read_text())
    arch = "RobertaForSequenceClassification" if offset else "BertForSequenceClassification"
    assert config["architectures"] == [arch]
    assert (ours - hf_logits(tmp_path, rows)).abs().max().item() <= 1e-4
    # padding is invisible: a row scores the same alone and unpadded
    alone_ids = torch.from_numpy(rows["input_ids"][:1, : rows["last"][0] + 1])
    with torch.no_grad():
        alone = model(alone_ids, torch.tensor([rows["last"][0]]))[0]
    assert torch.allclose(alone[0], ours[0], atol=1e-5)
    # our loader reads the body (no MLM head in a classifier) and the whole head back
    head = load_classifier(tmp_path)
    back = heads.SequenceClassifier(load_pretrained(tmp_path), 3).eval()
    assert not back.lm.config.mlm_head and head.labels == ["a", "b", "c"]
    with torch.no_grad():
        back.head.weight.copy_(head.weight)
        back.head.bias.copy_(head.bias)
        back.pool.weight.copy_(head.pool_weight)
        back.pool.bias.copy_(head.pool_bias)
        again = back(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"]))[0]
    assert torch.allclose(again, ours, atol=1e-5)


def _labeled(path, n=48):
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "three", "four"]
    rows = [{"text": f"{words[i % 4]} {words[(i * 3) % 8]} text", "label": words[i % 4]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_finetune_classify_on_an_encoder_learns_and_exports(tokenizer_dir, tmp_path):
    base = make_model_dir(tmp_path / "base", tokenizer_dir, preset="bert-micro")
    train = {"max_steps": 30, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 16,
             "warmup_steps": 2, "eval_every": 0, "eval_steps": 2, "ckpt_every": 0}  # fmt: skip
    values = {"model": base, "data": _labeled(tmp_path / "c.jsonl"), "out": tmp_path / "out",
              "task": "classify", "train": train, "eval": {"val_fraction": 0.25}}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    # the label is the first word: learnable, well above the 0.25 majority baseline
    assert metrics["accuracy"] >= 0.75, metrics
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    tok = load_chat_tokenizer(final)
    rows, _ = heads.encode_texts(tok, ["alpha one text", "gamma"], [0, 0], seq_len=16)
    head = load_classifier(final)
    ours = heads.SequenceClassifier(load_pretrained(final), len(head.labels)).eval()
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(ours.head, name).copy_(getattr(head, name))
            getattr(ours.pool, name).copy_(getattr(head, f"pool_{name}"))
        mine = ours(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"]))[0]
    assert (mine - hf_logits(final, rows)).abs().max().item() <= 1e-4
    multitask = {**values, "task": "multitask", "out": tmp_path / "mt"}
    with pytest.raises(ConfigError, match="is an encoder"):
        finetune(FinetuneConfig.model_validate(multitask))
