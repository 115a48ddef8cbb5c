"""The `compress` stage: one kind, a `method` field (quantize | prune | distill | export).

`lmforge compress quantize --model DIR --out DIR` writes `final/` (a model directory: config.json,
model.safetensors, tokenizer files, generation_config.json when the source has one) that eval and
generate load like any other, rounded to nearest or calibrated (quantize.method gptq | awq, on
`tokens` or `data`); `lmforge compress prune` writes `final/` pruned (and, with
`tokens`, recovered by a short fine-tune through the one training loop; a classifier with
`examples`, on its classification loss, its accuracy measured); `lmforge compress
distill` trains a smaller preset from the model on `tokens`; `lmforge compress export` writes `model.onnx` (a decoder's KV-cache
inputs and outputs, a classifier's label logits or an encoder's outputs, checked against PyTorch
with onnxruntime) and `model.gguf` (llama.cpp, read back with
gguf's reader). Both write compression.json: weight bytes, greedy decode tokens/s and (with
`data`) perplexity / bits-per-byte of the original and the result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.config import Section, StageConfig
from lmforge.errors import ConfigError, InputError
from lmforge.train.config import TrainConfig

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig

log = logging.getLogger(__name__)

MODEL_HINT = "lmforge pretrain --tokens DIR --tokenizer DIR --out DIR (or point at its final/)"


class QuantizeSettings(Section):
    """method=quantize: weight-only rounding of every matrix."""

    scheme: Literal["int8", "int4"] = Field(
        "int8", description="int8 (a scale per row) | int4 (a scale per group of columns)"
    )
    group_size: int = Field(
        32,
        ge=2,
        description="int4: input columns sharing one scale (even; torch's CPU int4 kernel "
        "takes 32, 64, 128 or 256, other sizes are dequantized per forward)",
    )
    method: Literal["rtn", "gptq", "awq"] = Field(
        "rtn",
        description="rtn (round each weight to nearest) | gptq (calibrated: each block's "
        "Linears rounded column by column, the error spread by the inverse Hessian of their "
        "inputs) | awq (calibrated: input channels scaled by activation size before rounding "
        "to nearest, folded into the norms / producing rows); gptq and awq need tokens or data",
    )
    calibration_samples: int = Field(
        128,
        ge=1,
        description="gptq/awq: calibration windows, drawn without replacement from the "
        "non-overlapping windows of tokens' train.bin or data (all of them if fewer)",
    )
    calibration_seq_len: int = Field(
        256, ge=2, description="gptq/awq: tokens per calibration window (capped at the block size)"
    )
    calibration_seed: int = Field(0, description="gptq/awq: seed choosing the calibration windows")
    calibration_split: str = Field(
        "train",
        description="gptq/awq without tokens: the split of data whose texts calibrate (its "
        "first 4 x calibration_samples x calibration_seq_len tokens)",
    )
    damp_percent: float = Field(
        0.01, gt=0, description="gptq: dampening added to H's diagonal, a fraction of its mean"
    )
    desc_act: bool = Field(
        False,
        description="gptq: round columns in descending Hessian-diagonal order (act-order); "
        "int4 group scales are then computed from the unrounded weight first (static groups)",
    )
    awq_grid: int = Field(
        20, ge=1, description="awq: alphas tried per group of Linears (0, 1/awq_grid, ..., 1)"
    )


class ExportSettings(Section):
    """method=export: which files, and how closely they must match PyTorch."""

    formats: list[Literal["onnx", "gguf"]] = Field(
        default_factory=lambda: ["onnx", "gguf"], description="onnx and/or gguf"
    )
    atol: float = Field(1e-3, gt=0, description="max |logit difference| ONNX vs PyTorch allowed")
    opset: int = Field(18, ge=14, description="ONNX opset version")
    gguf_type: Literal["f32", "f16", "q8_0"] = Field(
        "f32", description="GGUF matrices: f32 | f16 | q8_0 (norms and biases stay f32)"
    )


class PruneSettings(Section):
    """method=prune: what is removed, and how much."""

    kind: Literal["magnitude", "neurons", "heads"] = Field(
        "magnitude",
        description="magnitude (zero weights) | neurons (MLP units) | heads (kv groups)",
    )
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights/units/groups removed")
    scope: Literal["global", "layer"] = Field(
        "global", description="magnitude: rank weights over all matrices or within each"
    )


class DistillSettings(Section):
    """method=distill: the student and how it learns from the teacher."""

    student: str = Field("micro", description="student preset (vocab and block size: teacher's)")
    temperature: float = Field(2.0, gt=0, description="softens both logit distributions")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term (1 - alpha: CE)")


def recovery_train() -> TrainConfig:
    """A short recovery fine-tune: no checkpoints, one evaluation at the end."""
    return TrainConfig(max_steps=50, lr=1e-4, micro_batch_size=16, warmup_steps=5, ckpt_every=0,
                       eval_every=0, eval_steps=5)  # fmt: skip


class SpeedSettings(Section):
    """How decode speed is measured (greedy, KV cache, a fixed random prompt)."""

    prompt_tokens: int = Field(16, ge=1, description="prompt length")
    new_tokens: int = Field(32, ge=1, description="tokens generated per run")
    repeats: int = Field(2, ge=1, description="timed runs (best counts), after one warm-up")


class CompressConfig(StageConfig):
    """`lmforge compress quantize|export --model DIR --out DIR [--data DIR]`."""

    method: Literal["quantize", "prune", "distill", "export"] = Field(
        description="quantize | prune | distill | export"
    )
    model: Path = Field(description="model directory (HF layout + tokenizer) or a training stage")
    data: Path | None = Field(
        None, description="data directory or JSONL whose split scores quality (default: none)"
    )
    split: str = Field("val", description="split of data to score")
    max_docs: int = Field(64, ge=1, description="documents of the split scored")
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings, description="quantize")
    prune: PruneSettings = Field(default_factory=PruneSettings, description="prune")
    distill: DistillSettings = Field(default_factory=DistillSettings, description="distill")
    tokens: Path | None = Field(
        None, description="token shards (lmforge tokenizer encode): prune's recovery, distill"
    )
    examples: Path | None = Field(
        None,
        description="labelled examples (finetune's classification files: text, label, optional "
        "text_pair): a sequence classifier's prune recovery trains its classification loss on them",
    )
    val_examples: Path | None = Field(
        None,
        description="held-out labelled examples scoring the classifier's accuracy before and after "
        "pruning and after recovery (default: examples)",
    )
    train: TrainConfig = Field(
        default_factory=recovery_train, description="prune's recovery / distill's training"
    )
    export: ExportSettings = Field(default_factory=ExportSettings, description="export")
    speed: SpeedSettings = Field(default_factory=SpeedSettings, description="speed measurement")

    def inputs(self) -> list[Path]:
        paths = (self.model, self.data, self.tokens, self.examples, self.val_examples)
        return [p for p in paths if p is not None]

    def model_dir(self) -> Path:
        """`model`, or its final/ when `model` is a training stage's directory."""
        from lmforge.model.convert import resolve_model_dir

        return resolve_model_dir(self.model)


