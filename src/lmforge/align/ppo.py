"""PPO (RLHF): a policy with a value head, rewards from the reward model, a KL penalty to a frozen
reference, GAE and the clipped objective, trained through the one loop.

The loop's "loader" is `Rollouts(...).loader` (align.rollout.RolloutLoader): every `ppo_epochs *
minibatches` steps it samples answers to a batch of prompts with the current policy (model.generate,
KV cache), scores them with the reward model, and computes old log-probs, reference log-probs,
values, per-token rewards (a KL penalty on every answer token, the reward model's score on the last)
and GAE advantages; in between it hands the loop shuffled minibatches of that rollout, so the later
ones meet a policy that has moved and the clip matters. With a LoRA policy the reference is the same
model with its adapters switched off (one copy of the base in memory); with full tuning it is a
frozen copy.

Batches are (B, T) aligned to logits: at position t the action is token t + 1 (mask `actions`).
Resume from a checkpoint samples the rollout in progress anew (its prompts and seed, the resumed
policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.align.encode import encode_reply, refuse_other_vocab
from lmforge.align.losses import (
    gae,
    masked_mean,
    ppo_policy_loss,
    token_logps,
    value_loss,
    whiten,
)
from lmforge.align.reward import reward_model
from lmforge.align.rollout import (
    RolloutLoader,
    answer_rows,
    answer_texts,
    eval_mode,
    reference_logps,
    sample_answers,
    standard_error,
)
from lmforge.errors import ConfigError
from lmforge.finetune.heads import pooled_index
from lmforge.model.transformer import IGNORE_INDEX
from lmforge.train.distributed import Runtime
from lmforge.train.loop import autocast


class PolicyWithValue(nn.Module):
    """The policy LM plus `value_head`: Linear(n_embd, 1) on every position's hidden state."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.value_head = nn.Linear(lm.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), values (B, T))."""
        h = self.lm.hidden_states(idx)
        return self.lm.lm_head(h), self.value_head(h).squeeze(-1).float()


def load_reward_model(
    path: Path, vocab_size: int, tok: Any, role: str = "ppo.reward_model"
) -> nn.Module:
    """The reward stage's final/ (a 1-label classifier) as a frozen SequenceClassifier.

    It scores the policy's token ids at the last token (align.ppo.score), so it must be a decoder
    (an encoder pools [CLS] of its own template) reading the policy's vocabulary (tok's). Its
    `input_len`: the seq_len its pairs were cut at (config.json records it), None if unrecorded.
    Errors name the setting that pointed at it (`role`).
    """
    from lmforge.evals.heads import recorded_input_len
    from lmforge.model.convert import load_classifier, load_pretrained, resolve_model_dir
    from lmforge.tokenizer.files import TokenizerFiles

    path = resolve_model_dir(path)
    head = load_classifier(path)
    if head is None or head.weight.shape[0] != 1:
        raise ConfigError(
            f"{role}={path} is not a reward model (a 1-label classifier); "
            "train one with: lmforge align --method reward"
        )
    refuse_other_vocab(  # before loading the weights
        TokenizerFiles.load(path), tok, role,
        "train the reward model on the policy's base model (lmforge align --method reward)",
    )  # fmt: skip
    lm = load_pretrained(path, quantized="dequantize")
    if not lm.config.causal or head.pool_weight is not None or head.pooling == "mean":
        raise ConfigError(
            f"{role}={path} is an encoder classifier: a reward model scores the "
            "policy's token ids at the last token, as a decoder; train one with: lmforge align "
            "--method reward --model <the policy's base model>"
        )
    if lm.config.vocab_size != vocab_size:
        raise ConfigError(
            f"{role} vocab_size {lm.config.vocab_size} differs from the policy's "
            f"{vocab_size}: the reward model must share the policy's tokenizer"
        )
    model = reward_model(lm)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
    model.input_len = recorded_input_len(path, lm.config.block_size)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def score(
    reward: nn.Module, tok: Any, prompts: list, answers: list[str], seq_len: int,
    tool_conversations: list | None = None,
) -> Tensor:  # fmt: skip
    """Reward of each (prompt, answer), encoded exactly as the reward model was trained: a tool
    conversation (tool_conversations, one per prompt or None) as its pairs were rendered, cut at
    the length its pairs were cut at (reward.input_len) when the PPO run's seq_len is longer."""
    device = next(reward.parameters()).device
    cut = min(seq_len, reward.input_len or seq_len)
    tooled = tool_conversations or [None] * len(prompts)
    enc = [encode_reply(tok, p, a, cut, t)[0]
           for p, a, t in zip(prompts, answers, tooled, strict=True)]  # fmt: skip
    ids = torch.full((len(enc), max(map(len, enc))), tok.pad_id, dtype=torch.long)
    for r, row in enumerate(enc):
        ids[r, : len(row)] = torch.tensor(row)
    last = torch.tensor([pooled_index(row, tok.pad_id) for row in enc])
    return reward(ids.to(device), last.to(device))[0].squeeze(-1).float()


class Rollouts:
    """What a PPO rollout reads (policy, reference, reward model, prompts: PromptRecords,
    settings); `loader` serves fresh rollouts of the current policy to the loop as minibatches."""

    def __init__(
        self, policy: PolicyWithValue, reference: nn.Module | None, reward: nn.Module, tok: Any,
        prompts: list, opts: Any, batch_size: int, seq_len: int, seed: int,
        rt: Runtime | None = None,
    ) -> None:  # fmt: skip
        if opts.rollout_prompts % batch_size:
            raise ConfigError(
                f"ppo.rollout_prompts={opts.rollout_prompts} must be a multiple of "
                f"train.micro_batch_size={batch_size}"
            )
        self.policy, self.reference, self.reward, self.tok = policy, reference, reward, tok
        self.prompts, self.opts, self.seq_len = prompts, opts, seq_len
        self.rt = rt  # the loop's runtime: old log-probs and values in its autocast's numerics
        n = opts.rollout_prompts
        self.loader = RolloutLoader(
            lambda chosen, seed: make_rollout(self, [prompts[i] for i in chosen], seed),
            len(prompts), n, n, opts.ppo_epochs, batch_size, seed, "ppo.rollout_prompts",
        )  # fmt: skip


