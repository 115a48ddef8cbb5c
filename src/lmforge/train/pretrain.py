"""The `pretrain` stage: next-token (clm) or masked-token (mlm) prediction on token shards,
through the one training loop.

objective=mlm trains a bidirectional encoder preset (bert-micro, bert-tiny, bert-base) with
train/mlm.py's loss_fn on the same shards; its val_loss is the masked-token loss on val windows
masked once with fixed seeds (at mlm_val_probability when set, so runs trained at different mask
rates compare), and the manifest adds initial_val_loss (before any step).

Inputs: a token shard directory (`lmforge tokenizer encode`: train.bin, val.bin, meta.json) and
the tokenizer that made it (refused when its hash differs from the one in meta.json). Outputs in
the stage directory: `final/` (a complete Hugging Face model directory: config.json,
model.safetensors, tokenizer files), `checkpoints/step_N/`, metrics.jsonl, TensorBoard events in
`tensorboard/`, and loss.png. A killed run resumes from its newest checkpoint when rerun with
the same config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.logging import read_metrics
from lmforge.config import HASHED_IF_SET, Section, StageConfig
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.files import (
    TOKENIZER_HINT,
    TokenizerFiles,
    copy_tokenizer_files,
    tokenizer_hash,
)
from lmforge.tokenizer.generation import generation_config
from lmforge.train.checkpoint import forget_other_runs
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import barrier, is_sharded, setup_runtime
from lmforge.train.loader import TokenWindows, open_tokens
from lmforge.train.loop import TrainResult, train
from lmforge.train.mlm import MaskSpec, make_mlm_loss, masked_val_batch
from lmforge.train.observe import plot_losses, write_tensorboard

TOKENS_HINT = "lmforge tokenizer encode --data DIR --tokenizer DIR --out DIR"


def _added_override(description: str, **limits: float) -> Any:
    """A ModelSection override added after the first release: None (the preset's value) by
    default and hashed only when set, so earlier runs' config hashes stay valid."""
    return Field(None, description=description, json_schema_extra=HASHED_IF_SET, **limits)


class ModelSection(Section):
    """Which Transformer to train: a preset, optionally with some fields changed."""

    preset: str = Field("tiny", description="model preset (micro, tiny, small, gpt2-124m, ...)")
    n_layer: int | None = Field(None, ge=1, description="override the preset's number of blocks")
    n_head: int | None = Field(None, ge=1, description="override the preset's query heads")
    n_kv_head: int | None = Field(None, ge=1, description="override the preset's key/value heads")
    n_embd: int | None = Field(None, ge=1, description="override the preset's width")
    intermediate_size: int | None = Field(None, ge=1, description="override the MLP hidden size")
    block_size: int | None = Field(None, ge=1, description="override the max sequence length")
    dropout: float | None = Field(None, ge=0, lt=1, description="override the dropout rate")
    # fields added later: unset, they leave a stage's config hash what it was before them
    qk_norm: bool | None = _added_override(
        "RMSNorm on each head's queries and keys before rotary, as Qwen3 trains; a bias-free "
        "Llama-style preset then exports as Qwen3, or Qwen3-MoE with num_experts (others: "
        "lmforge layout)"
    )
    num_experts: int | None = _added_override(
        "override the experts per layer (0 = dense MLP; see preset micro-moe)", ge=0
    )
    num_experts_per_tok: int | None = _added_override("override the top-k experts per token", ge=1)
    router_aux_loss_coef: float | None = _added_override(
        "override the load-balancing loss weight (default 0.01, Switch Transformer's alpha; "
        "transformers' Mixtral config defaults to 0.001)",
        ge=0,
    )
    router_z_loss_coef: float | None = _added_override(
        "override the router z-loss weight (default 0 = off; ST-MoE trains with 0.001)", ge=0
    )

    def overrides(self) -> dict[str, Any]:
        """The fields set here, to apply over the preset."""
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class PretrainConfig(StageConfig):
    """`lmforge pretrain --tokens DIR --tokenizer DIR --out DIR [--preset NAME]`."""

    tokens: Path = Field(description="token shard directory (lmforge tokenizer encode)")
    tokenizer: Path = Field(description="tokenizer directory the shards were encoded with")
    model: ModelSection = Field(default_factory=ModelSection, description="model architecture")
    init_from: Path | None = Field(
        None,
        description="continue pretraining this model directory (HF layout) instead of a fresh "
        "preset; its architecture wins over model.*",
    )
    objective: Literal["clm", "mlm"] = Field(
        "clm", description="clm (next token, decoder) | mlm (masked tokens, encoder preset)"
    )
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="mlm: share of tokens chosen for prediction (80/10/10)"
    )
    mlm_val_probability: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="mlm: share of val tokens masked for val_loss (None: mlm_probability); fix "
        "it (BERT's 0.15) to compare runs trained at different mlm_probability",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")

    @model_validator(mode="after")
    def _val_masking_needs_mlm(self) -> PretrainConfig:
        if self.mlm_val_probability is not None and self.objective != "mlm":
            raise ConfigError(
                f"mlm_val_probability is set but objective={self.objective} masks nothing; set "
                "objective=mlm or drop mlm_val_probability"
            )
        return self

    def inputs(self) -> list[Path]:
        return [self.tokens, self.tokenizer, *([self.init_from] if self.init_from else [])]


