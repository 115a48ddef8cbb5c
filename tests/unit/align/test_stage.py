"""The align stage on a micro model: reward model and DPO (full and LoRA) end to end."""

import json

import pytest
import torch

from lmforge.align.stage import AlignConfig, align
from lmforge.artifacts import read_manifest
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.files import TokenizerFiles

FAST = {"max_steps": 25, "seq_len": 48, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
        "eval_every": 0, "eval_steps": 2, "ckpt_every": 0}  # fmt: skip
WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value", "number", "path"]


def _prefs(path, n=48):
    rows = [{"prompt": f"Say {w} {i}", "chosen": f"The {w} is here.", "rejected": "no no no no",
             "kind": "degenerate"}
            for i, w in enumerate(WORDS * (n // len(WORDS)))]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, model_dir, method, **extra):
    return AlignConfig(
        model=model_dir, data=_prefs(tmp_path / "prefs.jsonl"), out=tmp_path / method,
        method=method, train=FAST, eval={"rouge_examples": 2, "max_new_tokens": 4}, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, model_dir):
    return align(_cfg(tmp_path_factory.mktemp("rm"), model_dir, "reward"))


def test_reward_model_learns_pairs_and_exports_a_one_label_hf_classifier(reward_dir):
    transformers = pytest.importorskip("transformers")
    out = reward_dir
    m = read_manifest(out)["metrics"]
    assert m["base_val_pair_accuracy"] <= 0.8 and m["val_pair_accuracy"] == 1.0
    assert m["val_reward_margin"] > 0 and m["steps"] == 25
    assert m["val_pair_accuracy_degenerate"] == 1.0  # per kind, when pairs carry one
    assert not (out / "final" / "generation_config.json").exists()  # a classifier generates nothing
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["num_labels"] == 1 and config["architectures"][0].endswith(
        "ForSequenceClassification"
    )
    assert config["lmforge_classifier_seq_len"] == FAST["seq_len"]  # eval cuts where pairs were
    # transformers' reward for a chosen and a rejected conversation ranks them as ours did
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(out / "final"))
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Say beta 1"}, {"role": "assistant", "content": reply}],
            tokenize=False,
        )
        for reply in ("The beta is here.", "no no no no")
    ]
    with torch.no_grad():
        rewards = [hf(**tok(t, return_tensors="pt")).logits.item() for t in texts]
    assert rewards[0] > rewards[1]


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_dpo_raises_the_held_out_log_prob_margin(tmp_path, model_dir, tuning):
    out = align(_cfg(tmp_path, model_dir, "dpo", tuning=tuning, dpo={"beta": 0.5}))
    m = read_manifest(out)["metrics"]
    assert m["val_logp_margin"] > m["ref_logp_margin"] + 1.0
    assert m["val_pref_accuracy"] >= 0.9 and m["val_reward_margin"] > 0
    assert {"rouge_l", "ref_rouge_l"} <= set(m)
    assert (out / "final" / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "adapter").is_dir() == (tuning == "lora")
    assert (m["trainable_fraction"] < 0.5) == (tuning == "lora")
    # a tuned chat policy stops where its turn ends, in transformers too (generation_config.json)
    gen = json.loads((out / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == TokenizerFiles.load(model_dir).stop_ids()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "pref_acc", "chosen_reward", "rejected_reward"} <= set(rows[0])


def test_ipo_against_an_explicit_reference_directory(tmp_path, model_dir):
    dpo = {"beta": 0.5, "loss": "ipo", "reference": model_dir, "sft_weight": 0.5}
    out = align(_cfg(tmp_path, model_dir, "dpo", dpo=dpo))
    m = read_manifest(out)["metrics"]
    assert m["val_logp_margin"] > m["ref_logp_margin"] + 0.5 and m["val_pref_accuracy"] >= 0.9
    assert str(model_dir) in read_manifest(out)["inputs"]  # the reference is a hashed input
    assert m["ref_rouge_l"] >= 0 and m["rouge_examples"] == 2  # the reference reloaded to decode


def test_bad_preference_file_fails_before_training(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    cfg = _cfg(tmp_path, model_dir, "dpo").model_copy(update={"data": bad})
    with pytest.raises(InputError, match=r"bad\.jsonl line 2"):
        align(cfg)
    assert not (tmp_path / "dpo" / "manifest.json").exists()


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_ppo_trains_the_policy_and_logs_reward_kl_entropy_per_step(
    tmp_path, model_dir, reward_dir, tuning, monkeypatch
):
    """Mechanics on a micro model (whether PPO raises reward is measured on the quickstart)."""
    from lmforge.align import stage

    ppo = {"reward_model": reward_dir, "rollout_prompts": 16, "max_new_tokens": 8,
           "eval_prompts": 8}  # fmt: skip
    cfg = _cfg(tmp_path, model_dir, "ppo", tuning=tuning, ppo=ppo)
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"max_steps": 8, "lr": 1e-2})}
    )
    held_out_rollouts, real = [], stage.heldout_rollout

    def counted(policy, **kwargs):
        held_out_rollouts.append(policy)
        return real(policy, **kwargs)

    monkeypatch.setattr(stage, "heldout_rollout", counted)
    out = align(cfg)
    m = read_manifest(out)["metrics"]
    # before training, and the loop's final evaluation, which the "after" numbers reuse
    assert len(held_out_rollouts) == 2
    assert {"val_reward", "val_reward_before", "val_kl", "val_entropy"} <= set(m)
    assert m["val_kl"] != 0  # the policy moved away from the reference
    # the gain is paired by prompt: its mean is the difference of the means
    assert m["val_reward_gain"] == pytest.approx(m["val_reward"] - m["val_reward_before"], abs=1e-4)
    assert m["val_reward_gain_se"] > 0 and m["val_reward_se_before"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 8 and {"reward", "kl", "entropy", "clipfrac"} <= set(steps[0])
    (final_eval,) = [r for r in rows if "val_reward" in r]
    assert m["val_reward"] == pytest.approx(final_eval["val_reward"], abs=1e-5)
    assert abs(steps[0]["kl"]) < 1e-4  # the first rollout's policy is the reference
    assert any(r["clipfrac"] > 0 for r in steps)  # later minibatches meet a moved policy
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "adapter").is_dir() == (tuning == "lora")


