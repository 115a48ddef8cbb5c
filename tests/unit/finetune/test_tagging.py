"""Token tagging: word tags on first subwords, entity F1, export as *ForTokenClassification with
transformers' logits, and `finetune --task tag` end to end on a micro encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.finetune import tagging
from lmforge.finetune.formats import load_examples
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.finetune.stage import FinetuneConfig, finetune
from lmforge.model.chunked_loss import IGNORE_INDEX
from lmforge.model.config import preset_config
from lmforge.model.convert import load_classifier, load_pretrained, save_pretrained
from lmforge.model.transformer import Transformer

from .helpers import make_model_dir

CITIES, NAMES = ["Paris", "Rome", "Oslo"], ["Ada", "Alan", "Grace"]


def ner_records(n: int, seed: int = 0) -> list[dict]:
    """Sentences where names and cities are entities the words themselves give away."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        if rng.random() < 0.5:
            rows.append({"tokens": [name, "Lovelace", "lives", "in", city],
                         "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]})  # fmt: skip
        else:
            rows.append({"tokens": ["the", "capital", city, "is", "big"],
                         "tags": ["O", "O", "B-LOC", "O", "O"]})  # fmt: skip
    return rows


def test_words_are_tagged_on_their_first_subword(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    ex = {"tokens": ["Paris", "os.path.join", "x"], "tags": ["B-LOC", "O", "B-PER"]}
    index = {"B-LOC": 0, "B-PER": 1, "O": 2}
    rows, cut = tagging.encode_tagged(tok, [ex], index, seq_len=32)
    pieces = [tok.encode("Paris"), tok.encode(" os.path.join"), tok.encode(" x")]
    assert len(pieces[1]) > 1 and cut == 0
    flat = [i for p in pieces for i in p]
    assert rows["input_ids"][0, : len(flat)].tolist() == flat
    starts = [0, len(pieces[0]), len(pieces[0]) + len(pieces[1])]
    labeled = np.nonzero(rows["tag_labels"][0] != IGNORE_INDEX)[0].tolist()
    assert labeled == starts and rows["tag_labels"][0, starts].tolist() == [0, 2, 1]
    assert rows["last"][0] == len(flat) - 1
    short, cut = tagging.encode_tagged(tok, [ex], index, seq_len=len(pieces[0]) + 1)
    assert cut == 1 and (short["tag_labels"][0] != IGNORE_INDEX).sum() == 1  # whole words only


def test_bad_tagging_records_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(InputError, match=r"t\.jsonl line 1: needs one tag per token, got 2"):
        load_examples(path)


@pytest.mark.parametrize("offset", [0, 2])
def test_token_classifier_matches_transformers(tokenizer_dir, tmp_path, offset):
    transformers = pytest.importorskip("transformers")
    tok = load_chat_tokenizer(tokenizer_dir)
    index = {"B-LOC": 0, "B-PER": 1, "I-PER": 2, "O": 3}
    rows, _ = tagging.encode_tagged(tok, ner_records(3), index, seq_len=24)
    torch.manual_seed(0)
    lm = Transformer(preset_config("bert-micro", vocab_size=tok.vocab_size, pos_offset=offset))
    model = tagging.TokenTagger(lm, 4).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        model.head.bias.normal_()
    ids, last = torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"])
    with torch.no_grad():
        ours = model(ids, last)[0]
    save_pretrained(lm, tmp_path, classifier=model.classifier_head(list(index)))
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    arch = "RobertaForTokenClassification" if offset else "BertForTokenClassification"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    mask = (torch.arange(ids.size(1))[None] <= last[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
    head = load_classifier(tmp_path)
    assert head.per_token and head.labels == list(index) and head.pool_weight is None


def test_finetune_tag_learns_entities_and_exports(tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = make_model_dir(tmp_path / "base", tokenizer_dir, preset="bert-micro")
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ner_records(64)))
    train = {"max_steps": 40, "lr": 3e-3, "micro_batch_size": 8, "seq_len": 24,
             "warmup_steps": 2, "eval_every": 0, "eval_steps": 2, "ckpt_every": 0}  # fmt: skip
    values = {"model": base, "data": data, "out": tmp_path / "out", "task": "tag",
              "train": train, "eval": {"val_fraction": 0.25}}  # fmt: skip
    out = finetune(FinetuneConfig.model_validate(values))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["entity_f1"] >= 0.9 and metrics["token_accuracy"] >= 0.95, metrics
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}
    hf = transformers.AutoModelForTokenClassification.from_pretrained(final).eval()
    tok = load_chat_tokenizer(final)
    ids = torch.tensor([tok.encode("Ada Lovelace lives in Oslo")])
    first = [0, *np.cumsum([len(tok.encode(w)) for w in ["Ada", " Lovelace", " lives", " in"]])]
    with torch.no_grad():
        pred = hf(input_ids=ids).logits.argmax(-1)[0, first].tolist()
    assert pred == [1, 2, 3, 3, 0]  # B-PER I-PER O O B-LOC
    causal = make_model_dir(tmp_path / "causal", tokenizer_dir)
    with pytest.raises(ConfigError, match="--task tag needs an encoder"):
        finetune(FinetuneConfig.model_validate({**values, "model": causal, "out": tmp_path / "c"}))
    assert load_pretrained(final).config.causal is False
