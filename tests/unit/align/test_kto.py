"""KTO: unpaired data (TRL's format, unpaired pairs, the feedback store), encoding with KL
partners, the loss on a model's rows against hand computation, and the stage end to end."""

import json
import math

import numpy as np
import pytest
import torch

from lmforge.align.config import KTOOptions
from lmforge.align.dpo import pair_logps
from lmforge.align.kto import (
    balance_warning,
    encode_unpaired,
    evaluate_kto,
    kl_partners,
    make_kto_loss,
    pair_accuracy,
    reward_auc,
)
from lmforge.align.losses import kto_loss
from lmforge.align.stage import AlignConfig, align
from lmforge.align.unpaired import load_unpaired_groups
from lmforge.artifacts import read_manifest
from lmforge.config import validate
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.serve.feedback import FeedbackStore
from lmforge.serve.feedback_export import FeedbackExportConfig, export_feedback
from unit.align.test_dpo import Bigram, _batch, _rows

FAST = {"max_steps": 25, "seq_len": 48, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
        "eval_every": 0, "eval_steps": 2, "ckpt_every": 0}  # fmt: skip
WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value", "number", "path"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _flat(groups):
    return [e for g in groups for e in g]


def test_trl_unpaired_records_and_unpaired_pairs_read_as_labelled_examples(tmp_path):
    rows = [
        {"prompt": "Say hi", "completion": "hi", "label": True},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}],
         "completion": [{"role": "assistant", "content": "5"}], "label": False},
        {"prompt": "Say yes", "chosen": "yes", "rejected": "no"},
        {"prompt": "Rank", "ranked": ["a", "b", "c"]},
    ]  # fmt: skip
    groups = load_unpaired_groups(_write(tmp_path / "kto.jsonl", rows))
    assert [len(g) for g in groups] == [1, 1, 2, 6]  # a ranked list: each of its 3 pairs unpaired
    first, second = groups[0][0], groups[1][0]
    assert first == {"prompt": [{"role": "user", "content": "Say hi"}], "completion": "hi",
                     "desirable": True}  # fmt: skip
    assert second["prompt"][0]["role"] == "system" and second["completion"] == "5"
    assert not second["desirable"] and "pair" not in second
    chosen, rejected = groups[2]
    assert (chosen["completion"], chosen["desirable"]) == ("yes", True)
    assert (rejected["completion"], rejected["desirable"]) == ("no", False)
    assert chosen["pair"] == rejected["pair"] != groups[3][0]["pair"]


