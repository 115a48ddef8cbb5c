"""The finetune stage's typed config: FinetuneConfig and its sft:, eval: and multitask: sections.

The other sections it nests (lora, freeze, kfold, augment, train) live with the code they
configure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import HASHED_IF_SET, NOT_HASHED, Section, StageConfig
from lmforge.data.augment import AugmentConfig
from lmforge.finetune.freeze import FreezeConfig
from lmforge.finetune.kfold import KFoldConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.train.config import TrainConfig


class SFTOptions(Section):
    """How chat examples become training rows (the `sft:` section)."""

    truncation: Literal["left", "right", "drop"] = Field(
        "right",
        description="--task sft: examples longer than train.seq_len: keep start|keep end|drop "
        "(other tasks keep the start; set otherwise, refused)",
    )
    packing: bool = Field(True, description="pack short examples into one row (no cross-attention)")


class EvalOptions(Section):
    """Held-out evaluation after training (the `eval:` section).

    align's AlignEval shares four of these fields but no base: each stage's help says which of
    its tasks or methods a field serves and what its batches hold, and the defaults are each
    stage's own choice.
    """

    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of data held out for validation when no val_data"
    )
    rouge_examples: int = Field(
        32,
        ge=0,
        description="sft, seq2seq: val examples answered greedily for ROUGE-L (seq2seq: BLEU and "
        "exact match too; 0 = skip)",
    )
    max_new_tokens: int = Field(48, ge=1, description="sft, seq2seq: answer length limit")
    compare_base: bool = Field(
        True, description="sft, seq2seq: also score the base model (seq2seq: not from_scratch)"
    )
    num_beams: int = Field(
        1, ge=1, description="seq2seq: beam search width for the val outputs (1 = greedy)",
        json_schema_extra=HASHED_IF_SET,
    )  # fmt: skip
    batch_size: int = Field(
        16,
        ge=1,
        description="sft, seq2seq: prompts decoded together (greedy answers do not change)",
        json_schema_extra=NOT_HASHED,
    )


class MultitaskWeights(Section):
    """Loss weights of task=multitask: w_lm * LM loss + w_cls * classification loss."""

    w_lm: float = Field(1.0, ge=0, description="weight of next-token loss on the texts")
    w_cls: float = Field(1.0, ge=0, description="weight of the classification loss")


class FinetuneConfig(StageConfig):
    """`lmforge finetune --model DIR --data FILE --out DIR [--method full|lora] [--task ...]`."""

    model: Path = Field(
        description="model directory in HF layout with tokenizer files (or a pretrain stage dir)"
    )
    data: Path = Field(description="training data: .jsonl/.parquet file, dir, or saved HF dataset")
    val_data: Path | None = Field(None, description="validation data (default: split from data)")
    method: Literal["full", "lora"] = Field("full", description="full | lora")
    task: Literal["sft", "classify", "multitask", "tag", "seq2seq"] = Field(
        "sft",
        description="sft (chat) | classify (text+label) | multitask (LM + classify) | "
        "tag (tokens+tags, encoders) | seq2seq (source+target, encoder-decoders)",
    )
    from_scratch: str | None = Field(
        None,
        description="seq2seq: train this preset (e.g. bart-micro) from scratch; --model then "
        "only supplies the tokenizer files",
    )
    pooling: Literal["first", "mean"] = Field(
        "first",
        description="classify on an encoder: first ([CLS] through the pooler, exported as "
        "*ForSequenceClassification) | mean (average of the tokens' states; no transformers "
        "class computes it, so final/ holds the encoder and the head as "
        "mean_pooled_classifier.safetensors, which lmforge eval reloads)",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="freezing / layer LRs")
    sft: SFTOptions = Field(default_factory=SFTOptions, description="SFT row building")
    multitask: MultitaskWeights = Field(default_factory=MultitaskWeights, description="weights")
    kfold: KFoldConfig = Field(default_factory=KFoldConfig, description="cross-validation")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="classify/multitask: augmented copies of the training part (of each fold)",
    )
    eval: EvalOptions = Field(default_factory=EvalOptions, description="held-out evaluation")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")

    @model_validator(mode="after")
    def _beams_only_for_seq2seq(self) -> FinetuneConfig:
        if self.eval.num_beams > 1 and self.task != "seq2seq":
            raise ValueError(
                f"eval.num_beams={self.eval.num_beams} applies to --task seq2seq's val outputs; "
                f"--task {self.task} is evaluated greedily: unset eval.num_beams"
            )
        return self

    @model_validator(mode="after")
    def _truncation_only_for_sft(self) -> FinetuneConfig:
        # other tasks cut every row at train.seq_len keeping its start, where eval cuts too
        # (a classifier records it, finetune.heads.SEQ_LEN_KEY): a policy set here would be ignored
        if self.sft.truncation != "right" and self.task != "sft":
            raise ValueError(
                f"sft.truncation={self.sft.truncation} applies to --task sft's chat rows; --task "
                f"{self.task} keeps the start of a row longer than train.seq_len (eval reads the "
                "same tokens): unset sft.truncation, or drop long rows from the data"
            )
        return self

    def inputs(self) -> list[Path]:
        paths = [p for p in (self.model, self.data, self.val_data) if p is not None]
        return paths + self.augment.inputs()

    def model_dir(self) -> Path:
        """`model`, or its final/ when `model` is a training stage's directory."""
        from lmforge.model.convert import resolve_model_dir

        return resolve_model_dir(self.model)
