"""`lmforge pretrain --objective mlm` on the built-in stdlib-docs corpus at micro size: the
held-out masked-token loss falls clearly, and the export loads as BertForMaskedLM."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.train.pretrain import tokenizer_hash

MASK = "[MASK]"


def make_corpus_shards(root: Path, mask: bool = True) -> tuple[Path, Path]:
    """(tokens_dir, tokenizer_dir) from the first stdlib-docs documents (~300k characters)."""
    from tiny_tokenizers import train_byte_bpe

    from lmforge.data.stdlib_docs import read_stdlib_docs

    texts = [d.text for d in islice(read_stdlib_docs(), 120)]
    specials = ["<|eos|>", "<|pad|>", *([MASK] if mask else [])]
    tok = train_byte_bpe(texts, 512, specials)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    config = {
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        **({"mask_token": MASK} if mask else {}),
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    eos = tok.token_to_id("<|eos|>")
    out = root / "tokens"
    out.mkdir()
    n_val = len(texts) // 8
    for split, docs in (("val", texts[:n_val]), ("train", texts[n_val:])):
        ids = [i for text in docs for i in [*tok.encode(text).ids, eos]]
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": tok.get_vocab_size(),
            "tokenizer_hash": tokenizer_hash(tok_dir)}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    return out, tok_dir


@pytest.mark.integration
def test_mlm_pretraining_lowers_held_out_masked_loss(tmp_path):
    from lmforge.config import load_config
    from lmforge.train.pretrain import PretrainConfig, pretrain

    tokens, tok_dir = make_corpus_shards(tmp_path)
    values = {
        "tokens": str(tokens), "tokenizer": str(tok_dir), "out": str(tmp_path / "mlm"),
        "objective": "mlm", "model": {"preset": "bert-micro"},
        "train": {"max_steps": 60, "seq_len": 64, "micro_batch_size": 16, "lr": 3e-3,
                  "warmup_steps": 5, "eval_every": 30, "eval_steps": 4, "ckpt_every": 0,
                  "device": "cpu"},
    }  # fmt: skip
    out = pretrain(load_config(PretrainConfig, values=values))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["objective"] == "mlm"
    assert metrics["val_loss"] < metrics["initial_val_loss"] - 0.6, metrics  # 6.26 -> 5.37
    assert metrics["val_ppl"] == pytest.approx(np.exp(metrics["val_loss"]), rel=1e-3)

    transformers = pytest.importorskip("transformers")
    from lmforge.model.convert import load_pretrained

    final = out / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(final).eval()
    ids = torch.from_numpy(np.fromfile(tokens / "val.bin", dtype=np.uint16)[:48].astype(np.int64))
    with torch.no_grad():
        ours = load_pretrained(final)(ids[None])
        theirs = hf(ids[None]).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.integration
def test_mlm_without_mask_token_or_with_a_decoder_is_refused(tmp_path):
    from lmforge.config import load_config
    from lmforge.errors import ConfigError, InputError
    from lmforge.train.pretrain import PretrainConfig, pretrain

    tokens, tok_dir = make_corpus_shards(tmp_path, mask=False)
    base = {"tokens": str(tokens), "tokenizer": str(tok_dir), "objective": "mlm",
            "train": {"max_steps": 1, "warmup_steps": 0, "seq_len": 32, "device": "cpu"}}  # fmt: skip
    encoder = {**base, "out": str(tmp_path / "a"), "model": {"preset": "bert-micro"}}
    with pytest.raises(InputError, match=r"has no mask token.*special_tokens\.mask"):
        pretrain(load_config(PretrainConfig, values=encoder))
    decoder = {**base, "out": str(tmp_path / "b"), "model": {"preset": "micro"}}
    with pytest.raises(ConfigError, match="cannot train a causal decoder; use a bert-"):
        pretrain(load_config(PretrainConfig, values=decoder))


@pytest.mark.integration
def test_mlm_val_probability_fixes_the_val_masks_whatever_the_training_rate(tmp_path):
    from lmforge.config import load_config
    from lmforge.train.pretrain import PretrainConfig, pretrain

    tokens, tok_dir = make_corpus_shards(tmp_path)
    base = {"tokens": str(tokens), "tokenizer": str(tok_dir), "objective": "mlm",
            "model": {"preset": "bert-micro"},
            "train": {"max_steps": 1, "warmup_steps": 0, "seq_len": 32, "micro_batch_size": 4,
                      "eval_steps": 2, "ckpt_every": 0, "device": "cpu"}}  # fmt: skip

    def initial_val_loss(name: str, **mask: float) -> float:
        out = pretrain(load_config(PretrainConfig, values={**base, **mask, "out": tmp_path / name}))
        return json.loads((out / "manifest.json").read_text())["metrics"]["initial_val_loss"]

    # the same untrained model (seeded) scores the same val masks, so the same initial loss
    bert_rate = initial_val_loss("a", mlm_probability=0.15)
    fixed = initial_val_loss("b", mlm_probability=0.4, mlm_val_probability=0.15)
    follows_training = initial_val_loss("c", mlm_probability=0.4)
    assert fixed == bert_rate
    assert follows_training != bert_rate


def test_mlm_val_probability_without_mlm_is_refused(tmp_path):
    from lmforge.config import load_config
    from lmforge.errors import ConfigError
    from lmforge.train.pretrain import PretrainConfig

    values = {"tokens": str(tmp_path), "tokenizer": str(tmp_path), "out": str(tmp_path / "o"),
              "mlm_val_probability": 0.15}  # fmt: skip
    with pytest.raises(ConfigError, match=r"objective=clm masks nothing; set objective=mlm"):
        load_config(PretrainConfig, values=values)
    assert load_config(PretrainConfig, values={**values, "objective": "mlm"}).mlm_val_probability
