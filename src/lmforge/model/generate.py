"""Autoregressive generation: prefill, then one cached token a step, batched and constrained.

generate() runs the prompt once (prefill), then feeds one token per step, reusing cached keys and
values (kv_cache.KVCache), so each step costs O(T) instead of O(T^2). Prompts of different
lengths run as one batch when left-padded (left_pad() builds the ids and the pad mask;
generate_batched() does it all for token lists): padding is masked out of attention and of the
repetition penalty, and each row's positions start at its own first token. Each token is chosen
by token_sampling.sample_next (repetition penalty, temperature, top-k, top-p, then argmax or a
draw; seeded per row when a prompt's sample must not depend on its batch).
A row may carry a RowConstraint (structured outputs: constrain.rows.GuidedRow), a stateful rule
that masks its logits after the LogitsRules and before the draw, and moves past each token drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmforge.constrain.rows import masked_logits
from lmforge.errors import ConfigError, InputError
from lmforge.model.compiled_decode import FixedShapeSteps, decode_capacity, use_compiled_decode
from lmforge.model.kv_cache import KVCache
from lmforge.model.logits_rules import NO_RULES, LogitsRules
from lmforge.model.token_sampling import (
    _check_sampling,
    apply_repetition_penalty,
    draw_per_row,
    sample_next,
    top_k_filter,
    top_p_filter,
)

# KVCache and the sampling functions live in kv_cache.py and token_sampling.py; importing them
# from here keeps working
__all__ = [
    "KVCache",
    "RowConstraint",
    "apply_repetition_penalty",
    "batch_budget",
    "check_room",
    "draw_per_row",
    "generate",
    "generate_batched",
    "in_length_batches",
    "last_logits",
    "left_pad",
    "length_sorted_batches",
    "new_tokens",
    "pad_rows",
    "row_seed",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]


class RowConstraint(Protocol):
    """A per-row rule with state: which tokens may come next, and the move past the one drawn.
    A row ends when its constraint is complete (then `length` new tokens are its answer)."""

    length: int  # tokens moved past so far
    complete: bool  # the row's answer is done: it ends here as at a stop token

    def allowed(self, vocab_size: int) -> Tensor:
        """Bool (vocab_size,) of the tokens that may come next (a tensor the caller may keep)."""
        ...

    def advance(self, token: int) -> bool:
        """Moves past the token drawn; True when the row is now complete."""
        ...


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Token lists of different lengths as (ids, pad_mask), both (B, T_max), padded on the left.

    pad_mask is 1 at tokens and 0 at padding (HF's attention_mask); pad_id is never attended to.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("left_pad needs at least one row and no empty rows")
    return pad_rows(rows, pad_id, device, left=True)


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None, *, left: bool
) -> tuple[Tensor, Tensor]:
    """Non-empty token lists as (ids, mask), (B, T_max), padded on the left (left=True) or on
    the right; mask is 1 at tokens. left_pad and seq2seq_generate.right_pad check the rows."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def new_tokens(out: Tensor, prompt_len: int, stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Each row's generated ids from generate()'s output, up to and including its first stop."""
    stops = set(stop_tokens)
    rows = []
    for row in out[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:end])
    return rows


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    pad_mask: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    greedy: bool = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    compile: str = "off",
    rules: LogitsRules = NO_RULES,
    row_budgets: Sequence[int] | None = None,
    constraints: Sequence[RowConstraint | None] | None = None,
) -> Tensor:
    """Continue each row of idx (B, T); returns (B, T + n), n <= max_new_tokens.

    pad_mask (B, T): 1 = token, 0 = padding, for prompts of different lengths left-padded to T
    (see left_pad); each row then generates exactly what it would alone (greedy: token for token,
    up to float rounding). The output keeps the padding, so row i's new tokens are out[i, T:].
    A row that emits one of stop_tokens keeps that token and is padded with it afterwards;
    generation ends early once every row has stopped. temperature=0 or greedy=True is argmax.
    use_cache=False recomputes the whole prefix each step (the reference the cache is tested on).
    compile: off | on | auto (on for CUDA only): decoding steps (not the prefill) run
    torch.compile'd on fixed shapes, model/compiled_decode.py; the same tokens up to rounding.
    rules: a checkpoint's n-gram, minimum-length and forced-token rules (model/logits_rules.py).
    row_budgets (B,): each row's own new-token limit (<= max_new_tokens), as if it ran alone
    with it: the row ends there as at a stop (out[i, T + row_budgets[i]:] is not its own) and
    a forced eos comes at its own last step.
    constraints (B,): a RowConstraint per row (None: free), masking the row's logits after
    the rules (the raw logits under its mask where the rules left it nothing) and advanced by
    each token the row draws; a complete one ends its row (out[i, T + constraints[i].length:]
    is not its own).
    """
    _check_sampling(temperature, top_k, top_p, repetition_penalty)
    B, T = idx.shape
    total = check_room(model, T, max_new_tokens)
    mask = _check_pad_mask(pad_mask, idx)  # None when nothing is padded: the unmasked fast path
    sampling = dict(
        temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, greedy=greedy, generator=generator,
    )  # fmt: skip
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
    budgets = None if row_budgets is None else torch.tensor(row_budgets, device=idx.device)
    limits = max_new_tokens if budgets is None else budgets  # where each row's last step is
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    pad = torch.zeros(B, dtype=torch.long, device=idx.device)  # each finished row's stop token
    ones = torch.ones((B, 1), dtype=torch.long, device=idx.device)
    compiled = use_compiled_decode(compile, idx.device) and use_cache  # checks the mode first
    was_training = model.training
    model.eval()
    try:
        size = decode_capacity(total, model.config.block_size) if compiled else total
        cache = KVCache.for_model(model, B, size) if use_cache else None
        out = idx
        logits = last_logits(model, idx, kv_cache=cache, pad_mask=mask)  # (B, V)
        fixed = FixedShapeSteps(model, cache, mask, T) if compiled else None
        for step in range(max_new_tokens):
            live = None if constraints is None else _live_constraints(constraints, finished)
            # the rules may write in place: a live constraint keeps the raw logits to fall back on
            copy = logits.clone() if live and rules.active else logits
            ruled = rules.apply(copy, out, mask, step, limits, stop_tokens)
            if live:
                ruled = masked_logits(ruled, logits, live, _allowed(constraints, live, ruled))
            nxt = sample_next(ruled, out, history_mask=mask, **sampling)  # (B,)
            nxt = torch.where(finished, pad, nxt)
            if live:
                finished |= _advance(constraints, live, nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            mask = None if mask is None else torch.cat([mask, ones], dim=1)  # (B, out.size(1))
            if len(stops):
                hit = torch.isin(nxt, stops) & ~finished
                pad = torch.where(hit, nxt, pad)
                finished |= hit
            if budgets is not None:
                finished |= budgets <= step + 1
            if (len(stops) or budgets is not None or constraints) and bool(finished.all()):
                break
            if step + 1 == max_new_tokens:
                break
            if fixed is not None:
                logits = fixed(nxt[:, None])
            elif cache is not None:
                pos = out.size(1) - 1
                logits = last_logits(
                    model, nxt[:, None], kv_cache=cache, start_pos=pos, pad_mask=mask
                )
            else:
                logits = last_logits(model, out, pad_mask=mask)
    finally:
        model.train(was_training)
    return out


def _live_constraints(constraints: Sequence[RowConstraint | None], finished: Tensor) -> list[int]:
    """The rows with a constraint that have not finished (one sync a step)."""
    if len(constraints) != finished.numel():
        raise ValueError(f"{len(constraints)} constraints for {finished.numel()} rows")
    done = finished.tolist()
    return [i for i, c in enumerate(constraints) if c is not None and not done[i]]


def _allowed(constraints: Sequence[Any], rows: list[int], logits: Tensor) -> Tensor:
    return torch.stack([constraints[i].allowed(logits.size(-1)) for i in rows])


def _advance(constraints: Sequence[Any], rows: list[int], nxt: Tensor) -> Tensor:
    """Each live constraint moved past its row's token; (B,) True where one became complete."""
    drawn = nxt.tolist()
    complete = [False] * nxt.numel()
    for i in rows:
        complete[i] = constraints[i].advance(drawn[i])
    return torch.tensor(complete, device=nxt.device)


def check_room(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """The positions a generation needs, prompt_len + max_new_tokens, if the model has them."""
    total = prompt_len + max_new_tokens
    if total > model.config.block_size:
        raise InputError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's block_size {model.config.block_size}; shorten the prompt or ask for fewer "
            "tokens"
        )
    return total


def last_logits(model: nn.Module, idx: Tensor, **kwargs: object) -> Tensor:
    """Next-token logits (B, V) at the last position only: lm_head on one position per row, not
    on the whole prompt (most of a prefill's matmul work at a small model's vocabulary)."""
    return model.lm_head(model.hidden_states(idx, **kwargs)[:, -1])


def _check_pad_mask(pad_mask: Tensor | None, idx: Tensor) -> Tensor | None:
    """pad_mask as 0/1 longs, or None when it pads nothing; left padding only."""
    if pad_mask is None:
        return None
    if pad_mask.shape != idx.shape:
        raise InputError(f"pad_mask {tuple(pad_mask.shape)} must match idx {tuple(idx.shape)}")
    mask = (pad_mask != 0).long()
    if bool(mask.all()):
        return None
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()) or not bool(mask[:, -1].all()):
        raise InputError("pad_mask must pad on the left and leave every row at least one token")
    return mask


