"""GRPO's advantages and loss against hand-computed values of TRL's formulas."""

import math

import pytest
import torch

from lmforge.align.losses import group_advantages, grpo_loss

# two answers of unequal length (2 and 3 tokens), one advantage each; ratios exp(logp - old)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
LOGPS = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]])
OLD = torch.tensor([[-1.0, -2.5, 0.0], [-0.2, -1.0, -1.0]])
REF = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -0.5, -2.0]])
ADV = torch.tensor([1.0, -2.0])


def _per_token(beta=0.0):
    """-min(r A, clip(r, 0.8, 1.28) A) + beta * k3, token by token, in plain Python."""
    rows = []
    rows_in = (LOGPS.tolist(), OLD.tolist(), REF.tolist(), ADV.tolist(), (2, 3))
    for logps, old, ref, adv, n in zip(*rows_in, strict=True):
        row = []
        for t in range(n):
            r = math.exp(logps[t] - old[t])
            loss = -min(r * adv, min(max(r, 0.8), 1.28) * adv)
            d = ref[t] - logps[t]
            row.append(loss + beta * (math.exp(d) - d - 1))
        rows.append(row)
    return rows


def test_per_token_values_by_hand():
    # row 0: ratio 1 -> -1; ratio e^0.5 = 1.65 clipped to 1.28 -> -1.28 (clip-higher bound)
    # row 1 (A = -2): ratio e^-0.3 = 0.74 clipped to 0.8 -> 1.6; ratio 1 -> 2; e^-0.5 -> 1.6
    assert _per_token() == [pytest.approx([-1.0, -1.28]), pytest.approx([1.6, 2.0, 1.6])]


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_each_loss_type_normalises_as_trl(beta):
    rows = _per_token(beta)
    expected = {
        "grpo": sum(sum(r) / len(r) for r in rows) / 2,  # per answer, then over answers
        "bnpo": sum(map(sum, rows)) / 5,  # over every token of the batch
        "dr_grpo": sum(map(sum, rows)) / (2 * 4),  # B * max_completion_length
    }
    for loss_type, value in expected.items():
        loss, stats = grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, 0.28, loss_type, REF, beta, 4)
        assert float(loss) == pytest.approx(value, abs=1e-6), loss_type
        assert float(stats["clip_low"]) == pytest.approx(2 / 5)
        assert float(stats["clip_high"]) == pytest.approx(1 / 5)
    if beta:  # the k3 KL is >= 0 and 0 only where policy and reference agree
        kl = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 0.0, 0.5, -0.5)]
        assert float(stats["kl"]) == pytest.approx(sum(kl) / 5, abs=1e-6)
    assert grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, 0.28)[0] == pytest.approx(
        sum(sum(r) / len(r) for r in _per_token()) / 2
    )


def test_clipped_tokens_get_no_gradient_and_a_ratio_of_one_is_plain_policy_gradient():
    logps = LOGPS.clone().requires_grad_(True)
    grpo_loss(logps, OLD, ADV, MASK, 0.2, 0.28, "bnpo")[0].backward()
    grad = logps.grad
    assert grad[0, 1] == 0 and grad[1, 0] == 0 and grad[1, 2] == 0  # clipped
    assert float(grad[0, 0]) == pytest.approx(-1.0 / 5) and float(grad[1, 1]) == pytest.approx(
        2 / 5
    )
    assert grad[0, 2] == 0  # padding


def test_loss_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, 0.2, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, 0.2, "dr_grpo")
    with pytest.raises(ValueError, match="grpo \\| bnpo \\| dr_grpo"):
        grpo_loss(LOGPS, OLD, ADV, MASK, 0.2, 0.2, "dapo")


def test_group_advantages_scale_by_group_batch_or_not_at_all():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    centred = [-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]
    group_std = math.sqrt(sum(x * x for x in centred[:4]) / 3)  # unbiased, as torch.std
    adv, zero_std = group_advantages(rewards, 4, "group")
    assert adv.tolist() == pytest.approx([c / (group_std + 1e-4) for c in centred[:4]] + [0.0] * 4)
    assert zero_std.tolist() == [False, True]  # the all-5 group carries no signal
    batch_std = float(rewards.std())
    adv, zero_std = group_advantages(rewards, 4, "batch")
    assert adv.tolist() == pytest.approx([c / (batch_std + 1e-4) for c in centred])
    assert zero_std.tolist() == [False, True]  # still per group: the batch std is not 0
    adv, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: centred only
    assert adv.tolist() == pytest.approx(centred)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)