@pytest.mark.parametrize(
    "record, message",
    [({"prompt": "q", "completion": "a", "label": 1}, "label must be true"),
     ({"prompt": "q", "completion": "a"}, "not unpaired feedback"),
     ({"prompt": "q", "completion": "", "label": True}, "completion must be a non-empty"),
     ({"prompt": "", "completion": "a", "label": True}, "prompt must be"),
     ({"prompt": "q", "chosen": "a"}, "fits no preference shape")],
)  # fmt: skip
def test_a_bad_record_names_file_and_line(tmp_path, record, message):
    good = {"prompt": "q", "completion": "a", "label": True}
    path = _write(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(InputError, match=rf"bad\.jsonl line 2: .*{message}"):
        load_unpaired_groups(path)


def _store(path):
    """Ratings 5, 4, 3, 2, 1 stars, a thumbs up and down, and one side-by-side choice."""
    with FeedbackStore(path) as store:
        for stars in range(1, 6):
            store.record_response(f"r{stars}", "sft", f"q{stars}", None, f"answer {stars}")
            store.add_rating(f"r{stars}", stars, scale="stars")
        for rid, thumb in (("up", 1), ("down", -1)):
            store.record_response(rid, "sft", "q", None, f"thumb {rid}")
            store.add_rating(rid, thumb)
        store.record_response("a", "sft", "pick", None, "the good one")
        store.record_response("b", "base", "pick", None, "the bad one")
        store.add_choice("a", "b")
    return path


def _labels(groups):
    return {e["completion"]: e["desirable"] for e in _flat(groups)}


def test_the_feedback_store_becomes_labels_by_the_rating_thresholds(tmp_path):
    db = _store(tmp_path / "feedback.db")
    options = {"desirable_min_rating": 4.0, "undesirable_max_rating": 2.0}
    assert _labels(load_unpaired_groups(db, options)) == {
        "answer 5": True, "answer 4": True, "answer 2": False, "answer 1": False,  # 3: neither
        "thumb up": True, "thumb down": False, "the good one": True, "the bad one": False,
    }  # fmt: skip
    strict = {"desirable_min_rating": 5.0, "undesirable_max_rating": 1.0}
    assert len(load_unpaired_groups(db, strict)) == 6  # 4 and 2 stars now fall between

    export = export_feedback(FeedbackExportConfig(db=db, out=tmp_path / "export"))
    metrics = read_manifest(export)["metrics"]
    assert (metrics["kto_desirable"], metrics["kto_undesirable"]) == (4, 4)
    first = json.loads((export / "kto.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "q1", "completion": "answer 1", "label": False, "kind": "rating",
                     "response_id": "r1", "rating": 1.0}  # fmt: skip
    assert _labels(load_unpaired_groups(export, options)) == _labels(load_unpaired_groups(db))
    with pytest.raises(ConfigError, match=r"desirable_min_rating=4\.0, this run asks 5\.0"):
        load_unpaired_groups(export, strict)
    overlap = {"db": db, "out": tmp_path / "x", "undesirable_max_rating": 4.0}
    with pytest.raises(ConfigError, match=r"undesirable_max_rating=4\.0 must be below"):
        validate(FeedbackExportConfig, overlap)  # refused as the config is read, before the store


def test_each_example_is_scored_beside_another_examples_completion(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    examples = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"answer {i}",
                 "desirable": i % 2 == 0} for i in range(6)]  # fmt: skip
    examples[0]["prompt"][0]["content"] = "long " * 60  # its reply falls past seq_len: dropped
    rows, counts = encode_unpaired(tok, examples, seq_len=48, seed=0)
    assert rows["input_ids"].shape[:2] == (5, 2) and counts["dropped"] == 1
    assert (counts["desirable"], counts["undesirable"]) == (2, 3)
    scored = []  # which example each row holds, read back from its own completion
    for r in range(5):
        own = tok.decode([t for t in rows["labels"][r, 0] if t >= 0])
        other = tok.decode([t for t in rows["labels"][r, 1] if t >= 0])
        e = next(e for e in examples if own.startswith(e["completion"]))
        scored.append(examples.index(e))
        assert not other.startswith(e["completion"]) and rows["desirable"][r] == e["desirable"]
        assert np.array_equal(rows["input_ids"][r, 0, :3], rows["input_ids"][r, 1, :3])  # prompt
    assert sorted(scored) == [1, 2, 3, 4, 5]  # example 0 dropped, each other one row


def _kto_rows():
    rows = _rows(6)
    rows["desirable"] = np.array([True, False, True, True, False, False])
    rows["pair"] = np.array([0, 0, 1, -1, 1, -1])
    return rows


def _summed(model, ids, labels):
    """Reply log-probs summed by hand, token by token (rows of unequal reply lengths)."""
    logp = torch.log_softmax(model(ids), -1)
    return sum(logp[t, labels[t]].item() for t in range(len(labels)) if labels[t] >= 0)


def test_the_training_loss_on_a_models_rows_is_the_hand_computed_kto_loss():
    model, rows, opts = Bigram(), _kto_rows(), KTOOptions(beta=0.5, desirable_weight=1.2)
    loss, metrics = make_kto_loss(opts)(model, _batch(rows))
    ids, labels, ref = (torch.from_numpy(rows[k]) for k in ("input_ids", "labels", "ref_logps"))
    logps = [[_summed(model, ids[i, s], labels[i, s]) for s in (0, 1)] for i in range(6)]
    z0 = max(sum(lp[1] - r[1] for lp, r in zip(logps, ref.tolist(), strict=True)) / 6, 0.0)
    want = []
    for (own, _), r, good in zip(logps, ref.tolist(), rows["desirable"], strict=True):
        sign, weight = (1, 1.2) if good else (-1, 1.0)
        want.append(weight * (1 - 1 / (1 + math.exp(-0.5 * sign * (own - r[0] - z0)))))
    assert loss.item() == pytest.approx(sum(want) / 6, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-5)
    got = evaluate_kto(model.train(), rows, batch_size=4, opts=opts)  # z0 over all rows too
    assert got["val_loss"] == pytest.approx(loss.item(), abs=1e-6) and model.training
    assert 0 <= got["val_reward_auc"] <= 1 and got["val_pair_accuracy"] in (0.0, 0.5, 1.0)


def test_the_weight_balance_warning_follows_trls_recommended_range():
    opts = KTOOptions()
    assert balance_warning({"desirable": 100, "undesirable": 100}, opts) is None
    assert balance_warning({"desirable": 120, "undesirable": 100}, opts) is None  # 1.2
    warning = balance_warning({"desirable": 10, "undesirable": 100}, opts)
    assert "kto.desirable_weight in [10, 13.3]" in warning
    for weight, warns in ((9.9, True), (10, False), (13.3, False), (13.4, True)):
        opts = KTOOptions(desirable_weight=weight)
        assert (balance_warning({"desirable": 10, "undesirable": 100}, opts) is None) != warns
    lopsided = KTOOptions(desirable_weight=2.0)  # equal counts, which TRL would not check
    assert "weighted ratio of 2" in balance_warning({"desirable": 5, "undesirable": 5}, lopsided)
    none_bad = balance_warning({"desirable": 7, "undesirable": 0}, KTOOptions())
    assert "7 desirable and 0 undesirable" in none_bad and "add undesirable examples" in none_bad


def test_kto_raises_desirable_over_undesirable_log_ratios_and_writes_a_policy(
    tmp_path, model_dir, caplog
):
    rows = [{"prompt": f"Say {w} {i}", "completion": f"The {w} is here.", "label": True}
            for i, w in enumerate(WORDS * 5)]  # fmt: skip
    rows += [{"prompt": f"Tell {w} {i}", "completion": "no no no no", "label": False}
             for i, w in enumerate(WORDS * 3)]  # fmt: skip
    cfg = AlignConfig(
        model=model_dir, data=_write(tmp_path / "kto.jsonl", rows), out=tmp_path / "kto",
        method="kto", kto={"beta": 0.5}, train=FAST,
        eval={"rouge_examples": 2, "max_new_tokens": 4, "val_fraction": 0.2},
    )  # fmt: skip
    out = align(cfg)
    m = read_manifest(out)["metrics"]
    assert m["train_desirable"] + m["val_desirable"] == 40
    assert m["train_undesirable"] + m["val_undesirable"] == 24
    # each label on its side of the reference point beta * z0 (the partners of "no no no no"
    # are the desirable texts the policy raised, so z0 is far above 0)
    assert m["val_desirable_reward"] > 0.5 * m["val_kl"] > m["val_undesirable_reward"]
    assert m["val_reward_auc"] == 1.0 and m["val_logp_margin"] > m["ref_logp_margin"] + 1.0
    assert "val_pair_accuracy" not in m  # no pairs in the data
    assert {"rouge_l", "ref_rouge_l"} <= set(m) and m["steps"] == 25
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "desirable_reward", "undesirable_reward", "label_acc"} <= set(logged[0])
    assert "outside the recommended [1, 4/3]" in caplog.text  # 40 desirable vs 24: 1.67


