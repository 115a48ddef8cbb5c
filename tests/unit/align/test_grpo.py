"""GRPO end to end on a micro model: the stage's outputs and metrics, its rollouts, and a regex
reward that training actually raises."""

import json

import pytest

from lmforge.align.stage import AlignConfig, align
from lmforge.artifacts import read_manifest
from lmforge.errors import ConfigError, InputError

WORDS = ["alpha", "beta", "gamma", "delta", "paris", "value", "number", "path"]
FAST = {"max_steps": 4, "seq_len": 48, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 1,
        "eval_every": 0, "ckpt_every": 0}  # fmt: skip


def _data(path, n=32, key="reference"):
    rows = [{"prompt": f"Say {w} {i}", key: f"The {w} is here."}
            for i, w in enumerate(WORDS * (n // len(WORDS)))]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, model_dir, rewards, train=None, **grpo):
    grpo = {"rewards": rewards, "num_generations": 4, "rollout_prompts": 2, "max_new_tokens": 6,
            "eval_prompts": 4, **grpo}  # fmt: skip
    return AlignConfig(
        model=model_dir, data=_data(tmp_path / "prompts.jsonl"), out=tmp_path / "grpo",
        method="grpo", train={**FAST, **(train or {})}, grpo=grpo,
        eval={"rouge_examples": 2, "max_new_tokens": 4},
    )  # fmt: skip


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_grpo_trains_and_writes_the_policy_and_its_reward_metrics(tmp_path, model_dir, tuning):
    rewards = [{"kind": "rouge_l"}, {"kind": "length", "max_tokens": 3, "weight": 0.1}]
    cfg = _cfg(tmp_path, model_dir, rewards, num_iterations=2, beta=0.1)
    out = align(cfg.model_copy(update={"tuning": tuning}))
    m = read_manifest(out)["metrics"]
    assert m["steps"] == 4 and (m["prompts"], m["val_prompts"]) == (29, 3)
    for key in ("val_reward", "val_reward_rouge_l", "val_reward_length", "val_answer_len"):
        assert key in m and f"{key}_before" in m
    assert m["val_reward_gain"] == pytest.approx(m["val_reward"] - m["val_reward_before"], abs=1e-4)
    assert m["val_kl"] != 0 and m["val_kl_before"] == pytest.approx(0, abs=1e-4)
    assert {"rouge_l", "ref_rouge_l"} <= set(m) and m["rouge_examples"] == 2
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "adapter").is_dir() == (tuning == "lora")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    logged = {"reward", "reward_std", "reward_group_std", "rewards/rouge_l/mean", "rewards/rouge_l/std",
              "rewards/length/mean", "frac_reward_zero_std", "clip_low", "clip_high", "kl"}  # fmt: skip
    assert len(steps) == 4 and logged <= set(steps[0])
    assert abs(steps[0]["kl"]) < 1e-5  # the first minibatch's policy is the reference
    # 8 answers per rollout served twice (num_iterations) in minibatches of 8: steps 0, 1 share
    assert steps[0]["reward"] == steps[1]["reward"]
    (final_eval,) = [r for r in rows if "val_loss" in r]  # minus the reward: exp() means nothing
    assert final_eval["val_reward"] == -final_eval["val_loss"] and "val_ppl" not in final_eval


def test_grpo_refuses_bad_settings_and_data_before_training(tmp_path, model_dir, monkeypatch):
    def sampled(*args, **kwargs):
        raise AssertionError("sampled before the settings were checked")

    for name in ("rouge_from_start", "heldout_groups"):  # refused before any greedy or held-out
        monkeypatch.setattr(f"lmforge.align.stage.{name}", sampled)
    with pytest.raises(ConfigError, match=r"needs grpo\.rewards"):
        align(_cfg(tmp_path, model_dir, []))
    with pytest.raises(ConfigError, match="= 12 answers per rollout must be a multiple"):
        align(
            _cfg(tmp_path, model_dir, [{"kind": "rouge_l"}], num_generations=3, rollout_prompts=4)
        )
    with pytest.raises(ConfigError, match=r"grpo\.rollout_prompts=40 exceeds the 29 training"):
        align(_cfg(tmp_path, model_dir, [{"kind": "rouge_l"}], rollout_prompts=40))
    with pytest.raises(ConfigError, match="max_new_tokens=4096 leaves no room for a prompt"):
        align(_cfg(tmp_path, model_dir, [{"kind": "rouge_l"}], max_new_tokens=4096))
    cfg = _cfg(tmp_path, model_dir, [{"kind": "exact"}])
    no_refs = _data(tmp_path / "bare.jsonl", key="note")
    with pytest.raises(InputError, match=r"bare\.jsonl line 1: no reference answer.*exact"):
        align(cfg.model_copy(update={"data": no_refs}))
    assert not (tmp_path / "grpo" / "manifest.json").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_regex_reward_rises_with_training(tmp_path, model_dir, seed):
    """A learnable toy task: answers must start with an ASCII letter (about 40% of the untrained
    micro model's samples do). Held-out: 16 prompts x 4 samples, the same before and after."""
    rewards = [{"kind": "regex", "pattern": "(?s)[A-Za-z].*"}]
    train = {"max_steps": 60, "lr": 1e-2, "seed": seed}
    cfg = _cfg(tmp_path, model_dir, rewards, train, num_generations=8, rollout_prompts=2,
               max_new_tokens=3, eval_prompts=16, eval_samples=4, scale_rewards="none")  # fmt: skip
    cfg = cfg.model_copy(update={"data": _data(tmp_path / "many.jsonl", n=160)})
    m = read_manifest(align(cfg))["metrics"]
    assert m["val_reward"] >= m["val_reward_before"] + 0.3
    assert m["val_reward"] == m["val_reward_regex"]  # one reward of weight 1: the total


def test_a_reward_model_reward_scores_as_ppo_does_and_a_non_reward_model_is_refused(
    tmp_path, model_dir
):
    from lmforge.align.config import RewardSpec
    from lmforge.align.ppo import load_reward_model, score
    from lmforge.align.rewards import Answers, build_rewards, score_answers
    from lmforge.finetune.sft import load_chat_tokenizer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}", "chosen": f"The {w}.",
                                         "rejected": "no no"}) + "\n" for w in WORDS))  # fmt: skip
    rm = align(AlignConfig(model=model_dir, data=pairs, out=tmp_path / "rm", method="reward",
                           train={**FAST, "max_steps": 2, "micro_batch_size": 4}))  # fmt: skip
    tok = load_chat_tokenizer(model_dir)
    spec = RewardSpec(kind="reward_model", model=rm, weight=2.0)
    (fn,) = build_rewards([spec], tok, vocab_size=tok.tokenizer.get_vocab_size(), seq_len=48)
    prompts = [[{"role": "user", "content": "Say beta"}]] * 2
    total, each = score_answers([fn], Answers(prompts, ["The beta.", "no no"], [None] * 2, [3, 2]))
    expected = score(load_reward_model(rm, tok.tokenizer.get_vocab_size(), tok), tok, prompts,
                     ["The beta.", "no no"], 48)  # fmt: skip
    assert each["reward_model"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert total.tolist() == pytest.approx((2 * expected).tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match=r"grpo\.rewards\[\]\.model=.* is not a reward model"):
        build_rewards([RewardSpec(kind="reward_model", model=model_dir)], tok, 0, 48)


def _one_prompt_rollouts(model_dir, **grpo):
    """(lm, GroupRollouts(seed, autocast dtype)) on one prompt repeated: only the sampling seed can
    tell two rollouts apart."""
    import torch

    from lmforge.align.config import GRPOOptions
    from lmforge.align.grpo import GroupRollouts
    from lmforge.align.grpo_data import PromptRecord
    from lmforge.align.rewards import build_rewards
    from lmforge.finetune.sft import load_chat_tokenizer
    from lmforge.model.convert import load_pretrained
    from lmforge.train.distributed import Runtime, dist_env

    tok, lm = load_chat_tokenizer(model_dir), load_pretrained(model_dir)
    records = [PromptRecord([{"role": "user", "content": "Say alpha"}], None, "x")] * 2
    opts = GRPOOptions(rewards=[{"kind": "length", "max_tokens": 2}], num_generations=4,
                       rollout_prompts=2, max_new_tokens=6, **grpo)  # fmt: skip
    rewards = build_rewards(opts.rewards, tok, lm.config.vocab_size, 48)

    def rollouts(seed, amp=None):  # on the loop's runtime, autocasting to amp
        rt = Runtime(torch.device("cpu"), amp, dist_env()) if amp is not None else None
        return GroupRollouts(lm, None, rewards, tok, records, opts, 8, seed, rt)

    return lm, rollouts


def test_rollouts_sample_by_train_seed_and_reproduce_at_one_seed(model_dir):
    _, rollouts = _one_prompt_rollouts(model_dir)

    def answers(seed):
        batch = next(rollouts(seed).loader)
        return sorted(map(tuple, batch["input_ids"].tolist()))

    assert answers(0) == answers(0)
    assert answers(0) != answers(1)


def test_old_and_reference_logps_are_scored_in_the_loops_autocast(model_dir):
    """bf16 autocast (train.dtype): the loss's first forward must give ratio 1 and KL 0 exactly."""
    import torch

    from lmforge.align.losses import token_logps

    lm, rollouts = _one_prompt_rollouts(model_dir, num_iterations=2, beta=0.1)
    batch = next(rollouts(0, torch.bfloat16).loader)
    lm.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps = token_logps(lm(batch["input_ids"]), batch["labels"])
    assert torch.equal(batch["old_logps"], logps)
    assert torch.equal(batch["ref_logps"], logps)  # no adapters: the policy is its own base
    with torch.no_grad():
        assert not torch.equal(token_logps(lm(batch["input_ids"]), batch["labels"]), logps)


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_held_out_rollouts_before_and_after_share_the_loops_device_and_autocast(
    tmp_path, model_dir, tuning, monkeypatch
):
    """train.dtype=bf16 on the CPU: the "before" rollout runs as the loop's evaluations do."""
    import torch

    from lmforge.align import stage

    seen, real = [], stage.heldout_groups

    def recorded(lm, **kwargs):
        device = next(lm.parameters()).device
        seen.append((device, torch.is_autocast_enabled(device.type),
                     torch.get_autocast_dtype(device.type), lm.training))  # fmt: skip
        return real(lm, **kwargs)

    monkeypatch.setattr(stage, "heldout_groups", recorded)
    cfg = _cfg(tmp_path, model_dir, [{"kind": "length", "max_tokens": 3}], {"dtype": "bf16"})
    m = read_manifest(align(cfg.model_copy(update={"tuning": tuning})))["metrics"]
    # before training and the loop's last evaluation, which "after" reuses: one runtime
    assert seen == [(torch.device("cpu"), True, torch.bfloat16, False)] * 2
    assert "val_reward_before" in m and "val_reward" in m


def test_prompts_cut_to_fit_beside_the_answer_are_counted_in_one_warning(
    tmp_path, model_dir, caplog
):
    """micro block_size 128 - max_new_tokens 100 leaves 28 prompt tokens: the long prompts are
    truncated keeping their end, and the log says how many, once."""
    cfg = _cfg(tmp_path, model_dir, [{"kind": "length", "max_tokens": 3}], max_new_tokens=100)
    long = [{"prompt": f"Say {w} " + "again and again " * 8, "reference": "x"} for w in WORDS[:5]]
    with open(cfg.data, "a") as fh:  # 32 short prompts (26 tokens) and 5 long ones (113)
        fh.write("".join(json.dumps(r) + "\n" for r in long))
    align(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warning.startswith("grpo: 5 of 37 prompts are longer than the 28 tokens")
    assert "grpo.max_new_tokens=100" in warning and "their start dropped" in warning