def pretrain(cfg: PretrainConfig, force: bool = False) -> Path:
    """Runs (or reuses) the pretrain stage; returns its directory (final/ holds the model)."""
    return run_stage("pretrain", cfg, build, force=force).out


def read_token_meta(tokens: Path, tokenizer: Path) -> dict[str, Any]:
    """meta.json of a shard directory, after checking it was made with this tokenizer."""
    require_artifact(tokens, ["meta.json", "train.bin", "val.bin"], hint=TOKENS_HINT)
    require_artifact(tokenizer, ["tokenizer.json"], hint=TOKENIZER_HINT)
    meta = json.loads((Path(tokens) / "meta.json").read_text(encoding="utf-8"))
    for key in ("dtype", "vocab_size", "tokenizer_hash"):
        if key not in meta:
            raise InputError(f"{tokens}/meta.json has no '{key}'; re-encode with: {TOKENS_HINT}")
    expected = tokenizer_hash(tokenizer)
    if meta["tokenizer_hash"] != expected:
        raise InputError(
            f"{tokens} was encoded with tokenizer hash {meta['tokenizer_hash']}, but {tokenizer} "
            f"has hash {expected}; pass the tokenizer the shards were made with, or re-encode: "
            f"{TOKENS_HINT}"
        )
    return meta


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy (in fp32 even under autocast), computed in model.forward."""
    return model(batch["input_ids"], doc_ids=batch.get("doc_ids"), labels=batch["labels"]), {}


def _build_model(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    """A fresh preset model, or the model in init_from for continued pretraining."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import load_pretrained, resolve_model_dir
    from lmforge.model.transformer import Transformer

    torch.manual_seed(cfg.train.seed)
    if cfg.init_from is not None:
        model = load_pretrained(resolve_model_dir(cfg.init_from), quantized="dequantize").train()
        if model.config.vocab_size < vocab_size:
            raise InputError(
                f"{cfg.init_from} has a {model.config.vocab_size}-token vocabulary but the shards "
                f"use {vocab_size}; encode with the model's own tokenizer "
                f"(lmforge tokenizer train --import-from {cfg.init_from} ...)"
            )
    else:
        overrides = {"vocab_size": vocab_size, **cfg.model.overrides()}
        config = preset_config(cfg.model.preset, **overrides)
        _check_routing_overrides(cfg.model, config.num_experts)  # before building its weights
        model = Transformer(config)
    if model.config.causal != (cfg.objective == "clm"):
        kind = "a causal decoder" if model.config.causal else "a bidirectional encoder"
        fix = "a bert-* preset" if cfg.objective == "mlm" else "a decoder preset or objective=mlm"
        raise ConfigError(f"objective={cfg.objective} cannot train {kind}; use {fix}")
    if cfg.objective == "mlm" and not model.config.mlm_head:
        raise ConfigError("objective=mlm needs a model with an MLM head (model.mlm_head=true)")
    if cfg.train.seq_len > model.config.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size="
            f"{model.config.block_size}; lower train.seq_len or set model.block_size"
        )
    return model


def _check_routing_overrides(section: ModelSection, num_experts: int) -> None:
    """ConfigError for a mixture-of-experts setting over a dense model, which would ignore it."""
    routing = ("num_experts_per_tok", "router_aux_loss_coef", "router_z_loss_coef")
    set_here = [name for name in routing if getattr(section, name) is not None]
    if set_here and not num_experts:
        raise ConfigError(
            f"model.{set_here[0]} configures a mixture of experts, but preset "
            f"{section.preset!r} is dense (model.num_experts=0); set model.num_experts too, or "
            "use preset micro-moe"
        )


