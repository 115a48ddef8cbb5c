"""The align stage's typed config: AlignConfig and its per-method sections (dpo, simpo, orpo,
ppo, kto, grpo, eval); every field's description is its CLI help. The stage is align.stage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.common.code_exec import opt_in_message
from lmforge.config import HASHED_IF_SET, NOT_HASHED, Section, StageConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.train.config import TrainConfig


class DPOOptions(Section):
    """The `dpo:` section."""

    beta: float = Field(0.1, gt=0, description="strength of the KL anchor to the reference")
    loss: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid",
        description="sigmoid (DPO) | hinge (SLiC: relu(1 - reward margin)) | ipo (per-token "
        "log-ratio margin regressed to 1 / (2 beta))",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid loss: the probability a preference label is wrong (conservative "
        "DPO, TRL's formula); the margin then settles instead of growing without bound",
        json_schema_extra=HASHED_IF_SET,
    )
    reference: Path | None = Field(
        None, description="reference model directory (default: the starting model itself)"
    )
    sft_weight: float = Field(
        0.0, ge=0, description="weight of the chosen replies' NLL (RPO) that keeps them likely"
    )

    @model_validator(mode="after")
    def _smoothing_only_for_sigmoid(self) -> DPOOptions:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(
                f"dpo.label_smoothing={self.label_smoothing} applies to dpo.loss=sigmoid, not "
                f"{self.loss}: unset dpo.label_smoothing or use dpo.loss=sigmoid"
            )
        return self


class SimPOOptions(Section):
    """The `simpo:` section (SimPO, Meng et al., 2024)."""

    beta: float = Field(
        2.0, gt=0, description="scale of the reward, beta * a reply's mean token log-prob"
    )
    gamma: float = Field(
        1.0, ge=0, description="target reward margin chosen over rejected (the paper's gamma)"
    )


class ORPOOptions(Section):
    """The `orpo:` section (ORPO, Hong et al., 2024)."""

    lam: float = Field(
        0.1, gt=0, description="weight of the odds-ratio loss beside the chosen replies' NLL"
    )


class PPOOptions(Section):
    """The `ppo:` section."""

    reward_model: Path | None = Field(
        None, description="reward model: an `align --method reward` stage dir or its final/"
    )
    rollout_prompts: int = Field(
        16, ge=1, description="prompts answered per rollout (a multiple of micro_batch_size)"
    )
    ppo_epochs: int = Field(2, ge=1, description="passes over each rollout's minibatches")
    max_new_tokens: int = Field(32, ge=1, description="answer length limit while sampling")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rollouts")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference")
    reward_norm: Literal["none", "batch"] = Field(
        "none",
        description="none: the reward model's raw score | batch: scores whitened across each "
        "rollout (mean 0, std 1), so the KL penalty and the value head see the same scale "
        "whatever the reward model's offset and spread",
    )
    clip: float = Field(0.2, gt=0, description="policy ratio clip range")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    vf_clip: float = Field(0.2, gt=0, description="value clip range")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    eval_prompts: int = Field(32, ge=1, description="held-out prompts scored before/after")
    eval_samples: int = Field(
        1, ge=1, description="answers sampled per held-out prompt (more: a less noisy mean)"
    )


class KTOOptions(Section):
    """The `kto:` section (KTO, Ethayarajh et al., 2024): unpaired desirable/undesirable data."""

    beta: float = Field(0.1, gt=0, description="strength of the KL anchor to the reference")
    desirable_weight: float = Field(
        1.0, gt=0, description="weight of a desirable example's loss (lambda_D)"
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="weight of an undesirable example's loss (lambda_U)"
    )
    desirable_min_rating: float = Field(
        4.0, ge=1, le=5,
        description="feedback store data: a response whose mean rating (1..5; thumbs up = 5) is "
        "at least this is desirable",
    )  # fmt: skip
    undesirable_max_rating: float = Field(
        2.0, ge=1, le=5,
        description="feedback store data: a response whose mean rating is at most this (thumbs "
        "down = 1) is undesirable; ratings between the two thresholds are left out",
    )  # fmt: skip

    @model_validator(mode="after")
    def _thresholds_apart(self) -> KTOOptions:
        if self.undesirable_max_rating >= self.desirable_min_rating:
            raise ValueError(
                f"kto.undesirable_max_rating={self.undesirable_max_rating} must be below "
                f"kto.desirable_min_rating={self.desirable_min_rating}, or one rating is both"
            )
        return self


class RewardSpec(Section):
    """One weighted reward function of `grpo.rewards` (align.rewards)."""

    kind: Literal[
        "reward_model", "rouge_l", "exact", "contains", "regex", "length", "python", "code_tests"
    ] = Field(
        description="reward_model (an `align --method reward` dir's score) | rouge_l (F1 "
        "against the reference) | exact, contains (1 if the answer equals / contains the "
        "reference, both lowercased with whitespace collapsed) | regex (1 if `pattern` "
        "matches) | length (minus the tokens outside [min_tokens, max_tokens]) | python "
        "(`function` called with prompts, answers, references) | code_tests (1 if the answer "
        "passes the record's HumanEval/MBPP tests in the code sandbox)"
    )  # fmt: skip
    weight: float = Field(1.0, description="factor of this reward in the sum")
    name: str | None = Field(None, description="name in logs and metrics (default: kind)")
    model: Path | None = Field(None, description="reward_model: the reward stage dir or final/")
    pattern: str | None = Field(None, description="regex: the pattern the answer must match")
    match: Literal["fullmatch", "search"] = Field(
        "fullmatch", description="regex: the whole answer (fullmatch) or anywhere in it (search)"
    )
    min_tokens: int = Field(0, ge=0, description="length: fewer answer tokens are penalised")
    max_tokens: int | None = Field(
        None, ge=1, description="length: more answer tokens are penalised (None: no limit)"
    )
    function: str | None = Field(
        None,
        description='python: "module:function" or "path.py:function", called with (prompts, '
        "answers, references) lists and returning one float per answer",
    )
    allow_code_execution: bool = Field(
        False,
        description="code_tests: run the model's answers on this machine (required: a separate "
        "limited process, not a security boundary)",
        json_schema_extra=HASHED_IF_SET,
    )
    partial: bool = Field(
        False,
        description="code_tests: the fraction of the record's asserts passed, not 1/0",
        json_schema_extra=HASHED_IF_SET,
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        description="code_tests: wall-clock seconds per answer",
        json_schema_extra=HASHED_IF_SET,
    )
    memory_mb: int = Field(
        1024,
        ge=64,
        description="code_tests: address space per answer run (RLIMIT_AS)",
        json_schema_extra=HASHED_IF_SET,
    )

    @model_validator(mode="after")
    def _needs_its_setting(self) -> RewardSpec:
        owner = {"model": "reward_model", "pattern": "regex", "match": "regex",
                 "min_tokens": "length", "max_tokens": "length", "function": "python",
                 "allow_code_execution": "code_tests", "partial": "code_tests",
                 "timeout_s": "code_tests", "memory_mb": "code_tests"}  # fmt: skip
        # a key of another kind set away from its default (compared by value, not by "was it
        # given", so a dumped config validates again) is a typo, never silently ignored
        fields = type(self).model_fields
        stray = sorted(
            k
            for k, kind in owner.items()
            if kind != self.kind and getattr(self, k) != fields[k].default
        )
        if stray:
            raise ValueError(
                f"a {self.kind} reward does not read {', '.join(f'`{k}`' for k in stray)} "
                f"({', '.join(f'{k}: {owner[k]}' for k in stray)}): remove it or fix `kind`"
            )
        needed = {"reward_model": "model", "regex": "pattern", "python": "function"}
        key = needed.get(self.kind)
        if key and getattr(self, key) is None:
            raise ValueError(f"a {self.kind} reward needs `{key}`")
        if self.kind == "code_tests" and not self.allow_code_execution:
            raise ValueError(opt_in_message("a code_tests reward", "allow_code_execution"))
        if self.kind == "length" and not (self.min_tokens or self.max_tokens):
            raise ValueError("a length reward needs `min_tokens` or `max_tokens`")
        if self.kind == "length" and (self.max_tokens or self.min_tokens) < self.min_tokens:
            raise ValueError("length reward: max_tokens is below min_tokens")
        return self


class GRPOOptions(Section):
    """The `grpo:` section (GRPO, Shao et al., 2024, in TRL's GRPOTrainer's terms)."""

    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="weighted reward functions, summed: [{kind: rouge_l, weight: 1.0}, ...]; "
        "kind reward_model|rouge_l|exact|contains|regex|length|python|code_tests, with its "
        "model, pattern and match, min_tokens/max_tokens, function or allow_code_execution and "
        "partial, and an optional name (align.rewards)",
    )
    num_generations: int = Field(8, ge=2, description="answers sampled per prompt (the group)")
    rollout_prompts: int = Field(
        4, ge=1, description="prompts per rollout; prompts * num_generations answers must be a "
        "multiple of train.micro_batch_size",
    )  # fmt: skip
    num_iterations: int = Field(
        1, ge=1, description="passes over each rollout (mu); > 1 reuses samples, clipped ratio"
    )
    max_new_tokens: int = Field(32, ge=1, description="answer length limit while sampling")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rollouts")
    epsilon: float = Field(0.2, gt=0, description="ratio clip: the lower bound is 1 - epsilon")
    epsilon_high: float | None = Field(
        None, gt=0, description="ratio clip's upper bound 1 + epsilon_high (DAPO's clip-higher; "
        "default: epsilon)",
    )  # fmt: skip
    beta: float = Field(
        0.0, ge=0, description="weight of the k3 KL to the reference (0: none loaded, as TRL)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantages divided by the group's reward std | the rollout's | "
        "none (Dr. GRPO)",
    )  # fmt: skip
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        "grpo", description="grpo: mean per answer, then over answers | bnpo: mean over the "
        "batch's tokens | dr_grpo: batch sum / (answers * max_new_tokens)",
    )  # fmt: skip
    eval_prompts: int = Field(32, ge=1, description="held-out prompts sampled before/after")
    eval_samples: int = Field(2, ge=1, description="answers sampled per held-out prompt")


class AlignEval(Section):
    """Held-out evaluation (the `eval:` section)."""

    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of pairs held out when no val_data"
    )
    rouge_examples: int = Field(
        32, ge=0, description="held-out prompts answered greedily for ROUGE-L against their "
        "reference (every policy method but ppo; 0 = skip)",
    )  # fmt: skip
    max_new_tokens: int = Field(
        48, ge=1, description="answer length limit of those greedy answers (ROUGE-L)"
    )
    batch_size: int = Field(
        16, ge=1, description="rows scored / prompts decoded together", json_schema_extra=NOT_HASHED
    )


class AlignConfig(StageConfig):
    """`lmforge align --model DIR --data FILE --out DIR --method M`, M one of reward, dpo, simpo,
    orpo, ppo, kto, grpo."""

    model: Path = Field(description="model directory in HF layout with tokenizer files")
    data: Path = Field(
        description="preference pairs (kto: also unpaired prompt/completion/label records): "
        ".jsonl file or directory, a feedback export or the serving feedback store (align.prefs)"
    )
    val_data: Path | None = Field(None, description="held-out pairs (default: split from data)")
    method: Literal["reward", "dpo", "simpo", "orpo", "ppo", "kto", "grpo"] = Field(
        description="reward (reward model) | dpo (policy from pairs against a reference) | simpo, "
        "orpo (policy from pairs, no reference) | ppo (policy from a reward model) | kto (policy "
        "from unpaired desirable/undesirable examples against a reference) | grpo (policy from "
        "group-relative rewards of its own answers)"
    )
    tuning: Literal["full", "lora"] = Field("full", description="full | lora (adapters only)")
    disable_dropout: bool = Field(
        True,
        description="train with every dropout rate at 0, as TRL's trainers by default (DPO and "
        "PPO compare train-mode log-probs with eval-mode ones); the saved config keeps its rate",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters")
    dpo: DPOOptions = Field(default_factory=DPOOptions, description="DPO settings")
    simpo: SimPOOptions = Field(default_factory=SimPOOptions, description="SimPO settings")
    orpo: ORPOOptions = Field(default_factory=ORPOOptions, description="ORPO settings")
    ppo: PPOOptions = Field(default_factory=PPOOptions, description="PPO settings")
    kto: KTOOptions = Field(default_factory=KTOOptions, description="KTO settings")
    grpo: GRPOOptions = Field(default_factory=GRPOOptions, description="GRPO settings")
    eval: AlignEval = Field(default_factory=AlignEval, description="held-out evaluation")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")

    def inputs(self) -> list[Path]:
        paths = (self.model, self.data, self.val_data, self.dpo.reference, self.ppo.reward_model)
        rewards = [r.model for r in self.grpo.rewards]
        return [p for p in (*paths, *rewards) if p is not None]

    def model_dir(self) -> Path:
        """`model`, or its final/ when `model` is a training stage's directory."""
        from lmforge.model.convert import resolve_model_dir

        return resolve_model_dir(self.model)
