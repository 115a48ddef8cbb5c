"""Alignment losses against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from lmforge.align.losses import bradley_terry_loss, dpo_loss, kto_loss, sequence_logps

LOG2 = math.log(2.0)
SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.3132617


def test_bradley_terry_is_mean_negative_log_sigmoid_of_the_margin():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((SOFTPLUS_M1 + LOG2) / 2, abs=1e-6)
    # a large wrong-way margin costs about the margin itself
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([20.0])).item() == pytest.approx(
        20.0, abs=1e-6
    )


def _pairs():
    # pair 0: policy moved chosen +1 and rejected -1 from the reference; pair 1: not moved
    return (
        torch.tensor([-1.0, -4.0]),  # policy chosen
        torch.tensor([-3.0, -5.0]),  # policy rejected
        torch.tensor([-2.0, -4.0]),  # reference chosen
        torch.tensor([-2.0, -5.0]),  # reference rejected
    )


def test_dpo_sigmoid_loss_and_implicit_rewards():
    loss, chosen_r, rejected_r = dpo_loss(*_pairs(), beta=0.5)
    # pair 0: beta * ((1) - (-1)) = 1 -> -log sigmoid(1); pair 1: margin 0 -> log 2
    assert loss.item() == pytest.approx((SOFTPLUS_M1 + LOG2) / 2, abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5, 0.0])
    assert rejected_r.tolist() == pytest.approx([-0.5, 0.0])


def test_ipo_regresses_the_per_token_log_ratio_margin_to_one_over_two_beta():
    ones = torch.ones(2, 2)
    loss, _, _ = dpo_loss(*_pairs(), beta=0.5, kind="ipo", lengths=ones)
    # target 1 / (2 * 0.5) = 1: pair 0 has margin 2 -> (2 - 1)^2 = 1, pair 1 margin 0 -> 1
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    loss, _, _ = dpo_loss(*_pairs(), beta=0.25, kind="ipo", lengths=ones)  # target 2: 0 and 4
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    # TRL's DPOTrainer ipo: each log-ratio over its reply's token count before the margin; pair
    # 0's chosen reply has 2 tokens and its rejected 4: 1 / 2 - (-1 / 4) = 0.75 -> (0.75 - 1)^2
    lengths = torch.tensor([[2, 4], [1, 1]])
    loss, chosen_r, _ = dpo_loss(*_pairs(), beta=0.5, kind="ipo", lengths=lengths)
    assert loss.item() == pytest.approx((0.25**2 + 1.0) / 2, abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.5, 0.0])  # rewards stay summed, as TRL's
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(*_pairs(), beta=0.5, kind="ipo")


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr, rc, rr = (t.clone().requires_grad_(i < 2) for i, t in enumerate(_pairs()))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dpc of -log sigmoid(beta*h)/2 = -beta * sigmoid(-beta*h) / 2; pair 1: h = 0
    assert pc.grad[1].item() == pytest.approx(-0.5 * 0.5 / 2, abs=1e-6)


def test_unknown_dpo_kind_is_refused():
    with pytest.raises(ValueError, match="sigmoid \\| hinge \\| ipo"):
        dpo_loss(*_pairs(), beta=0.1, kind="robust")
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid loss"):
        dpo_loss(*_pairs(), beta=0.1, kind="ipo", lengths=torch.ones(2, 2), label_smoothing=0.1)


def test_hinge_is_relu_of_one_minus_the_reward_margin():
    # reward margins beta * h: pair 0 h = 2, pair 1 h = 0
    loss, chosen_r, _ = dpo_loss(*_pairs(), beta=0.25, kind="hinge")  # relu(0.5), relu(1)
    assert loss.item() == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)
    assert chosen_r.tolist() == pytest.approx([0.25, 0.0])
    loss, _, _ = dpo_loss(*_pairs(), beta=1.0, kind="hinge")  # pair 0 past the margin: 0
    assert loss.item() == pytest.approx((0.0 + 1.0) / 2, abs=1e-6)


def test_label_smoothing_is_conservative_dpo_and_settles_the_margin():
    eps = 0.1
    loss, _, _ = dpo_loss(*_pairs(), beta=0.5, label_smoothing=eps)
    # pair 0, reward margin 1: 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1); pair 1: log 2
    want = (0.9 * SOFTPLUS_M1 + 0.1 * (1.0 + SOFTPLUS_M1) + LOG2) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    plain, _, _ = dpo_loss(*_pairs(), beta=0.5)
    assert dpo_loss(*_pairs(), beta=0.5, label_smoothing=0.0)[0].item() == plain.item()
    # the gradient vanishes where sigmoid(reward margin) = 1 - eps, not only at infinity
    beta, m = 0.5, math.log((1 - eps) / eps)
    pc = torch.tensor([m / beta], requires_grad=True)
    zero = torch.zeros(1)
    dpo_loss(pc, zero, zero, zero, beta=beta, label_smoothing=eps)[0].backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-6)
    pc.grad = None
    dpo_loss(pc, zero, zero, zero, beta=beta)[0].backward()
    assert pc.grad.item() < -0.01  # plain DPO still pushes


def test_sequence_logps_sums_labelled_tokens_only():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0], [0.0, 0.0]]])  # (1, 3, 2)
    labels = torch.tensor([[1, -100, 0]])
    # p(1) = 3/4 at position 0, position 1 skipped, p(0) = 1/2 at position 2
    expected = math.log(0.75) + math.log(0.5)
    assert sequence_logps(logits, labels).tolist() == pytest.approx([expected], abs=1e-6)
    assert sequence_logps(logits, torch.full((1, 3), -100)).tolist() == [0.0]


def test_gae_by_hand_with_a_masked_prompt_prefix():
    from lmforge.align.losses import gae

    rewards = torch.tensor([[9.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[7.0, 0.5, 0.5], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # last action: delta = 1 - 0.5; before it: delta 0 + lam * 0.5; then 0 + lam * 0.25
    assert adv.tolist() == [pytest.approx([0.0, 0.25, 0.5]), pytest.approx([0.125, 0.25, 0.5])]
    assert ret.tolist() == [pytest.approx([0.0, 0.75, 1.0]), pytest.approx([0.625, 0.75, 1.0])]
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # gamma 0.5: delta_1 = 0 + 0.5 * 0.5 - 0.5 = -0.25, adv_1 = -0.25 + 0.5 * 0.5 = 0
    assert adv[0].tolist() == pytest.approx([0.0, 0.0, 0.5])


def test_ppo_clipped_surrogate_and_value_loss_by_hand():
    from lmforge.align.losses import ppo_policy_loss, value_loss

    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True]])
    loss, clipfrac = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped at 1.2), -0.5 (unclipped is worse), 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3, abs=1e-6)
    masked, _ = ppo_policy_loss(new, old, adv, torch.tensor([[True, False, False]]), clip=0.2)
    assert masked.item() == pytest.approx(-1.2, abs=1e-6)
    v = value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]),
                   torch.tensor([[1.0, 2.0]]), torch.tensor([[True, True]]), clip=0.2)  # fmt: skip
    # pos 0: v=1 exact but clipped 0.2 -> (0.8)^2 = 0.64 wins; pos 1: (2)^2 = 4 both -> 0.5 * mean
    assert v.item() == pytest.approx(0.5 * (0.64 + 4.0) / 2, abs=1e-6)


def test_dpo_loss_fn_adds_the_chosen_per_token_nll_when_asked():
    from torch import nn

    from lmforge.align.dpo import make_dpo_loss

    class Fixed(nn.Module):  # logits that give p(token 1) = 3/4 everywhere (vocab of 2)
        def forward(self, ids):
            return torch.tensor([0.0, math.log(3.0)]).expand(*ids.shape, 2)

    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    labels = torch.tensor([[[1, 1, -100], [0, -100, -100]]])  # chosen 2 tokens, rejected 1
    batch = {"input_ids": ids, "labels": labels, "ref_logps": torch.zeros(1, 2)}
    chosen, rejected = 2 * math.log(0.75), math.log(0.25)
    plain, metrics = make_dpo_loss(0.5, "sigmoid")(Fixed(), batch)
    expected = math.log1p(math.exp(-0.5 * (chosen - rejected)))
    assert plain.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["chosen_reward"].item() == pytest.approx(0.5 * chosen, abs=1e-6)
    rpo, _ = make_dpo_loss(0.5, "sigmoid", sft_weight=2.0)(Fixed(), batch)
    assert rpo.item() == pytest.approx(expected + 2.0 * -math.log(0.75), abs=1e-6)


def test_dpo_sft_weight_averages_the_nll_over_all_chosen_tokens_as_trl_rpo():
    from torch import nn

    from lmforge.align.dpo import make_dpo_loss

    class Fixed(nn.Module):  # p(token 1) = 3/4, p(token 0) = 1/4 everywhere (vocab of 2)
        def forward(self, ids):
            return torch.tensor([0.0, math.log(3.0)]).expand(*ids.shape, 2)

    ids = torch.zeros(2, 2, 4, dtype=torch.long)
    likely = [[1, 1, 1, -100], [0, -100, -100, -100]]  # chosen: 3 likely tokens
    unlikely = [[0, -100, -100, -100], [1, -100, -100, -100]]  # chosen: 1 unlikely token
    labels = torch.tensor([likely, unlikely])
    batch = {"input_ids": ids, "labels": labels, "ref_logps": torch.zeros(2, 2)}
    plain, _ = make_dpo_loss(0.5, "sigmoid")(Fixed(), batch)
    rpo, _ = make_dpo_loss(0.5, "sigmoid", sft_weight=2.0)(Fixed(), batch)
    # TRL: F.cross_entropy over the flattened chosen tokens, one mean over all 4 of them
    trl_nll = -(3 * math.log(0.75) + math.log(0.25)) / 4
    assert (rpo - plain).item() == pytest.approx(2.0 * trl_nll, abs=1e-6)
    per_reply_then_batch = -(math.log(0.75) + math.log(0.25)) / 2  # the former average
    assert abs(per_reply_then_batch - trl_nll) > 0.1


def test_whiten_gives_mean_zero_unit_std_and_zero_for_a_constant_batch():
    from lmforge.align.losses import whiten

    w = whiten(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3)
    assert w.tolist() == pytest.approx([(x - 3.0) / math.sqrt(14 / 3) for x in (1, 2, 3, 6)])
    assert whiten(torch.tensor([5.0, 5.0])).tolist() == [0.0, 0.0]
    assert whiten(torch.tensor([4.0])).tolist() == [0.0]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _trl_kto(policy, ref, labels, kl_policy, kl_ref, beta, w_d=1.0, w_u=1.0):
    """TRL's KTOTrainer loss_type="kto", written out in floats: z0 = max(mean KL log-ratio, 0);
    desirable 1 - sigmoid(beta (r - z0)), undesirable 1 - sigmoid(beta (z0 - r)), nanmean."""
    z0 = max(sum(p - r for p, r in zip(kl_policy, kl_ref, strict=True)) / len(kl_policy), 0.0)
    losses = [
        w_d * (1 - _sigmoid(beta * (p - r - z0)))
        if y
        else w_u * (1 - _sigmoid(beta * (z0 - p + r)))
        for p, r, y in zip(policy, ref, labels, strict=True)
    ]
    return sum(losses) / len(losses), z0


@pytest.mark.parametrize(
    "kl_policy, w_d, w_u",
    [([-3.0, -9.0, -4.0], 1.0, 1.0),  # mismatched log-ratios +1, -1, +3: z0 = 1
     ([-5.0, -11.0, -8.0], 1.0, 1.0),  # -1, -3, -1: a negative estimate clamps to z0 = 0
     ([-3.0, -9.0, -4.0], 1.33, 0.5)],
)  # fmt: skip
def test_kto_loss_is_trls_formula_with_a_clamped_kl_reference_point(kl_policy, w_d, w_u):
    policy, ref = [-10.0, -25.0, -7.0], [-12.0, -24.0, -7.5]  # summed over unequal lengths
    labels, kl_ref, beta = [True, False, True], [-4.0, -8.0, -7.0], 0.5
    loss, rewards, z0 = kto_loss(
        *(torch.tensor(x) for x in (policy, ref, labels, kl_policy, kl_ref)), beta, w_d, w_u
    )
    want, want_z0 = _trl_kto(policy, ref, labels, kl_policy, kl_ref, beta, w_d, w_u)
    assert loss.item() == pytest.approx(want, abs=1e-6) and z0.item() == pytest.approx(want_z0)
    assert rewards.tolist() == pytest.approx([1.0, -0.5, 0.25])  # beta * log-ratio
    assert want_z0 in (0.0, 1.0)


def test_kto_gradient_raises_desirable_and_lowers_undesirable_but_not_through_z0():
    policy = torch.tensor([-10.0, -25.0], requires_grad=True)
    kl_policy = torch.tensor([-3.0, -9.0], requires_grad=True)
    ref, labels, kl_ref = torch.tensor([-12.0, -24.0]), torch.tensor([True, False]), torch.zeros(2)
    loss, _, z0 = kto_loss(policy, ref, labels, kl_policy, kl_ref - 10.0, beta=0.1)
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable, lowers the other
    assert kl_policy.grad is None and not z0.requires_grad  # the reference point is detached
