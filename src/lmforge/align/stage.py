"""The `align` stage: a reward model or a DPO policy from preference pairs, through the one loop.

Inputs: a model directory in Hugging Face layout with its tokenizer files (usually the SFT
model) and preference data (align.prefs). method=reward trains the Transformer with a scalar head
on Bradley-Terry and writes final/ as a *ForSequenceClassification with num_labels=1. method=dpo
trains the policy (full, or LoRA adapters over the frozen base) against reference log-probs
scored once before training, and writes final/ as a causal LM (+ adapter/ for LoRA). Headline
metrics: held-out pairwise accuracy and reward margin (reward); held-out preference accuracy,
implicit reward margin, the chosen-over-rejected log-prob margin before and after, and greedy
ROUGE-L of the chosen answers for the policy and the reference (dpo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmforge.align.dpo import evaluate_dpo, make_dpo_loss, reference_logps
from lmforge.align.encode import encode_pairs
from lmforge.align.prefs import load_pairs
from lmforge.align.reward import evaluate_rewards, reward_loss, reward_model
from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.logging import read_metrics
from lmforge.config import NOT_HASHED, Section, StageConfig, config_hash
from lmforge.errors import ConfigError, InputError
from lmforge.finetune.evaluate import rouge_eval
from lmforge.finetune.export import export_model
from lmforge.finetune.lora import LoraConfig, inject, trainable_fraction
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.train.checkpoint import forget_other_runs
from lmforge.train.config import TrainConfig
from lmforge.train.loader import RowBatches
from lmforge.train.loop import train
from lmforge.train.observe import plot_losses

MODEL_HINT = "lmforge finetune --model DIR --data FILE --out DIR (its final/ directory)"


class DPOOptions(Section):
    """The `dpo:` section."""

    beta: float = Field(0.1, gt=0, description="strength of the KL anchor to the reference")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid (DPO) | ipo")
    reference: Path | None = Field(
        None, description="reference model directory (default: the starting model itself)"
    )


class AlignEval(Section):
    """Held-out evaluation (the `eval:` section)."""

    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of pairs held out when no val_data"
    )
    rouge_examples: int = Field(
        32, ge=0, description="dpo: held-out prompts answered greedily for ROUGE-L (0 = skip)"
    )
    max_new_tokens: int = Field(48, ge=1, description="dpo: answer length limit for ROUGE-L")
    batch_size: int = Field(
        16, ge=1, description="rows scored / prompts decoded together", json_schema_extra=NOT_HASHED
    )


class AlignConfig(StageConfig):
    """`lmforge align --model DIR --data FILE --out DIR --method reward|dpo`."""

    model: Path = Field(description="model directory in HF layout with tokenizer files")
    data: Path = Field(description="preference pairs: .jsonl file or directory (align.prefs)")
    val_data: Path | None = Field(None, description="held-out pairs (default: split from data)")
    method: Literal["reward", "dpo"] = Field(description="reward (reward model) | dpo (policy)")
    tuning: Literal["full", "lora"] = Field("full", description="full | lora (adapters only)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters")
    dpo: DPOOptions = Field(default_factory=DPOOptions, description="DPO settings")
    eval: AlignEval = Field(default_factory=AlignEval, description="held-out evaluation")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")

    def inputs(self) -> list[Path]:
        paths = (self.model, self.data, self.val_data, self.dpo.reference)
        return [p for p in paths if p is not None]

    def model_dir(self) -> Path:
        """`model`, or its final/ when `model` is a training stage's directory."""
        from lmforge.model.convert import resolve_model_dir

        return resolve_model_dir(self.model)


def align(cfg: AlignConfig, force: bool = False) -> Path:
    """Runs (or reuses) the align stage; returns its directory (final/ holds the model)."""
    return run_stage("align", cfg, build, force=force).out