def test_a_split_of_one_example_is_refused_not_made_its_own_kl_partner(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    one = [{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "desirable": True}]
    with pytest.raises(InputError, match=r"held-out split holds 1 example\(s\).*at least 2"):
        encode_unpaired(tok, one, seq_len=48, seed=0, split="held-out")
    with pytest.raises(InputError, match="train split holds 0 example"):
        encode_unpaired(tok, [], seq_len=48, seed=0)
    two = [*one, {**one[0], "completion": "b", "desirable": False}]
    rows, _ = encode_unpaired(tok, two, seq_len=48, seed=0)
    for r in range(2):  # each scored beside the other's completion
        assert not np.array_equal(rows["labels"][r, 0], rows["labels"][r, 1])


def test_reward_auc_counts_wins_and_half_ties_as_every_pair_compared():
    good, bad = torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0, 5.0])
    # wins over (2, 0, 5): 3 -> 2, 1 -> 1, 2 -> 1.5 twice: 6 of 12
    assert reward_auc(good, bad) == pytest.approx(6 / 12)
    assert reward_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert reward_auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0
    g = torch.from_numpy(np.random.default_rng(0).integers(0, 6, 40).astype(np.float32))
    b = torch.from_numpy(np.random.default_rng(1).integers(0, 6, 30).astype(np.float32))
    d = g[:, None] - b[None, :]  # every pair, ties in plenty
    assert reward_auc(g, b) == pytest.approx(float(((d > 0) + 0.5 * (d == 0)).float().mean()))


def test_pair_accuracy_compares_the_two_halves_of_each_complete_pair():
    rewards = torch.tensor([1.0, 0.5, -1.0, 0.0, 2.0, 9.0])
    desirable = torch.tensor([True, False, True, False, True, False])
    pair = torch.tensor([0, 0, 1, 1, 2, -1])  # pair 2 lost its other half; -1: unpaired
    assert pair_accuracy(rewards, desirable, pair) == 0.5  # pair 0 right, pair 1 wrong
    assert pair_accuracy(rewards, desirable, torch.full((6,), -1)) is None


def test_the_kl_partner_rows_are_scored_without_a_graph_and_change_no_gradient():
    model, rows, opts = Bigram(), _kto_rows(), KTOOptions(beta=0.5)
    calls = []
    model.register_forward_hook(
        lambda m, args, out: calls.append((len(args[0]), out.requires_grad))
    )
    loss, _ = make_kto_loss(opts)(model, _batch(rows))
    assert calls == [(6, True), (6, False)]  # own completions with a graph, partners without
    loss.backward()
    fast = model.table.weight.grad.clone()
    model.zero_grad()
    b = _batch(rows)  # the same loss with the partners' graph kept: the same gradient
    logps = pair_logps(model, b["input_ids"], b["labels"])
    ref, desirable = b["ref_logps"], b["desirable"]
    kto_loss(logps[:, 0], ref[:, 0], desirable, logps[:, 1], ref[:, 1], 0.5)[0].backward()
    torch.testing.assert_close(model.table.weight.grad, fast)


@pytest.mark.parametrize("seed", range(5))
def test_a_kl_partner_never_holds_the_examples_own_text_when_another_exists(seed):
    texts = ["yes", "yes", "yes", "yes", "no", "maybe", "no"]  # completions given more than once
    partner = kl_partners(texts, seed)
    assert all(texts[partner[i]] != texts[i] for i in range(len(texts)))
    assert (partner == kl_partners(texts, seed)).all()  # seeded
    same = ["ok"] * 3  # no other text: each still takes another example
    assert sorted(kl_partners(same, seed).tolist()) == [0, 1, 2]
    assert all(kl_partners(same, seed)[i] != i for i in range(3))
