"""Classification head: last-token pooling, losses, and metrics checked against scikit-learn."""

import numpy as np
import pytest
import torch

from lmforge.finetune.heads import (
    SequenceClassifier,
    classification_metrics,
    classify_loss,
    encode_texts,
    make_multitask_loss,
)
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer


def _clf(n_classes=3):
    torch.manual_seed(0)
    return SequenceClassifier(Transformer(preset_config("micro", vocab_size=300)), n_classes).eval()


def test_pooling_reads_the_last_real_token_so_padding_does_not_matter(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    rows12, _ = encode_texts(tok, ["The capital is Paris."], [1], seq_len=12)
    rows32, _ = encode_texts(tok, ["The capital is Paris."], [1], seq_len=32)
    model = _clf()
    a = model(torch.from_numpy(rows12["input_ids"]), torch.from_numpy(rows12["last"]))[0]
    b = model(torch.from_numpy(rows32["input_ids"]), torch.from_numpy(rows32["last"]))[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert rows12["last"][0] == (rows12["input_ids"][0] != tok.pad_id).sum() - 1


def test_losses_and_multitask_weights(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    rows, truncated = encode_texts(tok, ["os.path.join joins paths", "x" * 50], [0, 2], seq_len=16)
    assert truncated == 1
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    model = _clf()
    cls, _ = classify_loss(model, batch)
    assert cls.item() == pytest.approx(np.log(3), abs=0.05)  # untrained head: near uniform
    mt, parts = make_multitask_loss(0.5, 2.0)(model, batch)
    assert mt.item() == pytest.approx(0.5 * parts["lm_loss"] + 2.0 * parts["cls_loss"], rel=1e-5)
    mt.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.lm.tok_emb.weight.grad is not None


def test_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 4, 200))
    m = classification_metrics(y.tolist(), p.tolist(), 4)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-4)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"), abs=1e-4)
    assert m["precision"] == pytest.approx(skm.precision_score(y, p, average="macro"), abs=1e-4)
    assert m["recall"] == pytest.approx(skm.recall_score(y, p, average="macro"), abs=1e-4)
    maj = np.full_like(y, np.bincount(y).argmax())
    assert m["majority_macro_f1"] == pytest.approx(
        skm.f1_score(y, maj, average="macro", zero_division=0), abs=1e-4
    )
