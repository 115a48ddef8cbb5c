"""Beam search on our KV caches, for decoders (left-padded batches) and encoder-decoders.

Each prompt keeps num_beams running hypotheses. Every step scores all num_beams * V one-token
continuations by their summed log-probability, keeps the best K = max(2, 1 + #stop tokens) *
num_beams (enough that num_beams of them have not stopped), moves the ones that end in a stop
token (or reach max_new_tokens) among the top num_beams into the prompt's finished list, and
continues with the best num_beams that did not stop. Caches follow their beams through
`reorder_cache(beam_idx)`: an index_select on the batch dimension (KVCache, and transformers'
caches under the same name).

The rules are transformers' `generate(num_beams=N, do_sample=False)` defaults, so the tokens
match: a finished hypothesis scores sum(log p) / generated_len ** length_penalty (its stop token
counted); early_stopping=False (the default) ends a prompt once num_beams hypotheses are
finished and the best running beam, scored at its current length, cannot beat the worst of them;
True ends it as soon as num_beams are finished; "never" scores the best running beam at
max_new_tokens when length_penalty > 0 (the canonical, exhaustive rule). The repetition penalty
is applied to log-probabilities, as transformers does under beam search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.model.generate import (
    KVCache,
    _check_pad_mask,
    apply_repetition_penalty,
    batch_budget,
    check_room,
    in_length_batches,
    last_logits,
    left_pad,
)
from lmforge.model.logits_rules import NO_RULES, LogitsRules
from lmforge.model.seq2seq_generate import right_pad

EarlyStopping = bool | Literal["never"]

# one decoding step: (next token per beam (N,), beam_idx (N,): the row each beam came from)
# -> next-token logits (N, V); N = prompts * num_beams
Step = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class BeamSettings:
    """How beams are kept and scored (transformers' generation_config names and defaults)."""

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    repetition_penalty: float = 1.0
    rules: LogitsRules = NO_RULES  # a checkpoint's n-gram, min-length, forced-token rules

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}"
            )
        if (rp := self.repetition_penalty) <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {rp}")


