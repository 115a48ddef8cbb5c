"""SimPO and ORPO: losses equal TRL's on fixed log-probs; the stage trains without a reference."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.losses import orpo_odds_ratio_loss, simpo_loss
from lmforge.align.ref_free import RefFreeSpec, make_ref_free_loss, ref_free_loss
from lmforge.align.stage import align
from lmforge.artifacts import read_manifest
from unit.align.test_stage import _cfg

CHOSEN = torch.tensor([-0.9, -1.7, -0.3, -2.5])  # per-token mean log-probs of 4 pairs
REJECTED = torch.tensor([-1.4, -1.1, -3.0, -2.6])


def _trl(beta, **extra):
    """A stand-in `self` for TRL's loss methods, which only read these attributes."""
    return SimpleNamespace(beta=beta, label_smoothing=0.0, alpha=0.0,
                           accelerator=SimpleNamespace(device="cpu"), **extra)  # fmt: skip


def test_simpo_loss_equals_trl_cpo_simpo_and_the_paper():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    loss, chosen_r, rejected_r = simpo_loss(CHOSEN, REJECTED, beta=2.0, gamma=1.0)
    trl = _trl(2.0, loss_type="simpo", simpo_gamma=1.0)
    losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(trl, CHOSEN, REJECTED)
    assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert torch.allclose(chosen_r, trl_chosen) and torch.allclose(rejected_r, trl_rejected)
    # the paper's eq. 6 by hand for pair 0: -log sigmoid(2 * (-0.9 + 1.4) - 1) = log 2
    one = simpo_loss(CHOSEN[:1], REJECTED[:1], beta=2.0, gamma=1.0)[0]
    assert one.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_orpo_odds_ratio_and_total_loss_equal_trl_orpo():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    odds_loss, log_odds = orpo_odds_ratio_loss(CHOSEN, REJECTED)
    losses, *_, trl_ratio, trl_log_odds = orpo.ORPOTrainer.odds_ratio_loss(
        _trl(0.1), CHOSEN, REJECTED
    )
    assert odds_loss.item() == pytest.approx(-trl_ratio.item(), abs=1e-6)
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-6)
    # by hand for pair 0: log odds = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r))
    pc, pr = math.exp(-0.9), math.exp(-1.4)
    assert log_odds[0].item() == pytest.approx(
        math.log(pc / (1 - pc)) - math.log(pr / (1 - pr)), abs=1e-5
    )
    # total as TRL's compute_loss: chosen NLL - beta * mean(log sigmoid(log odds)); one token a
    # reply here, so the token mean of the NLL is the mean over pairs
    ones = torch.ones(4, 2, dtype=torch.long)
    total, margin = ref_free_loss(
        RefFreeSpec("orpo", lam=0.1), torch.stack([CHOSEN, REJECTED], 1), ones
    )
    assert total.item() == pytest.approx(-CHOSEN.mean().item() - losses.mean().item(), abs=1e-6)
    assert torch.equal(margin, log_odds)


def test_orpo_nll_is_averaged_over_all_chosen_tokens_of_the_batch_as_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3)  # rows: pair 0 chosen, rejected, pair 1 chosen, rejected

    class Fixed(torch.nn.Module):
        def forward(self, ids):
            return logits[:, : ids.size(1)]  # pair_logps cuts the batch

    no = -100  # chosen replies of 1 and 4 tokens, rejected of 2 and 3
    labels = torch.tensor([[[2, no, no, no, no], [0, 1, no, no, no]],
                           [[1, 0, 2, 2, no], [no, 2, 2, 1, no]]])  # fmt: skip
    batch = {"input_ids": torch.zeros(2, 2, 5, dtype=torch.long), "labels": labels}
    loss, _ = make_ref_free_loss(RefFreeSpec("orpo", lam=0.1))(Fixed(), batch)
    # TRL by hand: nn.CrossEntropyLoss() (mean over every labelled token) on the chosen rows,
    # minus beta times the mean log sigmoid of the log odds of per-token mean log-probs
    flat = labels.flatten(0, 1)
    nll = F.cross_entropy(logits[0::2].reshape(-1, 3), flat[0::2].reshape(-1), ignore_index=no)
    picked = torch.log_softmax(logits, -1).gather(-1, flat.clamp(min=0)[..., None])[..., 0]
    mean = (picked * (flat != no)).sum(-1) / (flat != no).sum(-1)
    ratio_losses, *_ = orpo.ORPOTrainer.odds_ratio_loss(_trl(0.1), mean[0::2], mean[1::2])
    assert loss.item() == pytest.approx(nll.item() - ratio_losses.mean().item(), abs=1e-6)
    # not the mean over replies of each reply's mean NLL, which weighs the 1-token reply 4 times more
    per_reply = -mean[0::2].mean()
    assert abs(per_reply.item() - nll.item()) > 0.05


def test_orpo_stays_finite_when_a_reply_is_certain():
    odds_loss, log_odds = orpo_odds_ratio_loss(torch.tensor([0.0]), torch.tensor([-2.0]))
    assert math.isfinite(odds_loss.item()) and log_odds.item() > 10


def test_loss_fn_normalises_log_probs_by_reply_length():
    class Fixed(torch.nn.Module):  # p(token 1) = 3/4 everywhere (vocab of 2)
        def forward(self, ids):
            return torch.tensor([0.0, math.log(3.0)]).expand(*ids.shape, 2)

    ids = torch.zeros(1, 2, 3, dtype=torch.long)
    labels = torch.tensor([[[1, 1, -100], [0, -100, -100]]])  # chosen 2 tokens, rejected 1
    batch = {"input_ids": ids, "labels": labels}
    loss, metrics = make_ref_free_loss(RefFreeSpec("simpo", 2.0, 0.5))(Fixed(), batch)
    margin = 2.0 * (math.log(0.75) - math.log(0.25))  # means: 2 log .75 / 2 vs log .25 / 1
    assert metrics["reward_margin"].item() == pytest.approx(margin, abs=1e-6)
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(margin - 0.5)).item(), abs=1e-6)
    assert metrics["pref_acc"].item() == 1.0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"simpo \| orpo"):
        ref_free_loss(RefFreeSpec("cpo"), torch.zeros(1, 2), torch.ones(1, 2))


@pytest.mark.parametrize(
    "method, extra", [("simpo", {"simpo": {"beta": 2.0, "gamma": 0.5}}), ("orpo", {})]
)
def test_ref_free_methods_raise_the_held_out_margin_without_a_reference(
    tmp_path, model_dir, monkeypatch, method, extra
):
    import lmforge.align.stage as stage
    import lmforge.model.convert as convert

    loaded = []
    real_load = convert.load_pretrained

    def counted_load(*args, **kwargs):
        loaded.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(convert, "load_pretrained", counted_load)

    def no_reference(*_):
        raise AssertionError("a reference-free method scored a reference")

    monkeypatch.setattr(stage, "reference_logps", no_reference)
    monkeypatch.setattr(stage, "frozen_copy", no_reference)
    out = align(_cfg(tmp_path, model_dir, method, **extra))
    assert len(loaded) == 1  # the policy only: no reference, not even for ROUGE-L
    m = read_manifest(out)["metrics"]
    assert m["val_logp_margin"] > m["ref_logp_margin"] + 10.0  # measured: -12 -> 45-47
    assert m["val_pref_accuracy"] >= 0.9 and m["val_reward_margin"] > m["ref_reward_margin"]
    assert {"rouge_l", "ref_rouge_l"} <= set(m) and m["steps"] == 25
    assert (out / "final" / "model.safetensors").is_file()
