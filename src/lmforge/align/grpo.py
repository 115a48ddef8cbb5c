"""GRPO (Shao et al., 2024): no value head and no learned critic; each prompt's answers are
judged against each other, trained through the one loop.

The loop's "loader" is `GroupRollouts(...).loader` (align.rollout.RolloutLoader): every
`num_iterations * rows / micro_batch_size` steps it picks `rollout_prompts` prompts, samples
`num_generations` answers to each with the current policy (align.rollout, KV cache), scores them
with the weighted reward functions (align.rewards) and turns the total into group-relative
advantages (align.losses.group_advantages); in between it hands the loop shuffled minibatches of
those answers. Old log-probs are scored at sampling time when the rollout serves more than one step
(later minibatches then meet a moved policy and the clip matters); with one step per rollout the
ratio is exactly 1 and they are the current ones. With beta > 0 the reference's log-probs are scored
too: a LoRA policy's own base (adapters off), else a frozen copy of the starting model. Resume
samples the rollout in progress anew (its prompts and seed, the resumed policy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmforge.align.grpo_data import PromptRecord
from lmforge.align.losses import group_advantages, grpo_loss, token_logps
from lmforge.align.rewards import Answers, RewardFn, reward_stats, score_answers, to_device
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
from lmforge.finetune.lora import lora_modules
from lmforge.model.transformer import IGNORE_INDEX
from lmforge.train.distributed import Runtime
from lmforge.train.loop import autocast

LOGGED = "log/"  # rollout columns holding one rollout-wide number, logged by the loss


class GroupRollouts:
    """What a GRPO rollout reads (policy, reference, reward functions, prompts, settings);
    `loader` serves fresh groups of answers of the current policy to the loop as minibatches."""

    def __init__(
        self, lm: nn.Module, reference: nn.Module | None, rewards: list[RewardFn], tok: Any,
        records: list[PromptRecord], opts: Any, batch_size: int, seed: int,
        rt: Runtime | None = None,
    ) -> None:  # fmt: skip
        rows = opts.rollout_prompts * opts.num_generations
        if rows % batch_size:
            raise ConfigError(
                f"grpo.rollout_prompts * grpo.num_generations = {rows} answers per rollout "
                f"must be a multiple of train.micro_batch_size={batch_size}"
            )
        self.lm, self.reference, self.rewards, self.tok = lm, reference, rewards, tok
        self.opts, self.rt = opts, rt  # the loop's runtime: its autocast scores log-probs
        self.loader = RolloutLoader(
            lambda chosen, seed: make_group_rollout(self, [records[i] for i in chosen], seed),
            len(records), opts.rollout_prompts, rows, opts.num_iterations, batch_size, seed,
            "grpo.rollout_prompts",
        )  # fmt: skip


def sample_and_score(
    lm: nn.Module, tok: Any, rewards: list[RewardFn], records: list[PromptRecord], opts: Any,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """(input_ids, labels, total reward (N,), each function's rewards) of one answer sampled
    per record (repeat a record for a group), in eval mode, on the policy's device."""
    device = next(lm.parameters()).device
    prompts = [r.prompt for r in records]  # role/content turns; tool ones also in OpenAI form
    with eval_mode(lm):
        prompt_ids, answers = sample_answers(
            lm, tok, records, opts.max_new_tokens, seed, opts.temperature
        )
    stops = set(tok.stop_ids())
    lengths = [sum(t not in stops for t in a) for a in answers]
    to_device(rewards, device)
    batch = Answers(prompts, answer_texts(tok, answers), [r.reference for r in records], lengths,
                    [r.code for r in records], [r.tool_conversation for r in records],
                    answer_texts(tok, answers, strip=False))  # fmt: skip
    total, each = score_answers(rewards, batch)
    ids, labels = answer_rows(prompt_ids, answers, tok.pad_id)
    return ids.to(device), labels.to(device), total, each


@torch.no_grad()
def make_group_rollout(src: GroupRollouts, records: list[PromptRecord], seed: int):
    """Samples, scores and prices num_generations answers per record: tensors (N, T) or (N,),
    rows grouped by prompt; `log/` columns repeat rollout-wide statistics on every row."""
    opts, G = src.opts, src.opts.num_generations
    rows = [r for r in records for _ in range(G)]  # each row samples from its own generator
    ids, labels, total, each = sample_and_score(src.lm, src.tok, src.rewards, rows, opts, seed)
    adv, zero_std = group_advantages(total, G, opts.scale_rewards)
    stats = reward_stats(total, each)
    stats["reward_std"] = float(total.std())  # over the rollout, as TRL's
    stats["reward_group_std"] = float(total.view(-1, G).std(1).mean())  # what advantages see
    stats["frac_reward_zero_std"] = float(zero_std.float().mean())  # per group, any scaling
    rollout = {"input_ids": ids, "labels": labels, "advantages": adv.to(ids.device)}
    # as PPO scores its rollouts: no dropout noise in the ratio, the loss's autocast
    with eval_mode(src.lm), autocast(src.rt):
        if src.loader.steps_per_rollout > 1:
            rollout["old_logps"] = token_logps(src.lm(ids), labels)
        if opts.beta:
            rollout["ref_logps"] = reference_logps(src.lm, src.reference, ids, labels)
    n = len(rows)
    rollout.update({LOGGED + k: torch.full((n,), v) for k, v in stats.items()})
    rollout[LOGGED + "answer_len"] = (labels != IGNORE_INDEX).sum(1).float().cpu()
    return {k: v.cpu() for k, v in rollout.items()}  # the loop moves batches to the device


def make_grpo_loss(opts: Any):
    """loss_fn for the loop: align.losses.grpo_loss on a minibatch of answers; logs the rollout's
    reward (total and per function, mean and std), its share of zero-std groups, the answer
    length, clip fractions and (beta > 0) the KL to the reference."""
    eps_high = opts.epsilon_high if opts.epsilon_high is not None else opts.epsilon

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch["labels"]
        logps = token_logps(model(batch["input_ids"]), labels)
        old = batch.get("old_logps", logps.detach())
        loss, stats = grpo_loss(
            logps, old, batch["advantages"], labels != IGNORE_INDEX, opts.epsilon, eps_high,
            opts.loss_type, batch.get("ref_logps"), opts.beta, opts.max_new_tokens,
        )  # fmt: skip
        logged = {k[len(LOGGED) :]: v.mean() for k, v in batch.items() if k.startswith(LOGGED)}
        return loss, {**logged, **stats}

    return loss_fn


@torch.no_grad()
def heldout_groups(
    lm: nn.Module, reference: nn.Module | None, rewards: list[RewardFn], tok: Any,
    records: list[PromptRecord], opts: Any,
) -> dict[str, Tensor]:  # fmt: skip
    """opts.eval_samples answers per held-out prompt, sampled with a fixed seed: each function's
    rewards (N,), the total, "prompt_reward" (P,) (each prompt's mean, for a gain paired by
    prompt), answer lengths and, when a reference is at hand (LoRA's base, or a frozen copy),
    each answer's summed log-ratio to it (KL)."""
    n = opts.eval_samples
    rows = [r for r in records for _ in range(n)]
    ids, labels, total, each = sample_and_score(lm, tok, rewards, rows, opts, seed=10**6)
    out = {f"reward/{k}": v for k, v in each.items()}
    out.update(total=total, prompt_reward=total.view(len(records), n).mean(1))
    out["answer_len"] = (labels != IGNORE_INDEX).sum(1).float().cpu()
    if reference is not None or lora_modules(lm):
        with eval_mode(lm):
            logps = token_logps(lm(ids), labels)
            out["kl"] = (logps - reference_logps(lm, reference, ids, labels)).sum(1).cpu()
    return out


def group_metrics(held: dict[str, Tensor]) -> dict[str, float]:
    """Mean reward (+- its standard error over prompts), each function's mean, answer length and
    KL of held-out answers; val_loss is minus the mean reward (the loop's best-val follows it)."""
    mean = float(held["prompt_reward"].mean())
    metrics = {"val_loss": -mean, "val_reward": mean,
               "val_reward_se": standard_error(held["prompt_reward"]),
               "val_answer_len": float(held["answer_len"].mean())}  # fmt: skip
    for key, values in held.items():
        if key.startswith("reward/"):
            metrics[f"val_reward_{key[len('reward/') :]}"] = float(values.mean())
    if "kl" in held:
        metrics["val_kl"] = float(held["kl"].mean())
    return metrics
