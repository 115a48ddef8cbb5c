"""Classification head: last-token pooling (as transformers pools), losses, metrics vs sklearn."""

import numpy as np
import pytest
import torch

from lmforge.finetune.heads import (
    SequenceClassifier,
    classification_metrics,
    classify_loss,
    encode_texts,
    make_multitask_loss,
    mean_pool,
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


@pytest.mark.parametrize("preset", ["micro", "micro-gpt2"])
def test_logits_match_transformers_sequence_classification(preset, tokenizer_dir, tmp_path):
    """Right-padded rows, texts holding or ending in the pad token, an empty text: same logits."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.convert import ClassifierHead, save_pretrained

    tok = load_chat_tokenizer(tokenizer_dir)
    texts = ["The capital is Paris.", "x<|pad|>y", "os.path.join<|pad|>", "", "def f(x): return x"]
    rows, _ = encode_texts(tok, texts, [0] * len(texts), seq_len=24)
    assert rows["last"][2] == len(tok.encode("os.path.join")) - 1 and rows["last"][3] == 0
    torch.manual_seed(0)
    model = SequenceClassifier(Transformer(preset_config(preset, vocab_size=tok.vocab_size)), 3)
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
        ours = model.eval()(torch.from_numpy(rows["input_ids"]), torch.from_numpy(rows["last"]))[0]
    head = ClassifierHead(model.head.weight, ["a", "b", "c"])
    save_pretrained(model.lm, tmp_path, extra_config={"pad_token_id": tok.pad_id}, classifier=head)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.from_numpy(rows["input_ids"])
    mask = torch.zeros_like(ids)  # as a tokenizer returns it: 1 on every text token
    for r, text in enumerate(texts):
        mask[r, : max(1, len(tok.encode(text)))] = 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_losses_and_multitask_weights(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    rows, truncated = encode_texts(tok, ["os.path.join joins paths", "x" * 50], [0, 2], seq_len=16)
    assert truncated == 1
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    model = _clf()
    cls, _ = classify_loss(model, batch)
    # untrained head (std init_std): logits within a few tenths of 0, so near log(3) per seed
    assert cls.item() == pytest.approx(np.log(3), abs=0.3)
    mt, parts = make_multitask_loss(0.5, 2.0)(model, batch)
    expected = 0.5 * parts["lm_loss"].item() + 2.0 * parts["cls_loss"].item()
    assert mt.item() == pytest.approx(expected, rel=1e-5)
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


def test_pooled_index_is_the_rightmost_non_pad_token():
    from lmforge.finetune.heads import pooled_index

    assert pooled_index([5, 6, 7], pad_id=0) == 2
    assert pooled_index([5, 6, 0, 0], pad_id=0) == 1
    assert (
        pooled_index([5, 0, 6, 0], pad_id=0) == 2
    )  # a pad inside the text is skipped only at the end
    assert pooled_index([0, 0], pad_id=0) == 0


def test_mean_pool_averages_the_marked_states_and_an_unmarked_row_gives_zeros():
    h = torch.tensor(
        [[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert mean_pool(h, mask).tolist() == [[2.0, 4.0], [0.0, 0.0]]  # no NaN in an ONNX graph