@torch.no_grad()
def beam_search(
    step: Step,
    first_logits: Tensor,
    history: Tensor,
    max_new_tokens: int,
    beams: BeamSettings,
    stop_tokens: Sequence[int] = (),
    history_mask: Tensor | None = None,
) -> list[list[int]]:
    """The best hypothesis of each prompt: its new ids, ending with its stop token if it has one.

    first_logits (B * nb, V): next-token logits after each prompt, its row repeated nb times
    (prompt i's beams are rows i * nb .. i * nb + nb - 1). history (B * nb, P): the tokens the
    repetition penalty sees (history_mask: 0 at padding). step(tokens, beam_idx) reorders the
    caller's caches by beam_idx, feeds tokens and returns the next logits.
    """
    nb = beams.num_beams
    N, V = first_logits.shape
    B, dev = N // nb, first_logits.device
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=dev)
    K = max(2, 1 + len(stops)) * nb
    if nb * V < K:
        raise InputError(f"beam search keeps {K} candidates; the vocabulary has only {V} tokens")
    rank_in_top = torch.arange(K, device=dev) < nb  # (K,) the candidates that may finish
    offsets = torch.arange(B, device=dev)[:, None] * nb  # (B, 1) first row of each prompt
    gen = torch.zeros((B, nb, max_new_tokens), dtype=torch.long, device=dev)  # running tokens
    scores = torch.full((B, nb), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # the beams start identical: only the first may expand at step one
    done = Finished(B, nb, max_new_tokens, dev)
    open_ = torch.ones(B, dtype=torch.bool, device=dev)  # prompts whose best may still improve
    logits = first_logits
    for t in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        if beams.repetition_penalty != 1.0:
            logp = apply_repetition_penalty(logp, history, beams.repetition_penalty, history_mask)
        logp = beams.rules.apply(logp, history, history_mask, t, max_new_tokens, stop_tokens)
        total = (logp.view(B, nb, V) + scores[:, :, None]).view(B, nb * V)
        cand_scores, cand = torch.topk(total, K)  # (B, K), best first
        cand_beam, cand_tok = cand // V, cand % V
        cand_gen = gen.gather(1, cand_beam[:, :, None].expand(B, K, max_new_tokens))  # a copy
        cand_gen[:, :, t] = cand_tok
        last = t + 1 == max_new_tokens  # every candidate ends here: max length
        stopped = torch.isin(cand_tok, stops) | last  # (B, K)
        may_finish = stopped & rank_in_top & open_[:, None]
        if beams.early_stopping is True:
            may_finish &= ~done.full()[:, None]
        done.add(cand_gen, cand_scores / (t + 1) ** beams.length_penalty, may_finish, t + 1)
        running = cand_scores.masked_fill(stopped, float("-inf"))  # a stopped one never runs on
        keep = torch.topk(running, nb).indices  # (B, nb)
        scores = running.gather(1, keep)
        gen = cand_gen.gather(1, keep[:, :, None].expand(B, nb, max_new_tokens))
        open_ &= ~done.full() | (best_possible(scores, t + 1, max_new_tokens, beams) > done.worst())
        if last or not bool(open_.any()):
            break
        if beams.early_stopping is True and bool(done.full().all()):
            break
        beam_idx = (cand_beam.gather(1, keep) + offsets).view(N)  # (N,) rows the beams came from
        tokens = gen[:, :, t].reshape(N)
        if beams.repetition_penalty != 1.0 or beams.rules.active:  # the history's readers
            history = torch.cat([history.index_select(0, beam_idx), tokens[:, None]], dim=1)
            if history_mask is not None:
                ones = history_mask.new_ones((N, 1))
                history_mask = torch.cat([history_mask.index_select(0, beam_idx), ones], dim=1)
        logits = step(tokens, beam_idx)
    return done.best()


def best_possible(scores: Tensor, length: int, max_new_tokens: int, beams: BeamSettings) -> Tensor:
    """The best final score (B,) the running beams are credited with (the early-stop rule)."""
    lp = beams.length_penalty
    if beams.early_stopping == "never" and lp > 0:
        length = max_new_tokens
    return scores[:, 0] / length**lp


class Finished:
    """The num_beams best finished hypotheses of each prompt, with their length-penalized scores."""

    def __init__(self, B: int, nb: int, max_len: int, device: torch.device) -> None:
        self.tokens = torch.zeros((B, nb, max_len), dtype=torch.long, device=device)
        self.lengths = torch.zeros((B, nb), dtype=torch.long, device=device)
        self.scores = torch.full((B, nb), float("-inf"), device=device)
        self.filled = torch.zeros((B, nb), dtype=torch.bool, device=device)

    def add(self, tokens: Tensor, scores: Tensor, mask: Tensor, length: int) -> None:
        """Merge candidates tokens (B, K, L) with scores (B, K) where mask (B, K); keep the best.

        A candidate a logits rule forbade (-inf) never counts as finished (transformers' empty
        slots score -1e9, so it never enters them)."""
        mask = mask & torch.isfinite(scores)
        nb = self.scores.size(1)
        all_scores = torch.cat([self.scores, scores.masked_fill(~mask, float("-inf"))], dim=1)
        best = torch.topk(all_scores, nb).indices  # (B, nb)
        self.scores = all_scores.gather(1, best)
        self.filled = torch.cat([self.filled, mask], dim=1).gather(1, best)
        lengths = torch.cat([self.lengths, torch.full_like(mask, length, dtype=torch.long)], 1)
        self.lengths = lengths.gather(1, best)
        all_tokens = torch.cat([self.tokens, tokens], dim=1)
        self.tokens = all_tokens.gather(1, best[:, :, None].expand_as(self.tokens))

    def full(self) -> Tensor:
        return self.filled.all(dim=1)  # (B,)

    def worst(self) -> Tensor:
        return self.scores.min(dim=1).values  # (B,)

    def best(self) -> list[list[int]]:
        """Each prompt's top hypothesis (slot 0: the merge keeps them best first)."""
        lengths = self.lengths[:, 0].tolist()
        return [row[:n] for row, n in zip(self.tokens[:, 0].tolist(), lengths, strict=True)]


def _expand(x: Tensor | None, nb: int) -> Tensor | None:
    """Each row repeated nb times in place: (B, ...) -> (B * nb, ...), a prompt's beams adjacent."""
    return None if x is None else x.repeat_interleave(nb, dim=0)


@torch.no_grad()
def beam_generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    beams: BeamSettings,
    *,
    pad_mask: Tensor | None = None,
    stop_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """Beam search for a decoder (Transformer) on left-padded prompts idx (B, T), pad_mask as in
    generate.generate. The prompts are prefilled once; the cache is then copied to the beams."""
    B, T = idx.shape
    total = check_room(model, T, max_new_tokens)
    nb = beams.num_beams
    pad_mask = _check_pad_mask(pad_mask, idx)  # None when nothing is padded
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, total)
        first = _expand(last_logits(model, idx, kv_cache=cache, pad_mask=pad_mask), nb)
        cache.reorder_cache(torch.arange(B, device=idx.device).repeat_interleave(nb))
        mask = _expand(pad_mask, nb)
        pos = T

        def step(tokens: Tensor, beam_idx: Tensor) -> Tensor:
            nonlocal mask, pos
            cache.reorder_cache(beam_idx)
            if mask is not None:  # a prompt's beams share its padding: no reorder needed
                mask = torch.cat([mask, mask.new_ones((mask.size(0), 1))], dim=1)
            logits = last_logits(
                model, tokens[:, None], kv_cache=cache, start_pos=pos, pad_mask=mask
            )
            pos += 1
            return logits

        return beam_search(step, first, _expand(idx, nb), max_new_tokens, beams, stop_tokens, mask)
    finally:
        model.train(was_training)