def load_splits(cfg: AlignConfig) -> tuple[list, list]:
    """(train, val) pairs: val from val_data, else a seeded share of data."""
    pairs = load_pairs(cfg.data)
    if cfg.val_data is not None:
        return pairs, load_pairs(cfg.val_data)
    order = np.random.default_rng(cfg.train.seed).permutation(len(pairs))
    n_val = max(1, round(cfg.eval.val_fraction * len(pairs)))
    if len(pairs) - n_val < 1:
        raise InputError(f"{cfg.data}: only {len(pairs)} pairs, too few to hold out validation")
    held = set(order[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def build(cfg: AlignConfig, ctx: StageContext) -> dict[str, Any]:
    """Encodes pairs, trains with the one loop, evaluates, writes final/; returns headlines."""
    from lmforge.model.convert import load_pretrained

    model_dir = cfg.model_dir()
    require_artifact(model_dir, ["config.json"], hint=MODEL_HINT)
    tok = load_chat_tokenizer(model_dir)
    train_pairs, val_pairs = load_splits(cfg)
    train_rows, stats = encode_pairs(tok, train_pairs, cfg.train.seq_len)
    val_rows, val_stats = encode_pairs(tok, val_pairs, cfg.train.seq_len)
    ctx.log.info("align %s/%s: train %s, val %s", cfg.method, cfg.tuning, stats, val_stats)
    forget_other_runs(ctx.out / "checkpoints", config_hash(cfg))
    lm = load_pretrained(model_dir).train()
    if cfg.train.seq_len > lm.config.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size="
            f"{lm.config.block_size}; lower train.seq_len"
        )
    headline: dict[str, Any] = {"train_pairs": stats["pairs"], "val_pairs": val_stats["pairs"]}
    bs = cfg.eval.batch_size
    if cfg.method == "dpo":
        ref = load_pretrained(cfg.dpo.reference) if cfg.dpo.reference else lm
        train_rows["ref_logps"] = reference_logps(ref, train_rows, bs)
        val_rows["ref_logps"] = reference_logps(ref, val_rows, bs)
        lm.train()
    torch.manual_seed(cfg.train.seed)  # adapters and heads start the same on resume
    if cfg.tuning == "lora":
        inject(lm, cfg.lora)
    if cfg.method == "reward":
        model = reward_model(lm)
        before = evaluate_rewards(model, val_rows, bs)
        loss_fn = reward_loss

        def eval_fn(m):
            return evaluate_rewards(m, val_rows, bs, limit=cfg.train.eval_steps)
    else:
        model = lm
        loss_fn = make_dpo_loss(cfg.dpo.beta, cfg.dpo.loss)

        def eval_fn(m):
            return evaluate_dpo(m, val_rows, bs, cfg.dpo.beta, cfg.dpo.loss, cfg.train.eval_steps)

    loader = RowBatches(train_rows, cfg.train.micro_batch_size, seed=cfg.train.seed)
    result = train(model, loss_fn, loader, cfg.train, ctx, eval_fn=eval_fn)
    model = result.model
    trainable, total = trainable_fraction(model)
    headline.update(
        steps=result.step, train_loss=_round(result.train_loss),
        trainable_fraction=round(trainable / total, 5), resumed_from_step=result.resumed_from,
    )  # fmt: skip
    if cfg.method == "reward":
        after = evaluate_rewards(model, val_rows, bs)
        headline.update({k: _round(v) for k, v in after.items()})
        headline["base_val_pair_accuracy"] = _round(before["val_pair_accuracy"])
    else:
        after = evaluate_dpo(model, val_rows, bs, cfg.dpo.beta, cfg.dpo.loss)
        headline.update({k: _round(v) for k, v in after.items()})
        headline.update(_rouge(cfg, tok, model, val_pairs, ref if cfg.dpo.reference else None))
    _write_outputs(cfg, ctx, tok, model, lm)
    return headline


def _rouge(cfg: AlignConfig, tok: Any, policy: Any, pairs: list, reference: Any) -> dict:
    """Greedy ROUGE-L against the chosen answers of held-out prompts: policy and reference."""
    from lmforge.model.convert import load_pretrained

    seen, examples = set(), []
    for p in pairs:
        key = str(p["prompt"])
        if key not in seen and len(examples) < cfg.eval.rouge_examples:
            seen.add(key)
            examples.append(
                {"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]}
            )
    if not examples:
        return {}
    if reference is None:
        reference = load_pretrained(cfg.model_dir())
    args = (examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    score, _ = rouge_eval(policy, tok, *args)
    ref_score, _ = rouge_eval(reference.to(next(policy.parameters()).device), tok, *args)
    return {
        "rouge_l": round(score, 4),
        "ref_rouge_l": round(ref_score, 4),
        "rouge_examples": len(examples),
    }


def _write_outputs(cfg: AlignConfig, ctx: StageContext, tok: Any, model: Any, lm: Any) -> None:
    """adapter/ (LoRA), final/ (reward classifier or policy LM, tokenizer files), loss.png."""
    from lmforge.model.convert import ClassifierHead

    classifier = None
    if cfg.method == "reward":
        classifier = ClassifierHead(model.head.weight.detach().cpu(), ["reward"])
    export_model(ctx, cfg.model_dir(), lm, classifier=classifier, pad_id=tok.pad_id)
    ctx.metrics.close()
    plot_losses(read_metrics(ctx.out / "metrics.jsonl"), ctx.out / "loss.png",
                title=f"align ({cfg.method}, {cfg.tuning})")  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
