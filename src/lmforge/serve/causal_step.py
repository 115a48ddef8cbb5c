"""The engine's forward passes on a causal Transformer: prefill, a prompt's chunk, a decoding step.

Each pass takes the model and the running batch's layout (serve/batch_cache.py: rows
right-aligned at one length L, left padding masked) and returns next-token logits (B, V); the
engine samples from them (serve/emit.py) and keeps failures local to the rows of the pass.

- prefill_pass: newcomers' prompts left-padded into one pass, a fresh BatchCache of their own
  (with prefix cache hits: only the uncached tail of the columns runs);
- chunk_pass: the next positions of a prompt prefilled alone (start_pos + the model's causal
  mask), logits only once the prompt is whole;
- decode_pass: every row feeds its last token at start_pos=L with the batch's pad_mask, so each
  row keeps its own positions (model.transformer.pad_positions) and never attends to another
  row's padding. compiled=True runs model/compiled_decode.py's decode_step instead: the same
  step over the cache's whole storage with a mask of its live columns. Rows join and leave and
  the storage grows, so those two sizes are marked dynamic: one graph serves every batch of two
  or more rows and any storage width (dynamo gives a batch of one row its own);
  warm_up_compiled compiles both when the engine starts, not under the first requests.

Why this layout (the right-aligned batch cache) rather than fixed slots (a preallocated
(max_batch_size, block_size) cache, one slot per request, each row at its own start_pos): the
model's forward takes one start_pos for the whole batch, and left-padding with pad_mask is what it
already supports exactly (greedy rows equal generate() alone); fixed slots would run attention
over max_batch_size x block_size keys every step, most of them empty, while the right-aligned
cache only spans the live rows and the longest live sequence. Measured on the 2-core CPU (the
`small` body, 11M params, 16 rows, one decoding step, one thread, a loaded machine): 96 cached
positions 44 ms against 1023 (fixed slots at block_size 1024) 87 ms, and 47 against 56 ms at
block_size 512. Joining and leaving cost one copy of the cache, once per request, not per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.model.compiled_decode import compiled_decode_step
from lmforge.model.generate import left_pad
from lmforge.serve.batch_cache import BatchCache
from lmforge.serve.prefix_cache import PrefixHit


def prefill_pass(
    model: nn.Module, prompts: list[list[int]], device: torch.device,
    hits: list[PrefixHit] | None = None,
) -> tuple[BatchCache, Tensor]:  # fmt: skip
    """The prompts in one left-padded forward pass: their cache and next-token logits (B, V).

    hits (serve/prefix_cache.py): each prompt's cached leading positions. The pass then runs
    only the last T columns, T the longest uncached part, over the keys/values copied in before
    them; a row whose uncached part is shorter recomputes some cached positions in place of
    padding, so the layout stays plain left padding (no gap inside a row).
    """
    ids, mask = left_pad(prompts, device=device)
    B, L = ids.shape
    cache = BatchCache.empty(model, B, L)
    T = max(len(p) - h.tokens for p, h in zip(prompts, hits, strict=True)) if hits else L
    for i, (prompt, hit) in enumerate(zip(prompts, hits or [], strict=False)):
        first = L - len(prompt)  # the row's first token's column
        hit.write(cache.k[:, i, :, first:], cache.v[:, i, :, first:], len(prompt) - T)
    padded = not bool(mask.all())
    h = model.hidden_states(
        ids[:, L - T :], kv_cache=cache, start_pos=L - T, pad_mask=mask if padded else None
    )
    cache.pad_mask = mask
    return cache, model.lm_head(h[:, -1])  # (B, V): last column = each last token


def chunk_pass(
    model: nn.Module, cache: BatchCache, prompt: list[int], done: int, end: int,
    device: torch.device,
) -> Tensor | None:  # fmt: skip
    """prompt[done:end] into its own one-row cache; logits (1, V) once the prompt is whole."""
    ids = torch.tensor([prompt[done:end]], dtype=torch.long, device=device)
    h = model.hidden_states(ids, kv_cache=cache, start_pos=done)
    return model.lm_head(h[:, -1]) if end == len(prompt) else None


def decode_pass(
    model: nn.Module, cache: BatchCache, tokens: list[int], device: torch.device,
    compiled: bool = False,
) -> Tensor:  # fmt: skip
    """One decoding step: each row's last sampled token in, next-token logits (B, V) out."""
    ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
    start_pos = cache.length
    cache.reserve(1)
    padded = cache.padded()
    mask = cache.extend_mask(1)
    if compiled:
        return _compiled_pass(model, cache, ids, mask, start_pos)
    h = model.hidden_states(
        ids, kv_cache=cache, start_pos=start_pos, pad_mask=mask if padded else None
    )
    return model.lm_head(h[:, -1])


def _compiled_pass(
    model: nn.Module, cache: BatchCache, ids: Tensor, mask: Tensor, start_pos: int
) -> Tensor:
    """decode_pass through the compiled decode_step: the live columns (start .. start + L + 1,
    the new one included) marked in a (B, capacity) mask, the new key/value at start + L."""
    valid = torch.zeros((cache.rows, cache.capacity), dtype=torch.bool, device=ids.device)
    valid[:, cache.start : cache.start + mask.size(1)] = mask.bool()
    col = torch.tensor([cache.start + start_pos], device=ids.device)
    for t, dims in ((ids, (0,)), (valid, (0, 1)), (cache.k, (1, 3)), (cache.v, (1, 3))):
        torch._dynamo.mark_dynamic(t, dims)  # rows, storage columns
    return compiled_decode_step(model)(model, ids, valid, col, cache.k, cache.v)


def warm_up_compiled(model: nn.Module, device: torch.device) -> None:
    """Compiles the decoding step for one row and for several, on a throwaway batch, so that
    no request waits for a compile (tens of seconds on a CPU)."""
    with torch.inference_mode():
        for rows in (1, 2):
            cache, _ = prefill_pass(model, [[0]] * rows, device)
            decode_pass(model, cache, [0] * rows, device, compiled=True)