@torch.no_grad()
def beam_generate_seq2seq(
    model: nn.Module,
    src: Tensor,
    src_mask: Tensor | None,
    max_new_tokens: int,
    beams: BeamSettings,
    *,
    decoder_start_id: int,
    stop_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """Beam search for an encoder-decoder (Seq2SeqLM or the T5 adapter) on right-padded sources:
    each source is encoded once; its beams share the encoder output."""
    nb = beams.num_beams
    N = src.size(0) * nb
    was_training = model.training
    model.eval()
    try:
        mask = _expand(src_mask, nb)
        cross = model.cross_kv(_expand(model.encode(src, src_mask), nb))
        cache = model.new_cache(N, 1 + max_new_tokens)
        start = torch.full((N, 1), decoder_start_id, dtype=torch.long, device=src.device)
        pos = 0

        def step(tokens: Tensor, beam_idx: Tensor) -> Tensor:
            nonlocal pos
            pos += 1
            cache.reorder_cache(beam_idx)
            h = model.decode(tokens[:, None], cross, mask, kv_cache=cache, start_pos=pos)
            return model.logits(h[:, -1])

        first = model.logits(model.decode(start, cross, mask, kv_cache=cache)[:, -1])
        return beam_search(step, first, start, max_new_tokens, beams, stop_tokens)
    finally:
        model.train(was_training)


def beam_generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    beams: BeamSettings,
    *,
    batch_size: int = 16,
    stop_tokens: Sequence[int] = (),
    max_length: int | None = None,
) -> list[list[int]]:
    """beam_generate over token lists of any lengths, batch_size prompts (each with num_beams
    rows) at a time, in order of length, left-padded; results in the prompts' order.
    max_length: the prompt included, as generate_batched's."""
    device = next(model.parameters()).device

    def one_batch(rows: list[Sequence[int]], _: dict) -> list[list[int]]:
        ids, pad_mask = left_pad(rows, device=device)
        n = batch_budget(max_new_tokens, max_length, ids.size(1))
        return beam_generate(model, ids, n, beams, pad_mask=pad_mask, stop_tokens=stop_tokens)

    one_length = None if max_length is None else 0  # one budget a batch: one prompt length
    return in_length_batches(prompts, one_batch, batch_size, None, device, {}, one_length)


def beam_generate_seq2seq_batched(
    model: nn.Module,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    beams: BeamSettings,
    *,
    decoder_start_id: int,
    pad_id: int,
    stop_tokens: Sequence[int] = (),
    batch_size: int = 16,
) -> list[list[int]]:
    """beam_generate_seq2seq over source token lists, batch_size sources at a time, right-padded;
    results in the sources' order."""
    device = next(model.parameters()).device

    def one_batch(rows: list[Sequence[int]], _: dict) -> list[list[int]]:
        ids, mask = right_pad(rows, pad_id, device)
        return beam_generate_seq2seq(
            model, ids, mask, max_new_tokens, beams,
            decoder_start_id=decoder_start_id, stop_tokens=stop_tokens,
        )  # fmt: skip

    return in_length_batches(sources, one_batch, batch_size, None, device, {})