def generate_batched(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    max_length: int | None = None,
    constraint: Callable[[], RowConstraint] | None = None,
    **sampling: Any,
) -> list[list[int]]:
    """generate() over token lists of any lengths: each prompt's new ids, through its first stop.

    Prompts run batch_size at a time, in order of length (so a batch holds little padding),
    left-padded; results come back in the prompts' order. sampling: generate()'s keywords. Greedy
    results equal one prompt at a time. With seed, prompt i samples from its own generator
    seeded by (seed, i), so sampled results do not depend on batch_size or on the other prompts'
    lengths: rerunning with another batch size reproduces them. seed and a sampling generator
    are exclusive (ConfigError): see in_length_batches. max_length: transformers' max_length,
    the prompt included: a prompt then gets at most max_length - its length new tokens
    (batch_budget), its own budget in a batch of varied lengths (generate's row_budgets); a
    batch's lengths span at most block_size - max_length, so that its longest prompt and its
    shortest prompt's budget fit the model's positions. constraint: builds each prompt's own
    RowConstraint (a complete one ends its answer there).
    """
    device = next(model.parameters()).device

    def one_batch(rows: list[Sequence[int]], batch_sampling: dict[str, Any]) -> list[list[int]]:
        ids, pad_mask = left_pad(rows, device=device)
        budgets = [batch_budget(max_new_tokens, max_length, len(row)) for row in rows]
        constraints = None if constraint is None else [constraint() for _ in rows]
        out = generate(
            model, ids, max(budgets), pad_mask=pad_mask, stop_tokens=stop_tokens,
            row_budgets=None if max_length is None else budgets, constraints=constraints,
            **batch_sampling,
        )  # fmt: skip
        new = new_tokens(out, ids.size(1), stop_tokens)
        if constraints is not None:
            ends = zip(constraints, budgets, strict=True)
            budgets = [c.length if c.complete else budget for c, budget in ends]
        return [row[:budget] for row, budget in zip(new, budgets, strict=True)]

    span = None if max_length is None else max(model.config.block_size - max_length, 0)
    return in_length_batches(prompts, one_batch, batch_size, seed, device, sampling, span)


