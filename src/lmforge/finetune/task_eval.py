"""Held-out text metrics after finetuning: SFT's ROUGE-L of greedy answers and seq2seq's
ROUGE/BLEU/exact match (val_outputs.jsonl), each beside the untuned base model's when asked."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from lmforge.artifacts import StageContext
from lmforge.finetune import seq2seq
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.evaluate import rouge_eval
from lmforge.finetune.export import tuned_generation_config
from lmforge.finetune.fit import eval_fn
from lmforge.finetune.prepare import Prepared, base_seq2seq_ids
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids


def sft_val_metrics(
    cfg: FinetuneConfig, tok: TokenizerFiles, model: nn.Module, data: Prepared
) -> dict:
    """ROUGE-L of greedy answers on val examples; with compare_base, the base model's too.

    base_val_loss is the untuned model on the same val batches as val_loss, so the gain of any
    method is base_val_loss - val_loss.
    """
    out: dict[str, Any] = {}
    base = None
    if cfg.eval.compare_base:
        base, out["base_val_loss"] = _base_and_val_loss(cfg, model, data)
    examples = data.val_examples[: cfg.eval.rouge_examples]
    if examples:
        # what final/ will stop at, the base's answers included
        stops = eos_ids(tuned_generation_config(cfg.model_dir(), tok))
        opts = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        score, _ = rouge_eval(model, tok, examples, stops, **opts)
        out.update(rouge_l=round(score, 4), rouge_examples=len(examples))
        if base is not None:
            base_score, _ = rouge_eval(base, tok, examples, stops, **opts)
            out["base_rouge_l"] = round(base_score, 4)
    return out


def seq2seq_val_metrics(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, model: nn.Module, data: Prepared
) -> dict[str, Any]:
    """Text metrics of greedy (or eval.num_beams beam search) outputs on val (base_* and
    base_val_loss too for a pretrained base), and val_outputs.jsonl with each source, target
    and output."""
    examples = data.val_examples[: cfg.eval.rouge_examples]
    if not examples:
        return {}
    ids = base_seq2seq_ids(cfg, tok)
    opts = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                num_beams=cfg.eval.num_beams)  # fmt: skip
    scores, rows = seq2seq.seq2seq_eval(model, tok, examples, ids, **opts)
    ctx.atomic_write_text(
        ctx.out / "val_outputs.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    out: dict[str, Any] = {**scores, "eval_examples": len(examples)}
    if cfg.eval.compare_base and not cfg.from_scratch:
        base, out["base_val_loss"] = _base_and_val_loss(cfg, model, data)
        base_scores, _ = seq2seq.seq2seq_eval(base, tok, examples, ids, **opts)
        out.update({f"base_{k}": v for k, v in base_scores.items()})
    return out


def _base_and_val_loss(
    cfg: FinetuneConfig, model: nn.Module, data: Prepared
) -> tuple[nn.Module, float | None]:
    """The untuned base model (on the tuned one's device) and its loss on the same val batches
    as val_loss."""
    from lmforge.model.convert import load_pretrained

    device = next(model.parameters()).device
    base = load_pretrained(cfg.model_dir(), device, quantized="dequantize")
    with torch.no_grad():
        return base, rounded(eval_fn(cfg, data.val_rows)(base)["val_loss"])


def rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
