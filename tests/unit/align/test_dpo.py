"""Held-out scoring: one batch loop (align.dpo.score_pairs) behind DPO's, SimPO/ORPO's and the
reference's numbers, equal to the training losses on the same rows, the model's mode kept."""

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.align.dpo import evaluate_dpo, make_dpo_loss, pair_logps, reference_logps
from lmforge.align.ref_free import RefFreeSpec, evaluate_ref_free, make_ref_free_loss

V, T = 7, 6


class Bigram(nn.Module):
    """logits = a learned table of the current token: a model with parameters, no attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(V, V)

    def forward(self, ids):
        return self.table(ids)


def _rows(n=5):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, size=(n, 2, T))
    labels = np.full((n, 2, T), -100)
    for i in range(n):
        for side in range(2):
            start = rng.integers(1, T - 1)  # replies of 1 to T - 2 tokens after the prompt
            labels[i, side, start - 1 : T - 1] = ids[i, side, start:]
    ref = rng.normal(-8.0, 2.0, size=(n, 2)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "ref_logps": ref}


def _batch(rows, n=None):
    return {k: torch.from_numpy(v[:n]) for k, v in rows.items()}


def test_reference_logps_are_the_summed_reply_log_probs_of_every_row():
    model, rows = Bigram(), _rows()
    ref = reference_logps(model, rows, batch_size=2)
    b = _batch(rows)
    assert ref.shape == (5, 2) and ref.dtype == np.float32
    np.testing.assert_allclose(ref, pair_logps(model, b["input_ids"], b["labels"]).detach(), 1e-6)


@pytest.mark.parametrize(
    "training, kind, eps",
    [(True, "sigmoid", 0.0), (False, "sigmoid", 0.0), (True, "ipo", 0.0), (True, "hinge", 0.0),
     (True, "sigmoid", 0.2)],
)  # fmt: skip
def test_evaluate_dpo_equals_the_training_loss_over_the_same_rows(training, kind, eps):
    model, rows = Bigram().train(training), _rows()
    loss_fn = make_dpo_loss(0.1, kind, label_smoothing=eps)
    got = evaluate_dpo(model, rows, batch_size=2, beta=0.1, kind=kind, label_smoothing=eps)
    want, metrics = loss_fn(model, _batch(rows))
    assert got["val_loss"] == pytest.approx(want.item(), abs=1e-6)
    assert got["val_reward_margin"] == pytest.approx(metrics["reward_margin"].item(), abs=1e-6)
    assert model.training is training
    first = evaluate_dpo(model, rows, 2, beta=0.1, kind=kind, limit=1, label_smoothing=eps)
    assert first["val_loss"] == pytest.approx(loss_fn(model, _batch(rows, 2))[0].item(), abs=1e-6)


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_evaluate_ref_free_equals_the_training_loss_over_the_same_rows(method):
    model, rows = Bigram().train(), _rows()
    rows.pop("ref_logps")
    spec = RefFreeSpec(method)
    got = evaluate_ref_free(model, rows, batch_size=2, spec=spec)
    want, metrics = make_ref_free_loss(spec)(model, _batch(rows))
    assert got["val_loss"] == pytest.approx(want.item(), abs=1e-6)
    assert got["val_reward_margin"] == pytest.approx(metrics["reward_margin"].item(), abs=1e-6)
    assert model.training


def test_dpo_reference_reads_a_stage_directory_and_refuses_another_tokenizer(tmp_path, model_dir):
    import shutil

    from tiny_tokenizers import train_byte_bpe

    from lmforge.align.dpo import load_reference
    from lmforge.errors import ConfigError, InputError
    from lmforge.finetune.sft import load_chat_tokenizer
    from lmforge.model.convert import load_pretrained
    from unit.finetune.helpers import CORPUS, SPECIALS

    tok = load_chat_tokenizer(model_dir)
    stage = tmp_path / "sft"
    shutil.copytree(model_dir, stage / "final")  # a finetune stage's directory, as --model takes
    got, want = load_reference(stage, tok).state_dict(), load_pretrained(model_dir).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    foreign = shutil.copytree(model_dir, tmp_path / "foreign")  # same weights, other token ids
    train_byte_bpe([t.upper() for t in CORPUS], tok.vocab_size, SPECIALS).save(
        str(foreign / "tokenizer.json")
    )
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(
            InputError, match=r"(has no config\.json|does not exist).*dpo\.reference"
        ):
            load_reference(bad, tok)
    with pytest.raises(ConfigError, match=r"dpo\.reference=.*maps tokens to other ids than the"):
        load_reference(foreign, tok)


def test_pair_logps_cut_after_the_last_labelled_position_equal_the_full_rows(model_dir):
    from lmforge.align.losses import sequence_logps
    from lmforge.model.convert import load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(model_dir).eval()
    ids = torch.randint(3, 60, (3, 2, 40))
    labels = torch.full((3, 2, 40), -100)
    labels[0, 0, 4:9], labels[1, 1, 10:21], labels[2, 0, 2:5], labels[2, 1, 6:7] = 7, 8, 9, 10
    ids[..., 22:] = 0  # right padding past the last labelled position
    with torch.no_grad():
        full = sequence_logps(model(ids.flatten(0, 1)), labels.flatten(0, 1)).view(3, 2)
        assert torch.allclose(pair_logps(model, ids, labels), full, atol=1e-5)

    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        pair_logps(model, ids, labels)
    assert seen == [21]  # position 20 is the last one labelled
