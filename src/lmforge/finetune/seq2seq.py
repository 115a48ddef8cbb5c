"""Task "seq2seq": encoder-decoder fine-tuning on {source, target} pairs (BART, T5, or scratch).

Rows (all right-padded to the longest in the set, at most train.seq_len):
  input_ids / attention_mask  the source's tokens then eos (what the encoder reads),
  decoder_input_ids           the decoder start token then the target (BART's shift-right),
  labels                      the target then eos, IGNORE_INDEX on padding.
seq2seq_loss hands them to the model's forward (the training loop's loss_fn seam), evaluation
decodes val sources greedily (model.seq2seq_generate) and scores them with the project's text
metrics (evals.metrics: ROUGE-1/2/L, sacrebleu BLEU, exact match). The special ids live in the
final/ directory's config.json and generation_config.json (decoder_start_token_id, eos, pad),
where transformers' generate() and `lmforge generate` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.lora import DEFAULT_TARGETS, LoraConfig
from lmforge.model.seq2seq_generate import source_row
from lmforge.model.t5 import wraps_transformers
from lmforge.model.transformer import IGNORE_INDEX
from lmforge.tokenizer.files import TokenizerFiles


@dataclass(frozen=True)
class Seq2SeqIds:
    """The three ids a seq2seq model's rows and generations are built with."""

    pad: int
    eos: int
    decoder_start: int

    @classmethod
    def of(cls, model_config: dict[str, Any], tok: TokenizerFiles) -> Seq2SeqIds:
        """From the base model's config.json when it has them (BART: start = eos), else the
        tokenizer's: eos ends sources and targets, decoder start = bos, else pad (as T5)."""
        eos = model_config.get("eos_token_id", tok.eos_id)
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise InputError(f"{tok.path} has no eos token; a seq2seq model needs one to stop")
        pad = model_config.get("pad_token_id", tok.pad_id)
        start = model_config.get("decoder_start_token_id")
        if start is None:
            start = tok.bos_id if tok.bos_id is not None else pad
        return cls(pad=int(pad), eos=int(eos), decoder_start=int(start))

    def config(self, bos: int | None) -> dict[str, Any]:
        """config.json / generation_config.json keys transformers' generate() reads."""
        ids = {"pad_token_id": self.pad, "eos_token_id": self.eos,
               "decoder_start_token_id": self.decoder_start}  # fmt: skip
        return ids if bos is None else {**ids, "bos_token_id": bos}


def encode_pairs(
    tok: TokenizerFiles, examples: list[dict[str, str]], ids: Seq2SeqIds, max_len: int
) -> tuple[dict[str, np.ndarray], int]:
    """Padded rows of every pair (see the module docstring) and how many were truncated."""
    sources, targets, cut = [], [], 0
    for example in examples:
        src, tgt = tok.encode(example["source"]), tok.encode(example["target"])
        cut += len(src) >= max_len or len(tgt) >= max_len
        sources.append(source_row(src, ids.eos, max_len))
        targets.append(tgt[: max_len - 1])
    S, T = max(map(len, sources)), max(map(len, targets)) + 1
    n = len(examples)
    rows = {
        "input_ids": np.full((n, S), ids.pad, dtype=np.int64),
        "attention_mask": np.zeros((n, S), dtype=np.int64),
        "decoder_input_ids": np.full((n, T), ids.pad, dtype=np.int64),
        "labels": np.full((n, T), IGNORE_INDEX, dtype=np.int64),
    }
    for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
        rows["input_ids"][i, : len(src)] = src
        rows["attention_mask"][i, : len(src)] = 1
        rows["decoder_input_ids"][i, : len(tgt) + 1] = [ids.decoder_start, *tgt]
        rows["labels"][i, : len(tgt) + 1] = [*tgt, ids.eos]
    return rows, cut


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean fp32 cross-entropy of the target tokens (and eos) given the source."""
    loss = model(
        batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
        labels=batch["labels"],
    )  # fmt: skip
    return loss, {}


def build_seq2seq_model(model_dir: Path, preset: str | None, vocab_size: int) -> nn.Module:
    """A fresh preset (from scratch; vocab from the tokenizer) or the encoder-decoder in model_dir."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import load_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM

    if preset is not None:
        cfg = preset_config(preset, vocab_size=vocab_size)
        if not cfg.is_encoder_decoder:
            raise ConfigError(
                f"from_scratch={preset!r} is not an encoder-decoder; use bart-micro or bart-tiny"
            )
        return Seq2SeqLM(cfg).train()
    model = load_pretrained(model_dir, quantized="dequantize").train()
    if not model.config.is_encoder_decoder:
        raise ConfigError(
            f"{model_dir} is not an encoder-decoder: --task seq2seq needs a BART or T5 checkpoint, "
            "or --set from_scratch=bart-micro (then --model only supplies tokenizer files)"
        )
    return model


# T5's attention (q, k, v, o) and feed-forward input (wi, or wi_0/wi_1) linears; not wo, whose
# .weight transformers' feed-forward reads directly (a LoRA wrapper has none)
T5_LORA_TARGETS = ["q", "k", "v", "o", "wi", "wi_0", "wi_1"]


def lora_targets_for(model: nn.Module, lora: LoraConfig) -> LoraConfig:
    """lora, with T5's module names as targets when a T5 model kept the default (our) names."""
    if wraps_transformers(model) and lora.targets == DEFAULT_TARGETS:
        return lora.model_copy(update={"targets": T5_LORA_TARGETS})
    return lora


def seq2seq_eval(
    model: nn.Module,
    tok: TokenizerFiles,
    examples: list[dict[str, str]],
    ids: Seq2SeqIds,
    max_new_tokens: int,
    batch_size: int,
    num_beams: int = 1,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """ROUGE-1/2/L, BLEU and exact match of greedy (num_beams 1) or beam search outputs on
    examples, and the outputs."""
    from lmforge.evals.metrics import bleu, exact_match, rouge
    from lmforge.model.beam_search import BeamSettings, beam_generate_seq2seq_batched
    from lmforge.model.seq2seq_generate import generate_seq2seq_batched

    max_len = model.config.block_size
    sources = [source_row(tok.encode(e["source"]), ids.eos, max_len) for e in examples]
    opts = dict(decoder_start_id=ids.decoder_start, pad_id=ids.pad, stop_tokens=[ids.eos],
                batch_size=batch_size)  # fmt: skip
    budget = min(max_new_tokens, max_len - 1)
    if num_beams > 1:
        new = beam_generate_seq2seq_batched(model, sources, budget, BeamSettings(num_beams), **opts)
    else:
        new = generate_seq2seq_batched(model, sources, budget, greedy=True, **opts)
    outputs = [tok.decode([t for t in row if t != ids.eos]).strip() for row in new]
    refs = [e["target"] for e in examples]
    scores = {**rouge(outputs, refs), "bleu": bleu(outputs, refs)["bleu"],
              "exact_match": exact_match(outputs, refs)}  # fmt: skip
    rows = [{"source": e["source"], "target": e["target"], "output": o}
            for e, o in zip(examples, outputs, strict=True)]  # fmt: skip
    return {k: round(float(v), 4) for k, v in scores.items()}, rows
