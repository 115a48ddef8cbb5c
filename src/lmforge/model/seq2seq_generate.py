"""Encoder-decoder generation: encode each source once, then decode token by token from a cache.

The decoder's self-attention keys/values go into a KV cache, and the cross-attention keys/values of
the encoder output are computed once per batch (model.cross_kv) and reused at every step. Token
choice is generate.sample_next (repetition penalty over the target so far, temperature, top-k,
top-p, then argmax, a multinomial draw or per-row Gumbel draws): the same sampler as decoders.
Works for any model with encode / cross_kv / decode / logits / new_cache (Seq2SeqLM, and the T5
adapter in t5.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import InputError
from lmforge.model.generate import (
    _check_sampling,
    in_length_batches,
    new_tokens,
    pad_rows,
    sample_next,
)
from lmforge.model.logits_rules import NO_RULES, LogitsRules


def source_row(ids: Sequence[int], eos: int, max_len: int) -> list[int]:
    """The encoder's input for a source text's ids: cut to max_len - 1, then eos (as BART's
    tokenizer ends every sequence); fine-tuning and generation build sources alike."""
    return [*ids[: max_len - 1], eos]


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Source token lists as (ids, mask), (B, S_max), padded on the right (BART's positions
    count from each row's first token, so sources are padded after it)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("a seq2seq batch needs at least one source and no empty sources")
    return pad_rows(rows, pad_id, device, left=False)


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    src: Tensor,
    src_mask: Tensor | None,
    max_new_tokens: int,
    *,
    decoder_start_id: int,
    stop_tokens: Sequence[int] = (),
    rules: LogitsRules = NO_RULES,
    **sampling: Any,
) -> Tensor:
    """Target ids (B, 1 + n), n <= max_new_tokens, starting with decoder_start_id.

    A row that emits a stop token keeps it and is padded with it afterwards; decoding ends once
    every row has stopped. sampling: generate.sample_next's keywords (greedy, temperature, top_k,
    top_p, repetition_penalty, generator: one, or one per row); rules: model/logits_rules.py.
    """
    _check_sampling(
        sampling.get("temperature", 1.0), sampling.get("top_k"), sampling.get("top_p"),
        sampling.get("repetition_penalty", 1.0),
    )  # fmt: skip
    B = src.size(0)
    was_training = model.training
    model.eval()
    try:
        memory = model.encode(src, src_mask)
        cross = model.cross_kv(memory)  # once: every step attends to the same source
        cache = model.new_cache(B, 1 + max_new_tokens)
        out = torch.full((B, 1), decoder_start_id, dtype=torch.long, device=src.device)
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=src.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        pad = torch.zeros(B, dtype=torch.long, device=src.device)
        for step in range(max_new_tokens):
            h = model.decode(out[:, -1:], cross, src_mask, kv_cache=cache, start_pos=step)
            logits = rules.apply(
                model.logits(h[:, -1]), out, None, step, max_new_tokens, stop_tokens
            )
            nxt = torch.where(finished, pad, sample_next(logits, out, **sampling))
            out = torch.cat([out, nxt[:, None]], dim=1)
            hit = torch.isin(nxt, stops) & ~finished
            pad, finished = torch.where(hit, nxt, pad), finished | hit
            if len(stops) and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return out


def generate_seq2seq_batched(
    model: nn.Module,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    decoder_start_id: int,
    pad_id: int,
    stop_tokens: Sequence[int] = (),
    batch_size: int = 16,
    seed: int | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """Each source's new target ids (through its first stop), batch_size sources at a time.

    The loop is generate.generate_batched's (in_length_batches): batches by length, results in
    the sources' order, and with seed each source samples from its own generator, so results do
    not depend on batch_size; seed together with a sampling generator is a ConfigError.
    """
    device = next(model.parameters()).device

    def one_batch(rows: list[Sequence[int]], batch_sampling: dict[str, Any]) -> list[list[int]]:
        ids, mask = right_pad(rows, pad_id, device)
        out = generate_seq2seq(
            model, ids, mask, max_new_tokens, decoder_start_id=decoder_start_id,
            stop_tokens=stop_tokens, **batch_sampling,
        )  # fmt: skip
        return new_tokens(out, 1, stop_tokens)

    return in_length_batches(sources, one_batch, batch_size, seed, device, sampling)
