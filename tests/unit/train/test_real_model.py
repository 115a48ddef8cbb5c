"""The loop and the pretraining loss with lmforge's own Transformer (micro preset)."""

from __future__ import annotations

import torch

from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer
from lmforge.train.config import TrainConfig
from lmforge.train.loader import RowBatches, TokenWindows, pack_documents
from lmforge.train.loop import train
from lmforge.train.pretrain import lm_loss

from .helpers import bigram_tokens, make_ctx


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset_config("micro", vocab_size=32, n_layer=1))


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    tokens = bigram_tokens(4000)
    results = {}
    for flag in (False, True):
        cfg = TrainConfig(max_steps=3, micro_batch_size=4, seq_len=16, warmup_steps=0, eval_every=0,
                          ckpt_every=0, device="cpu", activation_checkpointing=flag)  # fmt: skip
        loader = TokenWindows(tokens, 16, 4, seed=0)
        results[flag] = train(_model(), lm_loss, loader, cfg, make_ctx(tmp_path / str(flag)))
    assert results[True].model.gradient_checkpointing
    for a, b in zip(
        results[False].state_dict.values(), results[True].state_dict.values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6)


def test_compiled_training_matches_eager(tmp_path):
    """train.compile=true (loss inside the compiled forward) trains like eager, within fp noise."""
    tokens = bigram_tokens(4000)
    results = {}
    for flag in (False, True):
        cfg = TrainConfig(max_steps=4, micro_batch_size=4, seq_len=16, warmup_steps=0, eval_every=0,
                          ckpt_every=0, device="cpu", lr=1e-2, compile=flag)  # fmt: skip
        loader = TokenWindows(tokens, 16, 4, seed=0)
        results[flag] = train(_model(), lm_loss, loader, cfg, make_ctx(tmp_path / str(flag)))
    assert abs(results[True].train_loss - results[False].train_loss) < 1e-4
    for a, b in zip(
        results[False].state_dict.values(), results[True].state_dict.values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-4)


def test_packed_rows_train_with_document_masking(tmp_path):
    docs = [[(i + j) % 32 for j in range(3 + i % 7)] for i in range(60)]
    rows, _ = pack_documents(docs, seq_len=16)
    batch = {k: torch.from_numpy(v[:2]) for k, v in rows.items()}
    model = _model()
    loss, _ = lm_loss(model, batch)
    # the same loss as scoring each document of the first row on its own
    first = batch["doc_ids"][0]
    total, count = 0.0, 0
    for d in first.unique():
        if d < 0:
            continue
        ids = batch["input_ids"][0][first == d][None]
        labels = batch["labels"][0][first == d][None]
        doc_loss, _ = lm_loss(model, {"input_ids": ids, "labels": labels})
        n = int((labels != -100).sum())
        if n:
            total, count = total + doc_loss.item() * n, count + n
    row0, _ = lm_loss(model, {k: v[:1] for k, v in batch.items()})
    assert abs(row0.item() - total / count) < 1e-5
    assert torch.isfinite(loss)

    cfg = TrainConfig(max_steps=5, micro_batch_size=4, seq_len=16, warmup_steps=0, eval_every=0,
                      ckpt_every=0, device="cpu", lr=1e-2)  # fmt: skip
    result = train(model, lm_loss, RowBatches(rows, 4, seed=0), cfg, make_ctx(tmp_path))
    assert result.step == 5 and result.train_loss < loss.item()
