"""The `align` stage: a reward model, or a policy by DPO/IPO, SimPO, ORPO, PPO or GRPO, in the
one loop.

Inputs: a model directory in Hugging Face layout with its tokenizer files (usually the SFT
model) and preference data (align.prefs; PPO reads only the prompts). method=reward trains the
Transformer with a scalar head on Bradley-Terry and writes final/ as a *ForSequenceClassification
with num_labels=1. method=dpo trains the policy (full, or LoRA adapters over the frozen base)
against reference log-probs scored once before training. method=simpo|orpo train it on its own
length-normalised log-probs (align.ref_free): no reference model is loaded or scored.
method=ppo samples answers, scores them with a reward model (ppo.reward_model) and trains
policy + value head (align.ppo). method=kto trains the policy on unpaired desirable/undesirable
examples (align.unpaired; pairs are unpaired) against the starting model (align.kto).
method=grpo samples groups of answers per prompt, scores them with weighted verifiable rewards
(align.rewards) and trains on group-relative advantages (align.grpo). Policies are
written to final/ as a causal LM (+ adapter/ for LoRA). Headline metrics: held-out pairwise
accuracy, per kind too (reward); preference accuracy, implicit reward margin, chosen-over-rejected
log-prob margin of policy and reference, greedy ROUGE-L of policy and reference (dpo; simpo and
orpo: the same numbers, the "reference" being the starting model scored before training; kto:
the same plus each label's mean implicit reward and their AUC); mean
reward (+- its standard error), KL to the reference, entropy and answer length of sampled
held-out answers, before and after, and the reward gain paired by prompt (ppo; grpo the same,
per reward function too, with greedy ROUGE-L where records carry a reference).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.align.config import AlignConfig
from lmforge.align.dpo import evaluate_dpo, load_reference, make_dpo_loss, reference_logps
from lmforge.align.dropout import disable_dropout
from lmforge.align.encode import encode_pairs
from lmforge.align.grpo import GroupRollouts, group_metrics, heldout_groups, make_grpo_loss
from lmforge.align.grpo_data import load_prompt_records, require_references, require_tests
from lmforge.align.kto import balance_warning, encode_unpaired, evaluate_kto, make_kto_loss
from lmforge.align.ppo import (
    PolicyWithValue,
    Rollouts,
    heldout_rollout,
    load_reward_model,
    make_ppo_loss,
    rollout_metrics,
)
from lmforge.align.prefs import load_pairs
from lmforge.align.ref_free import RefFreeSpec, evaluate_ref_free, make_ref_free_loss
from lmforge.align.reward import evaluate_rewards, reward_loss, reward_model
from lmforge.align.rewards import build_rewards
from lmforge.align.rollout import (
    HeldOutEval,
    cut_prompts_warning,
    frozen_copy,
    reward_headline,
)
from lmforge.align.rouge import rouge_beside_reference, rouge_examples, rouge_from_start
from lmforge.align.unpaired import load_unpaired_groups
from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.logging import read_metrics
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.export import export_model
from lmforge.finetune.lora import inject, trainable_fraction
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.train.checkpoint import forget_other_runs
from lmforge.train.distributed import Runtime, setup_runtime
from lmforge.train.loader import RowBatches
from lmforge.train.loop import autocast, train
from lmforge.train.observe import plot_losses

MODEL_HINT = "lmforge finetune --model DIR --data FILE --out DIR (its final/ directory)"


def align(cfg: AlignConfig, force: bool = False) -> Path:
    """Runs (or reuses) the align stage; returns its directory (final/ holds the model)."""
    return run_stage("align", cfg, build, force=force).out


def load_splits(cfg: AlignConfig, read: Any = load_pairs) -> tuple[list, list]:
    """(train, val) records read from data: val from val_data, else a seeded share of data."""
    items = read(cfg.data)
    if cfg.val_data is not None:
        return items, read(cfg.val_data)
    order = np.random.default_rng(cfg.train.seed).permutation(len(items))
    n_val = max(1, round(cfg.eval.val_fraction * len(items)))
    if len(items) - n_val < 1:
        raise InputError(f"{cfg.data}: only {len(items)} records, too few to hold out validation")
    held = set(order[:n_val].tolist())
    return [p for i, p in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def load_prompt_splits(cfg: AlignConfig) -> tuple[list, list]:
    """PPO's (train, held-out) prompts (PromptRecords; their references unused); at most
    ppo.eval_prompts held out are scored."""
    prompts, val = load_splits(cfg, load_prompt_records)
    return prompts, val[: cfg.ppo.eval_prompts]


def build(cfg: AlignConfig, ctx: StageContext) -> dict[str, Any]:
    """Loads the model, trains it by the method with the one loop, writes final/; headlines."""
    from lmforge.model.convert import load_pretrained

    model_dir = cfg.model_dir()
    require_artifact(model_dir, ["config.json"], hint=MODEL_HINT)
    if cfg.method == "ppo" and cfg.ppo.reward_model is None:
        raise ConfigError("--method ppo needs ppo.reward_model (an `align --method reward` dir)")
    tok = load_chat_tokenizer(model_dir)
    forget_other_runs(ctx.out / "checkpoints", ctx.run_hash)
    lm = load_pretrained(model_dir, quantized="dequantize").train()
    if cfg.method != "reward" and not lm.config.causal:
        raise ConfigError(
            f"--method {cfg.method} tunes a causal LM's reply log-probs; {model_dir} is an "
            "encoder (causal=False), which reads every token it would be scored on: start from "
            f"a causal model ({MODEL_HINT})"
        )
    if cfg.train.seq_len > lm.config.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size="
            f"{lm.config.block_size}; lower train.seq_len"
        )
    rt = _loop_runtime(cfg, lm)
    method = {"reward": _reward, "dpo": _dpo, "simpo": _ref_free, "orpo": _ref_free, "ppo": _ppo,
              "kto": _kto, "grpo": _grpo}  # fmt: skip
    model, headline = method[cfg.method](cfg, ctx, tok, lm, rt)
    _write_outputs(cfg, ctx, tok, model, lm)
    return headline


def _pair_rows(cfg: AlignConfig, ctx: StageContext, tok: Any) -> tuple[dict, dict, list, dict]:
    """(train rows, val rows, val pairs, headline counts) of the preference data."""
    train_pairs, val_pairs = load_splits(cfg)
    train_rows, stats, _ = encode_pairs(tok, train_pairs, cfg.train.seq_len)
    val_rows, val_stats, kept = encode_pairs(tok, val_pairs, cfg.train.seq_len)
    kinds = [val_pairs[i].get("kind", "") for i in kept]  # the synthetic pairs carry one
    ctx.log.info("align %s/%s: train %s, val %s", cfg.method, cfg.tuning, stats, val_stats)
    counts = {"train_pairs": stats["pairs"], "val_pairs": val_stats["pairs"],
              "val_kinds": kinds if any(kinds) else None}  # fmt: skip
    return train_rows, val_rows, val_pairs, counts


def _fit(
    cfg: AlignConfig, ctx: StageContext, model: Any, loss_fn: Any, loader: Any, eval_fn: Any,
    rt: Runtime,
):  # fmt: skip
    """The one loop on rt (_loop_runtime's, which a rollout loader shares too), and the headline
    numbers every method shares."""
    if cfg.disable_dropout:
        disable_dropout(model)  # after _adapt: the LoRA adapters' dropout too
    result = train(model, loss_fn, loader, cfg.train, ctx, eval_fn=eval_fn, perplexity=False,
                   runtime=rt)  # fmt: skip
    trainable, total = trainable_fraction(result.model)
    headline = {
        "steps": result.step, "train_loss": _round(result.train_loss),
        "trainable_fraction": round(trainable / total, 5), "resumed_from_step": result.resumed_from,
    }  # fmt: skip
    return result.model, headline


def _loop_runtime(cfg: AlignConfig, lm: Any) -> Runtime:
    """The loop's runtime, lm moved to its device before anything is scored: what the methods
    score before training (reference log-probs and "before" numbers, under autocast(rt) as the
    loss, the loop's evaluations and the "after" numbers; the start's greedy ROUGE-L, without
    autocast as the trained model's) runs on the loop's device, as fast and as precise."""
    rt = setup_runtime(cfg.train)
    lm.to(rt.device)
    return rt


def _adapt(cfg: AlignConfig, lm: Any) -> None:
    torch.manual_seed(cfg.train.seed)  # adapters and heads start the same on resume
    if cfg.tuning == "lora":
        inject(lm, cfg.lora)


def _reward(
    cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime
) -> tuple[Any, dict]:
    """Bradley-Terry reward model; held-out pairwise accuracy before (random head) and after."""
    train_rows, val_rows, _, headline = _pair_rows(cfg, ctx, tok)
    kinds, bs = headline.pop("val_kinds"), cfg.eval.batch_size
    _adapt(cfg, lm)
    model = reward_model(lm).to(rt.device)
    with autocast(rt):
        before = evaluate_rewards(model, val_rows, bs)
    loader = RowBatches(train_rows, cfg.train.micro_batch_size, seed=cfg.train.seed)
    evaluate = partial(evaluate_rewards, rows=val_rows, batch_size=bs, limit=cfg.train.eval_steps)
    model, fit = _fit(cfg, ctx, model, reward_loss, loader, evaluate, rt)
    with autocast(rt):
        after = evaluate_rewards(model, val_rows, bs, kinds=kinds)
    headline.update(fit, **{k: _round(v) for k, v in after.items()})
    headline["base_val_pair_accuracy"] = _round(before["val_pair_accuracy"])
    return model, headline


def _dpo(cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime) -> tuple[Any, dict]:
    """DPO/IPO against reference log-probs scored once; log-prob margins and ROUGE-L."""

    train_rows, val_rows, val_pairs, headline = _pair_rows(cfg, ctx, tok)
    headline.pop("val_kinds")
    bs, beta, kind, eps = cfg.eval.batch_size, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.label_smoothing
    ref = load_reference(cfg.dpo.reference, tok).to(rt.device) if cfg.dpo.reference else lm
    with autocast(rt):  # as the loss scores the policy against them
        train_rows["ref_logps"] = reference_logps(ref, train_rows, bs)
        val_rows["ref_logps"] = reference_logps(ref, val_rows, bs)
    del ref  # its log-probs are all training needs: one model in memory (ROUGE reloads it)
    lm.train()
    _adapt(cfg, lm)
    loader = RowBatches(train_rows, cfg.train.micro_batch_size, seed=cfg.train.seed)
    evaluate = partial(evaluate_dpo, rows=val_rows, batch_size=bs, beta=beta, kind=kind,
                       limit=cfg.train.eval_steps, label_smoothing=eps)  # fmt: skip
    model, fit = _fit(cfg, ctx, lm, make_dpo_loss(beta, kind, cfg.dpo.sft_weight, eps), loader,
                      evaluate, rt)  # fmt: skip
    with autocast(rt):
        after = evaluate_dpo(model, val_rows, bs, beta, kind, label_smoothing=eps)
    headline.update(fit, **{k: _round(v) for k, v in after.items()})
    headline.update(rouge_beside_reference(cfg, tok, model, val_pairs))
    return model, headline


def _ref_free(
    cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime
) -> tuple[Any, dict]:
    """SimPO or ORPO on the policy's own log-probs; the starting model's numbers are scored
    before training (from the same weights, so no second copy is loaded for them)."""
    train_rows, val_rows, val_pairs, headline = _pair_rows(cfg, ctx, tok)
    headline.pop("val_kinds")
    spec = RefFreeSpec(cfg.method, cfg.simpo.beta, cfg.simpo.gamma, cfg.orpo.lam)
    bs = cfg.eval.batch_size
    with autocast(rt):
        before = evaluate_ref_free(lm, val_rows, bs, spec)
    rouge = rouge_from_start(cfg, tok, lm, rouge_examples(cfg, val_pairs))
    lm.train()
    _adapt(cfg, lm)
    loader = RowBatches(train_rows, cfg.train.micro_batch_size, seed=cfg.train.seed)
    evaluate = partial(evaluate_ref_free, rows=val_rows, batch_size=bs, spec=spec,
                       limit=cfg.train.eval_steps)  # fmt: skip
    model, fit = _fit(cfg, ctx, lm, make_ref_free_loss(spec), loader, evaluate, rt)
    with autocast(rt):
        after = evaluate_ref_free(model, val_rows, bs, spec)
    headline.update(fit, **{k: _round(v) for k, v in after.items()})
    headline.update({f"ref_{k[4:]}": _round(before[k]) for k in (
        "val_logp_margin", "val_pref_accuracy", "val_reward_margin")})  # fmt: skip
    headline.update(rouge(model))
    return model, headline


def _kto(cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime) -> tuple[Any, dict]:
    """KTO on unpaired examples against the starting model's log-probs, scored once (the
    mismatched KL rows too); the same headline as DPO's plus each label's reward and AUC."""
    opts, bs, seed = cfg.kto, cfg.eval.batch_size, cfg.train.seed
    thresholds = {k: getattr(opts, k) for k in ("desirable_min_rating", "undesirable_max_rating")}
    train, val = ([e for g in groups for e in g] for groups in load_splits(
        cfg, partial(load_unpaired_groups, options=thresholds)))  # fmt: skip
    train_rows, counts = encode_unpaired(tok, train, cfg.train.seq_len, seed)
    val_rows, val_counts = encode_unpaired(tok, val, cfg.train.seq_len, seed, "held-out")
    ctx.log.info("align kto/%s: train %s, val %s", cfg.tuning, counts, val_counts)
    if warning := balance_warning(counts, opts):
        ctx.log.warning(warning)
    with autocast(rt):  # as the loss scores the policy against them
        train_rows["ref_logps"] = reference_logps(lm, train_rows, bs)
        val_rows["ref_logps"] = reference_logps(lm, val_rows, bs)
    lm.train()
    _adapt(cfg, lm)
    loader = RowBatches(train_rows, cfg.train.micro_batch_size, seed=seed)
    evaluate = partial(evaluate_kto, rows=val_rows, batch_size=bs, opts=opts,
                       limit=cfg.train.eval_steps)  # fmt: skip
    model, fit = _fit(cfg, ctx, lm, make_kto_loss(opts), loader, evaluate, rt)
    with autocast(rt):
        after = evaluate_kto(model, val_rows, bs, opts)
    headline = {f"{split}_{k}": c[k] for split, c in (("train", counts), ("val", val_counts))
                for k in ("desirable", "undesirable")}  # fmt: skip
    headline.update(fit, **{k: _round(v) for k, v in after.items()})
    # ROUGE-L on every held-out record's desirable completion, as DPO's on every held-out pair
    good = [e for e in val if e["desirable"]]
    headline.update(rouge_beside_reference(cfg, tok, model, good, reply="completion"))
    return model, headline


def _ppo(cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime) -> tuple[Any, dict]:
    """PPO against the reward model; held-out mean reward and KL before and after."""
    opts, seq_len = cfg.ppo, cfg.train.seq_len
    prompts, val_prompts = load_prompt_splits(cfg)
    reward = load_reward_model(opts.reward_model, lm.config.vocab_size, tok)
    reference = frozen_copy(lm) if cfg.tuning == "full" else None  # LoRA: the base itself
    if warning := cut_prompts_warning(lm, tok, prompts + val_prompts, opts.max_new_tokens,
                                      "ppo.max_new_tokens"):  # fmt: skip
        ctx.log.warning(warning)
    _adapt(cfg, lm)
    policy = PolicyWithValue(lm)
    loader = Rollouts(policy, reference, reward, tok, prompts, opts, cfg.train.micro_batch_size,
                      seq_len, cfg.train.seed, rt).loader  # fmt: skip
    held_out = partial(heldout_rollout, reference=reference, reward=reward, tok=tok,
                       prompts=val_prompts, opts=opts, seq_len=seq_len)  # fmt: skip
    policy, fit = _fit_rollouts(
        cfg, ctx, rt, policy, held_out, rollout_metrics,
        make_ppo_loss(opts.clip, opts.vf_coef, opts.vf_clip), loader,
        before_keys=["val_reward", "val_reward_se", "val_kl", "val_answer_len"],
    )  # fmt: skip
    return policy, {"prompts": len(prompts), "val_prompts": len(val_prompts), **fit}


def _grpo(cfg: AlignConfig, ctx: StageContext, tok: Any, lm: Any, rt: Runtime) -> tuple[Any, dict]:
    """GRPO on weighted verifiable rewards (align.grpo), the rewards checked against the data;
    held-out rewards (and greedy ROUGE-L where records carry a reference) before and after."""
    opts = cfg.grpo
    with_tests = any(spec.kind == "code_tests" for spec in opts.rewards)
    records, val = load_splits(cfg, lambda path: load_prompt_records(path, with_tests))
    val = val[: opts.eval_prompts]
    rewards = build_rewards(opts.rewards, tok, lm.config.vocab_size, cfg.train.seq_len)
    require_references(records + val, [f.name for f in rewards if f.needs_reference])
    require_tests(records + val, [f.name for f in rewards if f.needs_tests])
    reference = frozen_copy(lm) if cfg.tuning == "full" and opts.beta else None  # LoRA: its base
    if warning := cut_prompts_warning(lm, tok, records + val, opts.max_new_tokens,
                                      "grpo.max_new_tokens"):  # fmt: skip
        ctx.log.warning(warning)
    examples = rouge_examples(cfg, [
        {"prompt": r.prompt, "tool_conversation": r.tool_conversation, "chosen": r.reference}
        for r in val if r.reference is not None])  # fmt: skip
    loader = GroupRollouts(lm, reference, rewards, tok, records, opts,  # lm: _adapt edits in place
                           cfg.train.micro_batch_size, cfg.train.seed, rt).loader  # fmt: skip
    rouge = rouge_from_start(cfg, tok, lm, examples)  # as _adapt leaves it
    _adapt(cfg, lm)
    held_out = partial(heldout_groups, reference=reference, rewards=rewards, tok=tok,
                       records=val, opts=opts)  # fmt: skip
    model, fit = _fit_rollouts(
        cfg, ctx, rt, lm, held_out, group_metrics, make_grpo_loss(opts), loader
    )  # fmt: skip
    return model, {"prompts": len(records), "val_prompts": len(val), **fit, **rouge(model)}


def _fit_rollouts(
    cfg: AlignConfig, ctx: StageContext, rt: Runtime, policy: Any, held_out: Any, metrics: Any,
    loss_fn: Any, loader: Any, before_keys: list[str] | None = None,
) -> tuple[Any, dict]:  # fmt: skip
    """PPO's and GRPO's training on rt, the loop's runtime: the held-out rollout (held_out(model),
    scored by metrics) before, on rt's device under its autocast as the loop's evaluations
    after (align.rollout.HeldOutEval), the loop on loader (a rollout loader built on rt, whose
    autocast scores its rollouts, before any sampling: bad rollout settings are refused first),
    and the fit numbers with the reward headline."""
    evaluate = HeldOutEval(policy.to(rt.device), held_out, metrics, rt)
    before = evaluate.sample(policy)
    policy, fit = _fit(cfg, ctx, policy, loss_fn, loader, evaluate, rt)
    after = evaluate.final()  # the loop's last evaluation: not sampled a second time
    return policy, {**fit, **reward_headline(before, after, evaluate.metrics, before_keys)}


def _write_outputs(cfg: AlignConfig, ctx: StageContext, tok: Any, model: Any, lm: Any) -> None:
    """adapter/ (LoRA), final/ (reward classifier or policy LM, tokenizer files), loss.png."""
    from lmforge.model.convert import ClassifierHead

    classifier, seq_len = None, None
    if cfg.method == "reward":  # eval and PPO score its texts cut where its pairs were cut
        classifier = ClassifierHead(model.head.weight.detach().cpu(), ["reward"])
        seq_len = cfg.train.seq_len
    export_model(ctx, cfg.model_dir(), lm, tok, classifier=classifier, seq_len=seq_len)
    ctx.metrics.close()
    plot_losses(read_metrics(ctx.out / "metrics.jsonl"), ctx.out / "loss.png",
                title=f"align ({cfg.method}, {cfg.tuning})")  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