def build(cfg: PretrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Trains the model and writes final/, loss.png and TensorBoard events; returns headlines."""
    meta = read_token_meta(cfg.tokens, cfg.tokenizer)
    tc = cfg.train
    rt = setup_runtime(tc)
    if rt.env.is_main:
        forget_other_runs(ctx.out / "checkpoints", ctx.run_hash)
    barrier()
    model = _build_model(cfg, int(meta["vocab_size"]))
    n_params = model.num_params()
    flops = model.flops_per_token(tc.seq_len)
    loss_fn, prepare_val = lm_loss, _identity
    if cfg.objective == "mlm":
        spec = mask_spec(cfg, model.config.vocab_size)
        loss_fn = make_mlm_loss(spec)
        val_spec = replace(spec, probability=cfg.mlm_val_probability or cfg.mlm_probability)
        prepare_val = lambda batch, i: masked_val_batch(batch, val_spec, seed=tc.seed + i)  # noqa: E731
    ranks = {"rank": rt.env.rank, "world_size": rt.env.world_size}
    train_tokens = open_tokens(Path(cfg.tokens) / "train.bin", meta["dtype"])
    val_tokens = open_tokens(Path(cfg.tokens) / "val.bin", meta["dtype"])
    loader = TokenWindows(train_tokens, tc.seq_len, tc.micro_batch_size, seed=tc.seed, **ranks)
    val = TokenWindows(val_tokens, tc.seq_len, tc.micro_batch_size, shuffle=False, **ranks)

    def evaluate(m: nn.Module) -> dict[str, float]:
        batches = (_to(prepare_val(val.batch(i), i), rt.device) for i in range(tc.eval_steps))
        losses = [loss_fn(m, batch)[0] for batch in batches]
        return {"val_loss": torch.stack(losses).float().mean().item()}  # one host sync

    ctx.log.info(
        "pretrain (%s): %s, %.2fM params, vocab %d",
        cfg.objective, cfg.model.preset, n_params / 1e6, meta["vocab_size"],
    )  # fmt: skip
    initial = None
    if cfg.objective == "mlm":
        initial = _initial_val_loss(model, evaluate, rt.device)
        ctx.log.info("masked-token val loss before training: %.4f", initial)
    result = train(
        model, loss_fn, loader, tc, ctx, eval_fn=evaluate, flops_per_token=flops, runtime=rt
    )
    rows = _write_outputs(cfg, ctx, result) if rt.env.is_main else []
    barrier()
    headline = _headline(result, n_params)
    if model.config.num_experts:
        headline.update(_routing_headline(rows))
    if initial is not None:
        headline.update(objective="mlm", initial_val_loss=_round(initial))
    return headline


def mask_spec(cfg: PretrainConfig, vocab_size: int) -> MaskSpec:
    """The tokenizer's [MASK] and special ids; a tokenizer without a mask token is refused."""
    tok = TokenizerFiles.load(cfg.tokenizer)
    if tok.mask_id is None:
        raise InputError(
            f"{cfg.tokenizer} has no mask token, which objective=mlm needs; retrain it with "
            "--set special_tokens.mask='[MASK]' (lmforge tokenizer train) and re-encode"
        )
    start = tuple(tok.template_ends()[0])  # [CLS] when the tokenizer's template opens with it
    return MaskSpec(tok.mask_id, tuple(tok.special_ids()), vocab_size, cfg.mlm_probability, start)


def _identity(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return batch


@torch.no_grad()
def _initial_val_loss(model: nn.Module, evaluate, device: torch.device) -> float:
    """The val loss of the untrained model (the "before" of an MLM run's before/after)."""
    model.to(device).eval()
    loss = evaluate(model)["val_loss"]
    model.train()
    return loss


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _write_outputs(
    cfg: PretrainConfig, ctx: StageContext, result: TrainResult
) -> list[dict[str, Any]]:
    """final/ (model, generation_config.json, tokenizer; renamed into place complete), loss.png,
    TensorBoard events; returns the run's metrics.jsonl rows, read back once for them."""
    from lmforge.model.convert import save_pretrained

    model = result.model
    if is_sharded(model):  # FSDP2: rebuild an unsharded copy from the gathered state
        from lmforge.model.transformer import Transformer

        model = Transformer(model.config)
        model.load_state_dict(result.state_dict)
    tok = TokenizerFiles.load(cfg.tokenizer)
    with ctx.atomic_path(ctx.out / "final") as tmp:
        save_pretrained(
            model,
            tmp,
            extra_config=tok.special_token_ids(),
            generation_config=generation_config(tok),
        )
        copy_tokenizer_files(cfg.tokenizer, tmp)
    ctx.metrics.close()  # flush before reading the whole file back
    rows = read_metrics(ctx.out / "metrics.jsonl")
    plot_losses(rows, ctx.out / "loss.png", title=f"pretrain ({cfg.model.preset})")
    shutil.rmtree(ctx.out / "tensorboard", ignore_errors=True)
    write_tensorboard(rows, ctx.out / "tensorboard")
    return rows


def _headline(result: TrainResult, n_params: int) -> dict[str, Any]:
    val = result.val_loss
    return {
        "train_loss": _round(result.train_loss),
        "val_loss": _round(val),
        "val_ppl": _round(torch.tensor(val).exp().item()) if val is not None else None,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "params": n_params,
        "steps": result.step,
        "best_val_loss": _round(result.best_val_loss),
        "skipped_steps": result.skipped_steps,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from,
    }


def _routing_headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A mixture of experts' balance at its last logged step (of metrics.jsonl's rows; none on a
    rank other than the main one, which writes no manifest): the load-balancing loss and the
    busiest expert's load over its fair share (model.moe.routing_metrics)."""
    rows = [r for r in rows if "moe_aux_loss" in r]
    return {k: _round(rows[-1][k]) for k in ("moe_aux_loss", "moe_max_load")} if rows else {}


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
