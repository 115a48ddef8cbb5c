"""LoRA on encoders (classify with sentence pairs, tag): PEFT loads the adapter (head included,
as modules_to_save) on transformers' Bert model and matches our merged export; mean pooling
trains, is refused as a *ForSequenceClassification and keeps its head beside the merged encoder."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.finetune import heads
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.config import preset_config
from lmforge.model.convert import load_classifier, read_config, save_pretrained
from lmforge.model.transformer import Transformer

from .encoder_tokenizers import bert_tokenizer_dir
from .helpers import make_model_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
WORDS = ["alpha", "beta", "gamma", "delta"]
TRAIN = {"max_steps": 12, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 16, "warmup_steps": 2,
         "eval_every": 0, "eval_steps": 1, "ckpt_every": 0}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc-lora")
    return make_model_dir(root / "base", bert_tokenizer_dir(root / "tok"), preset="bert-micro")


def base_width(model_dir) -> int:
    return read_config(model_dir)["hidden_size"]


def _pairs(path, n=32):
    # the label is whether the two texts start with the same word: it needs the pair
    rows = [{"text": f"{WORDS[i % 4]} one", "text_pair": f"{WORDS[(i // 2) % 4]} two",
             "label": "same" if i % 4 == (i // 2) % 4 else "different"} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _peft_model(auto_class, base_dir, adapter_dir, n_labels):
    model = auto_class.from_pretrained(base_dir, num_labels=n_labels)
    return peft.PeftModel.from_pretrained(model, adapter_dir).eval()


def test_lora_pair_classifier_loads_in_peft_with_merged_logits(base, tmp_path):
    values = {"model": base, "data": _pairs(tmp_path / "p.jsonl"), "out": tmp_path / "out",
              "task": "classify", "method": "lora", "train": TRAIN,
              "lora": {"r": 4, "alpha": 8}, "eval": {"val_fraction": 0.25}}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS"
    assert adapter["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    enc = tok(["alpha one", "beta one"], ["alpha two", "gamma two"], return_tensors="pt",
              padding=True)  # fmt: skip
    assert enc["token_type_ids"][0].tolist().count(1) == 3  # "alpha two [SEP]"
    auto = transformers.AutoModelForSequenceClassification
    merged = auto.from_pretrained(out / "final").eval()
    adapted = _peft_model(auto, base, out / "adapter", 2)
    with torch.no_grad():
        want, got = merged(**enc).logits, adapted(**enc).logits
    assert want.abs().max().item() > 1e-3  # the head is really there, not zeros
    assert (want - got).abs().max().item() <= 1e-4


def test_lora_tagger_loads_in_peft_with_merged_logits(base, tmp_path):
    rows = [{"tokens": [WORDS[i % 4], "one", "two"], "tags": ["B-X" if i % 2 else "O", "O", "O"]}
            for i in range(16)]  # fmt: skip
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    values = {"model": base, "data": data, "out": tmp_path / "out", "task": "tag",
              "method": "lora", "train": TRAIN, "eval": {"val_fraction": 0.25}}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == (
        "TOKEN_CLS"
    )
    enc = transformers.AutoTokenizer.from_pretrained(out / "final")(
        ["alpha one two", "beta"], return_tensors="pt", padding=True
    )
    auto = transformers.AutoModelForTokenClassification
    merged = auto.from_pretrained(out / "final").eval()
    adapted = _peft_model(auto, base, out / "adapter", 2)
    with torch.no_grad():
        assert (merged(**enc).logits - adapted(**enc).logits).abs().max().item() <= 1e-4


def test_mean_pooling_trains_masks_padding_and_keeps_its_head_beside_the_encoder(base, tmp_path):
    lm = Transformer(preset_config("bert-micro", vocab_size=64))
    model = heads.SequenceClassifier(lm, 2, pooling="mean").eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        padded = model(ids, torch.tensor([2, 4]))[0]
        alone = model(ids[:1, :3], torch.tensor([2]))[0]
        h = lm.hidden_states(ids[:1, :3])
        by_hand = model.head(h.mean(1))
    assert torch.allclose(padded[0], alone[0], atol=1e-5)
    assert torch.allclose(alone, by_hand, atol=1e-5)
    save_pretrained(lm, tmp_path / "x", classifier=model.classifier_head(["a", "b"]))
    assert load_classifier(tmp_path / "x").pooling == "mean"  # the encoder, its head beside it
    with pytest.raises(ValueError, match="for an encoder"):
        heads.SequenceClassifier(Transformer(preset_config("micro", vocab_size=64)), 2, "mean")
    values = {"model": base, "data": _pairs(tmp_path / "p.jsonl"), "out": tmp_path / "out",
              "task": "classify", "pooling": "mean", "method": "lora", "train": TRAIN}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    # the adapter holds the body's LoRA only; final/ the merged encoder and the head beside it
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not adapter.get("modules_to_save")
    head = load_classifier(out / "final")
    assert (head.pooling, head.labels, head.pool_weight) == ("mean", ["different", "same"], None)
    assert head.weight.shape == (2, base_width(base)) and head.bias.shape == (2,)