def _records(words):
    from lmforge.align.grpo_data import PromptRecord

    return [PromptRecord([{"role": "user", "content": f"Say {w}"}], None, "t") for w in words]


def test_rollout_prices_exactly_the_sampled_answer_tokens(model_dir, reward_dir):
    from lmforge.align.config import PPOOptions
    from lmforge.align.ppo import PolicyWithValue, Rollouts, load_reward_model, make_rollout
    from lmforge.finetune.sft import load_chat_tokenizer
    from lmforge.model.convert import load_pretrained

    tok = load_chat_tokenizer(model_dir)
    lm = load_pretrained(model_dir)
    policy = PolicyWithValue(lm)
    reward = load_reward_model(reward_dir, lm.config.vocab_size, tok)
    opts = PPOOptions(rollout_prompts=4, max_new_tokens=6, kl_coef=0.1)
    prompts = _records(WORDS[:4])
    src = Rollouts(policy, lm, reward, tok, prompts, opts, 2, 48, 0)
    r = make_rollout(src, prompts, seed=0)
    actions = r["labels"] != -100
    assert actions.sum(1).tolist() == r["answer_len"].tolist()
    assert (r["input_ids"][:, 1:][actions[:, :-1]] == r["labels"][actions]).all()
    assert r["kl"].abs().max() < 1e-5  # reference == policy
    assert abs(float(r["advantages"][actions].mean())) < 1e-5  # whitened
    assert (r["advantages"][~actions] == 0).all() and (r["returns"][~actions] == 0).all()
    assert r["score"].shape == (4,) and torch.isfinite(r["score"]).all()
    # the loader serves ppo_epochs passes of minibatches of one rollout, then samples anew
    first = [next(src.loader)["input_ids"] for _ in range(src.loader.steps_per_rollout)]
    assert src.loader.steps_per_rollout == 4 and all(b.shape[0] == 2 for b in first)


def test_batch_reward_norm_prices_whitened_scores_and_eval_samples_each_prompt(
    model_dir, reward_dir
):
    from lmforge.align.config import PPOOptions
    from lmforge.align.losses import whiten
    from lmforge.align.ppo import (
        PolicyWithValue,
        Rollouts,
        heldout_rollout,
        load_reward_model,
        make_rollout,
        rollout_metrics,
    )
    from lmforge.finetune.sft import load_chat_tokenizer
    from lmforge.model.convert import load_pretrained

    tok = load_chat_tokenizer(model_dir)
    lm = load_pretrained(model_dir)
    policy = PolicyWithValue(lm)  # values 0 (zero-initialised head)
    reward = load_reward_model(reward_dir, lm.config.vocab_size, tok)
    prompts = _records(WORDS[:4])
    # no KL, gamma = lam = 1: the return at an answer's first token is its priced score
    for norm in ("none", "batch"):
        opts = PPOOptions(rollout_prompts=4, max_new_tokens=6, kl_coef=0.0, lam=1.0,
                          reward_norm=norm)  # fmt: skip
        r = make_rollout(Rollouts(policy, lm, reward, tok, prompts, opts, 4, 48, 0), prompts, 0)
        first = (r["labels"] != -100).long().argmax(1)
        priced = r["returns"][torch.arange(4), first]
        expected = whiten(r["score"]) if norm == "batch" else r["score"]
        assert priced.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert abs(float(priced.mean())) < 1e-4 and float(priced.std()) == pytest.approx(1, abs=1e-4)
    # eval_samples answers per prompt: the mean over all of them, and its standard error
    one = rollout_metrics(heldout_rollout(policy, lm, reward, tok, prompts, PPOOptions(), 48))
    held = heldout_rollout(policy, lm, reward, tok, prompts, PPOOptions(eval_samples=3), 48)
    three = rollout_metrics(held)
    rows = [p for p in prompts for _ in range(3)]
    opts = PPOOptions(rollout_prompts=12)
    all_rows = make_rollout(Rollouts(policy, lm, reward, tok, rows, opts, 12, 48, 0), rows, 10**6)
    per_prompt = all_rows["score"].view(4, 3).mean(1)
    assert three["val_reward"] == pytest.approx(float(per_prompt.mean()), abs=1e-5)
    assert three["val_reward_se"] == pytest.approx(float(per_prompt.std()) / 2, abs=1e-5)
    assert held["prompt_reward"].tolist() == pytest.approx(per_prompt.tolist(), abs=1e-5)
    assert one["val_reward_se"] > 0 and one["val_reward"] != three["val_reward"]