def compress(cfg: CompressConfig, force: bool = False) -> Path:
    """Runs (or reuses) the compress stage; returns its directory."""
    return run_stage("compress", cfg, build, force=force).out


RECOVERY_INSTEAD = "use method=quantize, or method=prune without tokens"
CALIBRATED_CANNOT = ("calibrated quantization (GPTQ, AWQ) rounds a decoder language model's blocks",
                     "use --method rtn (quantize.method=rtn)")  # fmt: skip
# what an encoder (BERT/RoBERTa, or our layout with causal=false) and a sequence classifier
# cannot go through: step -> (why, what to do instead); quantize and prune keep a classifier's
# head and an encoder's layout
ENCODER_CANNOT = {
    "distill": ("distill trains a causal student on next-token loss", RECOVERY_INSTEAD),
    "export-gguf": ("export to GGUF writes llama.cpp's decoders", "export it with --set "
                    "'export.formats=[onnx]' (its classifier's logits or hidden states)"),
    "prune-recovery": ("prune's recovery (tokens) trains next-token loss, which an encoder does "
                       "not learn", RECOVERY_INSTEAD),
    "quantize-calibrated": CALIBRATED_CANNOT,
}  # fmt: skip
CLASSIFIER_CANNOT = {
    "distill": ("distill trains a language model, which would drop its head",
                "use method=quantize, or method=prune (both keep the head; prune recovers on "
                "labelled examples)"),
    "prune-recovery": ("prune's recovery on tokens trains next-token loss, not its "
                       "classification head", "recover it on labelled examples instead "
                       "(--set examples=FILE: text, label; the head is trained with it)"),
    "export-gguf": ("export to GGUF writes a language model, without its head",
                    "export the classifier with --set 'export.formats=[onnx]'"),
    "quantize-calibrated": CALIBRATED_CANNOT,
}  # fmt: skip


def steps(cfg: CompressConfig) -> list[str]:
    """What cfg makes the stage do, as ENCODER_CANNOT and CLASSIFIER_CANNOT name it."""
    if cfg.method == "export":
        return [f"export-{fmt}" for fmt in cfg.export.formats]
    if cfg.method == "prune" and cfg.tokens is not None:
        return ["prune", "prune-recovery"]
    if cfg.method == "quantize" and cfg.quantize.method != "rtn":
        return ["quantize", "quantize-calibrated"]
    return [cfg.method]


def refuse(cfg: CompressConfig, src: Path, model: str, cannot: dict[str, tuple[str, str]]) -> None:
    """ConfigError for the first step of cfg that `model` (what src is) cannot go through."""
    for step in steps(cfg):
        if step in cannot:
            why, instead = cannot[step]
            raise ConfigError(f"{src} is {model}: {why}; {instead}")


