"""Next-token cross-entropy straight from hidden states, a chunk of tokens at a time.

`F.cross_entropy(h @ W.T)` keeps the (N, V) fp32 logits for backward and walks them several times
(log-softmax, a zero-filled gradient, the log-softmax backward). Here each chunk's logits are
made, turned into its loss and, while still in cache, into its own gradient (softmax minus
one-hot), which goes through both backward matmuls at once. Backward only scales the stored
gradients. The CPU training step of the quickstart's model runs about 10% faster (most of its
time is the 4096-way output layer), and no more than one chunk of logits is ever held.

Used by Transformer.forward(labels=) when training on CPU with a plain lm_head; on GPU the
compiled graph fuses the ordinary path instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 20  # logits per chunk: 4 MB of fp32, a cache-sized working set


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ W.T, labels) over labels != IGNORE_INDEX; gradients made in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        n, vocab = h.size(0), weight.size(0)
        rows = max(64, CHUNK_ELEMENTS // vocab)
        valid = labels != IGNORE_INDEX
        scale = 1.0 / valid.sum().to(h.dtype)  # NaN loss when nothing is valid, as F.cross_entropy
        targets = labels.masked_fill(~valid, 0)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = h.new_zeros(())
        for start in range(0, n, rows):
            hc, tc, vc = (
                h[start : start + rows],
                targets[start : start + rows],
                valid[start : start + rows],
            )
            z = hc @ weight.t()  # (rows, V) logits
            lse = torch.logsumexp(z, dim=1)
            picked = z.gather(1, tc[:, None]).squeeze(1)
            total += ((lse - picked) * vc).sum()
            z.sub_(lse[:, None]).exp_()  # softmax
            z[torch.arange(len(tc), device=z.device), tc] -= 1.0
            z.mul_((vc * scale)[:, None])  # d(mean loss)/d logits; ignored rows become 0
            if grad_h is not None:
                torch.mm(z, weight, out=grad_h[start : start + rows])
            if grad_w is not None:
                grad_w.addmm_(z.t(), hc)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None
        grad_w = saved.pop(0) * grad_out if ctx.has[1] else None
        return grad_h, grad_w, None


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token loss of logits h @ weight.T against labels, IGNORE_INDEX skipped.

    h: (..., C) fp32 hidden states; weight: (V, C) the output layer; labels: (...) target ids.
    Equal to F.cross_entropy(h @ weight.T, labels, ignore_index=-100) and its gradients, in fp32.
    """
    return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, labels.flatten())