def test_ppo_refuses_a_model_that_is_not_a_reward_model(tmp_path, model_dir):
    cfg = _cfg(tmp_path, model_dir, "ppo", ppo={"reward_model": model_dir})
    with pytest.raises(ConfigError, match="not a reward model"):
        align(cfg)


def test_pair_rewards_cut_at_the_furthest_pooled_token_equal_the_full_rows(model_dir):
    from lmforge.align.reward import pair_rewards, reward_model
    from lmforge.model.convert import load_pretrained

    torch.manual_seed(0)
    model = reward_model(load_pretrained(model_dir)).eval()
    ids = torch.randint(3, 60, (3, 2, 40))
    last = torch.tensor([[5, 17], [9, 11], [3, 12]])
    ids[..., 18:] = 0  # right padding past the furthest pooled position
    with torch.no_grad():
        full = model(ids.flatten(0, 1), last.flatten())[0].view(3, 2)
        assert torch.allclose(pair_rewards(model, ids, last), full, atol=1e-5)


def test_ppo_refuses_an_encoder_or_a_foreign_tokenizer_reward_model(
    tmp_path, model_dir, tokenizer_dir, reward_dir
):
    import shutil

    from tiny_tokenizers import train_byte_bpe

    from lmforge.align.ppo import load_reward_model
    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.finetune.sft import load_chat_tokenizer
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.files import copy_tokenizer_files
    from unit.finetune.helpers import CORPUS, SPECIALS

    tok = load_chat_tokenizer(model_dir)
    vocab = tok.vocab_size
    torch.manual_seed(0)
    encoder = Transformer(preset_config("bert-micro", vocab_size=vocab))
    head = SequenceClassifier(encoder, 1).classifier_head(["reward"])
    save_pretrained(encoder, tmp_path / "enc", extra_config={"pad_token_id": tok.pad_id},
                    classifier=head)  # fmt: skip
    copy_tokenizer_files(tokenizer_dir, tmp_path / "enc")
    with pytest.raises(ConfigError, match=r"is an encoder classifier: a reward model scores"):
        load_reward_model(tmp_path / "enc", vocab, tok)
    # the reward model's own weights, read through a tokenizer of the same size, other ids
    foreign = shutil.copytree(reward_dir / "final", tmp_path / "foreign")
    train_byte_bpe([t.upper() for t in CORPUS], vocab, SPECIALS).save(
        str(foreign / "tokenizer.json")
    )
    assert TokenizerFiles.load(foreign).vocab_size == vocab
    says = r"maps tokens to other ids than the policy.s .*, e\.g\. '.+': id (\d+|absent) vs"
    with pytest.raises(ConfigError, match=says):
        load_reward_model(foreign, vocab, tok)
    assert load_reward_model(reward_dir, vocab, tok) is not None  # the policy's own tokenizer