def refuse_source(cfg: CompressConfig, src: Path, hf: dict[str, Any]) -> None:
    """ConfigError for what src (config.json `hf`) cannot go through with cfg: a quantized
    source re-quantized, a classifier's or an encoder's steps above, an encoder-decoder's
    export, examples where they train nothing."""
    from lmforge.compress.quantize import require_calibration, require_float_source
    from lmforge.model.convert import load_classifier

    if cfg.method == "quantize":
        require_float_source(src, hf)
        require_calibration(cfg)
    head = load_classifier(src)
    if head is not None:  # first: a classifier's refusals say how to keep its head
        refuse(cfg, src, "a classifier", CLASSIFIER_CANNOT)
    if head is not None and head.per_token and "export-onnx" in steps(cfg):
        raise ConfigError(f"{src} is a token classifier: ONNX export takes an encoder with a "
                          "sequence head or none; use method=quantize")  # fmt: skip
    arch = source_architecture(src, hf)
    encoder_decoder = arch is None or arch.is_encoder_decoder
    if not (encoder_decoder or arch.causal):  # a mean-pooled classifier's too
        refuse(cfg, src, "an encoder", ENCODER_CANNOT)
    if encoder_decoder:
        refuse(cfg, src, "an encoder-decoder", {"quantize-calibrated": CALIBRATED_CANNOT})
    if cfg.method == "export" and encoder_decoder:
        raise ConfigError(f"{src} is an encoder-decoder: export writes a decoder's KV-cache graph "
                          "or an encoder's, not both with cross-attention; use method=quantize")  # fmt: skip
    if cfg.method == "export" and arch.num_experts:
        raise ConfigError(f"{src} is a mixture of experts: ONNX and GGUF export write dense MLPs "
                          "(torch.export cannot trace the experts' per-token routing); use "
                          "method=quantize")  # fmt: skip
    if cfg.examples is not None and (cfg.method != "prune" or head is None or head.per_token):
        raise ConfigError(f"examples train a sequence classifier's prune recovery, not method="
                          f"{cfg.method} of {src}; drop examples (or --set tokens=DIR to "
                          "recover a language model)")  # fmt: skip
    if cfg.val_examples is not None and cfg.examples is None:
        raise ConfigError(f"val_examples={cfg.val_examples} score a classifier's prune recovery "
                          "on examples, but examples is unset: --set examples=FILE too, or drop "
                          "val_examples")  # fmt: skip


def source_architecture(src: Path, hf: dict[str, Any]) -> ModelConfig | None:
    """src's ModelConfig from its config.json `hf` (the fields the refusals read, whichever
    family or layout wrote them), or None for a T5, which transformers' own module runs."""
    from lmforge.model.convert import hf_config_to_model_config

    if hf.get("model_type") == "t5":
        return None
    try:
        return hf_config_to_model_config(hf)
    except InputError as err:  # unsupported or incomplete: say whose
        raise InputError(f"{src}: {err}") from None


def build(cfg: CompressConfig, ctx: StageContext) -> dict[str, Any]:
    """Measures the original, runs the method, measures the result; writes compression.json."""
    from lmforge.compress import export, measure
    from lmforge.compress.distill import distill_method
    from lmforge.compress.prune import prune_method
    from lmforge.compress.quantize import quantize_method
    from lmforge.evals.lm import EvalModel
    from lmforge.evals.perplexity import read_texts
    from lmforge.model.convert import read_config

    src = cfg.model_dir()
    require_artifact(src, ["config.json", "tokenizer.json"], hint=MODEL_HINT)
    hf = read_config(src)
    refuse_source(cfg, src, hf)  # before the slow measurement of src
    texts = read_texts(cfg.data, cfg.split, limit=cfg.max_docs) if cfg.data else None
    original = EvalModel.load(src, quantized="dequantize")  # exported, pruned, distilled: floats
    # a quantized source is measured as it runs (kept quantized), not as the floats above
    served = EvalModel.load(src) if hf.get("quantization_config") else original
    before = measure.model_report(served, src, texts, cfg.speed)
    ctx.log.info("original: %s", before)
    if cfg.method == "quantize":
        result = quantize_method(cfg, ctx, src, original, texts)
    elif cfg.method == "prune":
        result = prune_method(cfg, ctx, src, original, texts)
    elif cfg.method == "distill":
        result = distill_method(cfg, ctx, src, original, texts)
    else:
        measured = before if served is original else None  # the floats' own quality, if known
        result = export.export_method(cfg, ctx, src, original, texts, measured)
    after = result.pop("after")
    report = {"method": cfg.method, "source": str(src), "before": before, "after": after, **result}
    report.update(measure.compare(before, after))
    ctx.atomic_write_json(ctx.out / "compression.json", report)
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and v is not None}
