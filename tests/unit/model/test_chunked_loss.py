"""The chunked output-layer loss equals F.cross_entropy on the full logits, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import chunked_loss
from lmforge.model.chunked_loss import IGNORE_INDEX, linear_cross_entropy
from lmforge.model.config import preset_config
from lmforge.model.transformer import Transformer, next_token_loss


def _inputs(n: int = 300, c: int = 16, v: int = 50) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, c, generator=g, requires_grad=True)
    w = (torch.randn(v, c, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk_elements", [50 * 64, 1 << 20])  # many chunks (last one short) | one
def test_matches_cross_entropy(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", chunk_elements)
    h, w, labels = _inputs()
    ref = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(3.0 * ref, (h, w))
    ours = linear_cross_entropy(h, w, labels)
    grads = torch.autograd.grad(3.0 * ours, (h, w))  # upstream gradient scales both
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_weight_gets_no_gradient_and_all_ignored_is_nan() -> None:
    h, w, labels = _inputs()
    w = w.detach()
    loss = linear_cross_entropy(h, w, labels)
    (grad_h,) = torch.autograd.grad(loss, (h,))
    assert grad_h.shape == h.shape and w.grad is None
    assert torch.isnan(linear_cross_entropy(h, w, torch.full_like(labels, IGNORE_INDEX)))


def test_transformer_training_loss_and_grads_equal_the_logits_path() -> None:
    """forward(labels=) on CPU takes the chunked path; it must train exactly as the logits path."""
    torch.manual_seed(0)
    model = Transformer(preset_config("micro"))
    idx = torch.randint(0, 256, (3, 40))
    labels = idx.roll(-1, dims=1)
    labels[:, -5:] = IGNORE_INDEX
    assert model._loss_from_hidden(model.hidden_states(idx))
    chunked = model(idx, labels=labels)
    chunked.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = next_token_loss(model(idx), labels)  # logits, then F.cross_entropy
    ref.backward()
    torch.testing.assert_close(chunked, ref, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_autocast_takes_the_ordinary_path() -> None:
    """Under CPU bf16 autocast the logits are bf16: the chunked fp32 path must step aside."""
    model = Transformer(preset_config("micro"))
    idx = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model._loss_from_hidden(model.hidden_states(idx))
        loss = model(idx, labels=idx)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
