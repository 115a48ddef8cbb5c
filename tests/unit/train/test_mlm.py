"""MLM masking: the share chosen, the 80/10/10 split, specials never touched, seeded val masks."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.chunked_loss import IGNORE_INDEX
from lmforge.train.mlm import MaskSpec, make_mlm_loss, mask_tokens, masked_val_batch

SPEC = MaskSpec(mask_id=3, special_ids=(0, 1, 2, 3), vocab_size=50, probability=0.15)


def test_masking_proportions_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50, (64, 256), generator=g)
    ids[:, ::10] = 0  # document separators
    ids[:, -5:] = 1  # padding
    corrupted, labels = mask_tokens(ids, SPEC, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    special = (ids == 0) | (ids == 1)
    assert not chosen[special].any() and torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    share = chosen.sum().item() / (~special).sum().item()
    assert abs(share - 0.15) < 0.01
    n = chosen.sum().item()
    as_mask = (corrupted[chosen] == 3).sum().item() / n
    kept = (corrupted[chosen] == ids[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # (a random id may equal itself)
    assert not ((corrupted <= 3) & (corrupted != 3) & ~special).any()  # random ids are ordinary
    assert torch.equal(corrupted[~chosen], ids[~chosen])


def test_val_masks_repeat_and_train_masks_change():
    ids = torch.randint(4, 50, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    a, b = masked_val_batch(batch, SPEC, seed=7), masked_val_batch(batch, SPEC, seed=7)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
        a["mlm_labels"], b["mlm_labels"]
    )

    seen = []

    def fake_model(x, doc_ids=None, labels=None):
        seen.append(labels)
        return (labels != IGNORE_INDEX).float().mean()

    loss_fn = make_mlm_loss(SPEC)
    loss_fn(fake_model, batch)
    loss_fn(fake_model, batch)
    assert not torch.equal(seen[0], seen[1])  # fresh masks every training step
    _, metrics = loss_fn(fake_model, a)
    assert torch.equal(seen[-1], a["mlm_labels"])  # a masked val batch is used as it is
    assert metrics["masked_tokens"] == (a["mlm_labels"] != IGNORE_INDEX).sum()


def test_windows_open_with_the_templates_cls_which_is_never_masked():
    spec = MaskSpec(mask_id=3, special_ids=(0, 1, 2, 3), vocab_size=50, start_ids=(2,))
    ids = torch.randint(4, 50, (32, 16), generator=torch.Generator().manual_seed(0))
    corrupted, labels = mask_tokens(ids, spec, torch.Generator().manual_seed(1))
    assert (corrupted[:, 0] == 2).all() and (labels[:, 0] == IGNORE_INDEX).all()
    assert (ids[:, 0] != 2).all()  # the caller's batch is left as it was
    chosen = labels != IGNORE_INDEX
    assert chosen[:, 1:].any() and torch.equal(labels[chosen], ids[chosen])


def test_val_masks_are_pinned_on_cpu():
    """The seeded val masks on CPU are the ones earlier runs scored (val_loss stays comparable)."""
    ids = torch.randint(4, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    out = masked_val_batch({"input_ids": ids}, SPEC, seed=7)
    expected = ids.clone()
    expected[1, [1, 3, 13]] = torch.tensor([3, 23, 3])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[1, [1, 3, 13]] = torch.tensor([42, 13, 6])
    assert torch.equal(out["input_ids"], expected) and torch.equal(out["mlm_labels"], labels)


@pytest.mark.gpu
def test_val_masks_do_not_depend_on_the_batch_device():
    """CPU and CUDA runs with one seed score the same masked tokens (same val_loss)."""
    ids = torch.randint(4, 50, (4, 64), generator=torch.Generator().manual_seed(0))
    on_cpu = masked_val_batch({"input_ids": ids}, SPEC, seed=7)
    on_gpu = masked_val_batch({"input_ids": ids.cuda()}, SPEC, seed=7)
    assert on_gpu["input_ids"].is_cuda and on_gpu["mlm_labels"].is_cuda
    assert torch.equal(on_gpu["input_ids"].cpu(), on_cpu["input_ids"])
    assert torch.equal(on_gpu["mlm_labels"].cpu(), on_cpu["mlm_labels"])