@torch.no_grad()
def make_rollout(src: Rollouts, prompts: list, seed: int) -> dict[str, Tensor]:
    """Samples, scores and prices one batch of answers; every tensor is (N, T) or (N,)."""
    opts, tok, policy = src.opts, src.tok, src.policy
    device = next(policy.parameters()).device
    with eval_mode(policy):
        prompt_ids, answers = sample_answers(
            policy.lm, tok, prompts, opts.max_new_tokens, seed, opts.temperature
        )
        scores = score(src.reward.to(device), tok, [r.prompt for r in prompts],
                       answer_texts(tok, answers), src.seq_len,
                       [r.tool_conversation for r in prompts])  # fmt: skip
        ids, labels = answer_rows(prompt_ids, answers, tok.pad_id)
        ids, labels = ids.to(device), labels.to(device)
        with autocast(src.rt):
            logits, values = policy(ids)
            old_logps = token_logps(logits, labels)
            ref_logps = reference_logps(policy.lm, src.reference, ids, labels)
    actions = labels != IGNORE_INDEX
    kl = (old_logps - ref_logps) * actions
    rewards = -opts.kl_coef * kl
    last = actions.long().cumsum(1).argmax(1)  # each row's last action position
    has_action = actions.any(1)
    priced = whiten(scores) if opts.reward_norm == "batch" else scores
    rewards[has_action, last[has_action]] += priced[has_action]
    adv, returns = gae(rewards, values, actions, opts.gamma, opts.lam)
    mean, std = (
        masked_mean(adv, actions),
        masked_mean((adv - masked_mean(adv, actions)) ** 2, actions).sqrt(),
    )
    adv = (adv - mean) / (std + 1e-8) * actions
    entropy = -(torch.softmax(logits.float(), -1) * torch.log_softmax(logits.float(), -1)).sum(-1)
    rollout = {
        "input_ids": ids, "labels": labels, "old_logps": old_logps, "old_values": values,
        "advantages": adv, "returns": returns, "score": scores, "kl": kl.sum(1),
        "entropy": (entropy * actions).sum(1) / actions.sum(1).clamp(min=1),
        "answer_len": actions.sum(1).float(),
    }  # fmt: skip
    return {k: v.cpu() for k, v in rollout.items()}  # the loop moves batches to the device


def make_ppo_loss(clip: float, vf_coef: float, vf_clip: float):
    """loss_fn for the loop: clipped surrogate + vf_coef * clipped value loss; logs the rollout's
    reward, KL to the reference, entropy, answer length and the clip fraction."""

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits, values = model(batch["input_ids"])
        actions = batch["labels"] != IGNORE_INDEX
        logps = token_logps(logits, batch["labels"])
        pg, clipfrac = ppo_policy_loss(
            logps, batch["old_logps"], batch["advantages"], actions, clip
        )
        vf = value_loss(values, batch["old_values"], batch["returns"], actions, vf_clip)
        return pg + vf_coef * vf, {
            "reward": batch["score"].mean(), "kl": batch["kl"].mean(),
            "entropy": batch["entropy"].mean(), "answer_len": batch["answer_len"].mean(),
            "clipfrac": clipfrac, "pg_loss": pg.detach(), "vf_loss": vf.detach(),
        }  # fmt: skip

    return loss_fn


@torch.no_grad()
def heldout_rollout(
    policy: PolicyWithValue,
    reference: nn.Module | None,
    reward: nn.Module,
    tok: Any,
    prompts: list,
    opts: Any,
    seq_len: int,
) -> dict[str, Tensor]:
    """make_rollout of opts.eval_samples answers per held-out prompt, sampled with a fixed seed,
    plus "prompt_reward" (P,): each prompt's mean reward, so that two policies' rollouts can be
    compared prompt by prompt (the prompts differ far more than two policies do)."""
    n = opts.eval_samples
    rows = [p for p in prompts for _ in range(n)]  # each row samples from its own generator
    src = Rollouts(policy, reference, reward, tok, rows, opts.model_copy(
        update={"rollout_prompts": len(rows), "ppo_epochs": 1}), len(rows), seq_len, 0)  # fmt: skip
    rollout = make_rollout(src, rows, seed=10**6)
    rollout["prompt_reward"] = rollout["score"].view(len(prompts), n).mean(1)
    return rollout


def rollout_metrics(rollout: dict[str, Tensor]) -> dict[str, float]:
    """Mean reward (± its standard error over prompts), KL to the reference, entropy and answer
    length of a held-out rollout (one sample of 32 prompts is about +-0.5 on the quickstart, as
    large as PPO's effect: raise ppo.eval_prompts / ppo.eval_samples); val_loss is minus the mean reward, so the loop's best-val
    tracking follows the reward."""
    reward_mean = float(rollout["prompt_reward"].mean())
    return {
        "val_loss": -reward_mean, "val_reward": reward_mean,
        "val_reward_se": standard_error(rollout["prompt_reward"]),
        "val_kl": float(rollout["kl"].mean()), "val_entropy": float(rollout["entropy"].mean()),
        "val_answer_len": float(rollout["answer_len"].mean()),
    }  # fmt: skip