def test_label_smoothing_is_refused_outside_the_sigmoid_loss(tmp_path):
    from lmforge.config import validate

    base = {"model": str(tmp_path), "data": str(tmp_path / "p.jsonl"), "out": str(tmp_path / "o"),
            "method": "dpo"}  # fmt: skip
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing=0\.1 applies to dpo\.loss=sig"):
        validate(AlignConfig, {**base, "dpo": {"loss": "hinge", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing"):
        validate(AlignConfig, {**base, "dpo": {"label_smoothing": 0.5}})  # a coin flip: no signal
    cfg = validate(AlignConfig, {**base, "dpo": {"label_smoothing": 0.1}})
    assert cfg.dpo.label_smoothing == 0.1


def test_policy_methods_refuse_an_encoder(tmp_path, tokenizer_dir):
    """An encoder sees the next token it is scored on: its reply log-probs would be meaningless
    (and batches cut after the last labelled token would change them)."""
    from ..finetune.helpers import make_model_dir

    encoder = make_model_dir(tmp_path / "enc", tokenizer_dir, causal=False)
    with pytest.raises(ConfigError, match=r"--method dpo tunes a causal LM.*causal=False"):
        align(_cfg(tmp_path, encoder, "dpo"))
    assert not (tmp_path / "dpo" / "final").exists()


def test_ppo_scores_at_the_length_the_reward_model_was_trained_at(tmp_path, model_dir, reward_dir):
    import shutil

    from lmforge.align.encode import encode_reply
    from lmforge.align.ppo import load_reward_model, score
    from lmforge.finetune.heads import SEQ_LEN_KEY
    from lmforge.finetune.sft import load_chat_tokenizer

    tok = load_chat_tokenizer(model_dir)
    reward = load_reward_model(reward_dir, tok.vocab_size, tok)
    assert reward.input_len == FAST["seq_len"] == 48  # recorded by the reward stage
    prompt, answer = [{"role": "user", "content": "Say beta 1"}], " ".join(WORDS * 2)
    whole = encode_reply(tok, prompt, answer, 10**6)[0]
    assert 64 < len(whole) <= reward.lm.config.block_size

    def direct(model, n):  # the reward model's forward on the conversation's first n tokens
        ids = torch.tensor([whole[:n]])
        with torch.no_grad():
            return model(ids, torch.tensor([n - 1]))[0].item()

    want = direct(reward, 48)
    assert score(reward, tok, [prompt], [answer], 64).item() == pytest.approx(want, abs=1e-5)
    assert abs(direct(reward, 64) - want) > 1e-4  # what PPO scored before: its own seq_len
    shorter = score(reward, tok, [prompt], [answer], 32).item()  # the PPO run's, when shorter
    assert shorter == pytest.approx(direct(reward, 32), abs=1e-5)
    # a reward model that records no length is read up to the PPO run's seq_len
    bare = shutil.copytree(reward_dir / "final", tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != SEQ_LEN_KEY})
    )
    unrecorded = load_reward_model(bare, tok.vocab_size, tok)
    assert unrecorded.input_len is None
    assert score(unrecorded, tok, [prompt], [answer], 64).item() == pytest.approx(
        direct(unrecorded, 64), abs=1e-5
    )
    (bare / "config.json").write_text(json.dumps(config | {SEQ_LEN_KEY: 0}))
    with pytest.raises(InputError, match=rf"config.json: {SEQ_LEN_KEY}=0 is not a length"):
        load_reward_model(bare, tok.vocab_size, tok)


@pytest.mark.parametrize("method", ["reward", "dpo", "kto", "simpo", "orpo"])
def test_what_is_scored_before_and_after_training_runs_as_the_loops_evaluations(
    tmp_path, model_dir, method, monkeypatch
):
    """train.dtype=bf16 on the CPU: reference log-probs and the "before" and "after" numbers
    are scored on the loop's device under its autocast, as the loss and its evaluations."""
    from lmforge.align import stage

    seen = []

    def recorded(fn):
        def call(model, *args, **kwargs):
            device = next(model.parameters()).device
            seen.append((fn.__name__, device, torch.is_autocast_enabled(device.type),
                         torch.get_autocast_dtype(device.type)))  # fmt: skip
            return fn(model, *args, **kwargs)

        return call

    scorers = ["reference_logps", "evaluate_rewards", "evaluate_dpo", "evaluate_kto",
               "evaluate_ref_free"]  # fmt: skip
    for name in scorers:
        monkeypatch.setattr(stage, name, recorded(getattr(stage, name)))
    cfg = AlignConfig(**{**_cfg(tmp_path, model_dir, method).model_dump(),
                         "train": {**FAST, "max_steps": 2, "dtype": "bf16"}})  # fmt: skip
    m = read_manifest(align(cfg))["metrics"]
    names = [name for name, *_ in seen]
    expected = {"reward": ["evaluate_rewards"] * 3, "dpo": ["reference_logps"] * 2
                + ["evaluate_dpo"] * 2, "kto": ["reference_logps"] * 2 + ["evaluate_kto"] * 2,
                "simpo": ["evaluate_ref_free"] * 3, "orpo": ["evaluate_ref_free"] * 3}  # fmt: skip
    assert names == expected[method]  # before (or the reference), the loop's last eval, after
    assert {tuple(s[1:]) for s in seen} == {(torch.device("cpu"), True, torch.bfloat16)}
    assert m["steps"] == 2