def batch_budget(max_new_tokens: int, max_length: int | None, prompt_len: int) -> int:
    """The new tokens a prompt_len-token prompt gets: max_new_tokens, and with a max_length
    (prompt included, as transformers counts it) at most max_length - prompt_len."""
    if max_length is None:
        return max_new_tokens
    if prompt_len >= max_length:
        raise InputError(
            f"a prompt of {prompt_len} tokens leaves no room under max_length {max_length} "
            "(which counts the prompt); shorten the prompt or set max_new_tokens"
        )
    return min(max_new_tokens, max_length - prompt_len)


def in_length_batches(
    rows: Sequence[Sequence[int]],
    run_batch: Callable[[list[Sequence[int]], dict[str, Any]], list[list[int]]],
    batch_size: int,
    seed: int | None,
    device: torch.device | str,
    sampling: dict[str, Any],
    max_span: int | None = None,
) -> list[list[int]]:
    """run_batch(rows of one batch, sampling) over batch_size rows at a time, shortest first;
    results in the rows' order. The loop of generate_batched and generate_seq2seq_batched.
    max_span: length_sorted_batches'.

    seed gives row i its own generator seeded by (seed, i), so a row's sample does not depend on
    batch_size or its batch-mates. seed and sampling["generator"] are two ways to say where the
    randomness comes from: passing both is a ConfigError, never a silent choice.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if seed is not None and sampling.get("generator") is not None:
        raise ConfigError("pass either seed (one generator per prompt) or generator, not both")
    empty = [i for i, row in enumerate(rows) if len(row) == 0]
    if empty:  # named here: a batch of them would not know which row it was
        raise InputError(
            f"{len(empty)} of the {len(rows)} prompts are empty (the first at index {empty[0]}); "
            "each needs at least one token: drop them, or start them with a bos token"
        )
    results: list[list[int]] = [[] for _ in rows]
    for chunk in length_sorted_batches(rows, batch_size, max_span):
        batch_sampling = dict(sampling)
        if seed is not None:
            batch_sampling["generator"] = [
                torch.Generator(device).manual_seed(row_seed(seed, i)) for i in chunk
            ]
        new = run_batch([rows[i] for i in chunk], batch_sampling)
        for i, ids in zip(chunk, new, strict=True):
            results[i] = ids
    return results


def length_sorted_batches(
    prompts: Sequence[Sequence[int]], batch_size: int, max_span: int | None = None
) -> list[list[int]]:
    """Indices of prompts in batches of batch_size, shortest first, so a batch pads little;
    max_span: a batch's longest prompt is at most this much longer than its shortest (0: one
    length a batch; None: any)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        last = batches[-1] if batches else []
        span = len(prompts[i]) - len(prompts[last[0]]) if last else 0
        if last and len(last) < batch_size and (max_span is None or span <= max_span):
            last.append(i)
        else:
            batches.append([i])
    return batches


def row_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` in a call seeded with `seed` (distinct per index, 63 bits)."""
    return (seed * 1_000_003 + index * 0x9E3779B97F4A7C15 + 1) % 2**63
