"""TrainConfig: every knob of the one training loop, typed and documented.

Every stage that trains (pretrain, finetune, align, distill) nests this section as `train:`, so the
well-known keys (`train.max_steps`, `train.lr`, `train.micro_batch_size`, `train.seq_len`,
`train.seed`) mean the same thing everywhere. Each field's description becomes the CLI help.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section


class TrainConfig(Section):
    """The loop's settings; defaults train a tiny model on a CPU in seconds."""

    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (after warmup)")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward pass, per rank")
    seq_len: int = Field(128, ge=2, description="tokens per training sequence")
    seed: int = Field(0, description="seed for weights init, data order and dropout")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per step")
    tokens_per_step: int | None = Field(
        None,
        ge=1,
        description="target tokens per optimizer step across all ranks; sets grad_accum_steps "
        "(rounded up) when given",
    )
    optimizer: Literal["adamw", "lamb", "muon"] = Field(
        "adamw", description="adamw | lamb | muon (Muon on 2D hidden matrices, AdamW on the rest)"
    )
    weight_decay: float = Field(
        0.1, ge=0, description="decoupled weight decay (never on norms, biases, embeddings)"
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam/LAMB beta1, beta2")
    muon_lr: float = Field(0.02, gt=0, description="peak learning rate of the Muon matrices")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="lr after warmup: cosine | linear | constant | wsd (warmup-stable-decay)",
    )
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps from 0 to lr")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr")
    decay_ratio: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of max_steps spent decaying at the end"
    )
    grad_clip: float = Field(1.0, ge=0, description="clip the global grad norm to this (0 = off)")
    eval_every: int = Field(50, ge=0, description="evaluate on val every N steps (0 = only at end)")
    eval_steps: int = Field(20, ge=1, description="val batches per evaluation")
    ckpt_every: int = Field(50, ge=0, description="save a checkpoint every N steps (0 = never)")
    keep_last: int = Field(2, ge=1, description="most recent checkpoints to keep")
    keep_best: bool = Field(True, description="also keep the checkpoint with the best val loss")
    early_stop_patience: int = Field(
        0, ge=0, description="stop after N evals without val improvement (0 = off)"
    )
    max_bad_steps: int = Field(
        5, ge=1, description="abort after N NaN/inf losses in a row (each one is skipped)"
    )
    log_every: int = Field(1, ge=1, description="write a metrics.jsonl row every N steps")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype: auto = bf16 on a GPU that has it, fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile the model")
    activation_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none | ddp | fsdp (FSDP2 fully_shard); used under torchrun"
    )
    zero1: bool = Field(False, description="shard optimizer state across ranks (ZeRO-1, with ddp)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            # pydantic turns this into a ValidationError that load_config reports as one line.
            raise ValueError(
                f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}; "
                "lower train.warmup_steps"
            )
        return self

    def accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank (from tokens_per_step when given)."""
        if self.tokens_per_step is None:
            return self.grad_accum_steps
        per_micro = self.micro_batch_size * self.seq_len * world_size
        return max(1, -(-self.tokens_per_step // per_micro))
