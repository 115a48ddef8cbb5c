"""The batch cache: rows right-aligned, joins shift, leaves trim, storage bounded by block_size."""

from __future__ import annotations

import torch

from lmforge.model.config import preset_config
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer
from lmforge.serve.batch_cache import GROW, BatchCache
from lmforge.serve.engine import SamplingParams, collect


def block(model, lengths: list[int], fill: float) -> BatchCache:
    """A prefilled-looking cache: row i has lengths[i] tokens (value fill + i), right-aligned."""
    L = max(lengths)
    cache = BatchCache.empty(model, len(lengths), L)
    cache.pad_mask = torch.zeros((len(lengths), L), dtype=torch.long)
    for i, n in enumerate(lengths):
        cache.k[:, i, :, L - n : L] = fill + i
        cache.pad_mask[i, L - n :] = 1
    return cache


def live(cache: BatchCache, row: int) -> torch.Tensor:
    """Row's keys at its token positions (layer 0, head 0, first feature)."""
    k = cache.k[0, row, 0, cache.start : cache.start + cache.length, 0]
    return k[cache.pad_mask[row].bool()]


def test_merge_right_aligns_and_keep_trims_padding_columns():
    torch.manual_seed(0)
    model = Transformer(preset_config("micro", block_size=32))
    cache = block(model, [3, 5], fill=10)
    cache.merge([block(model, [9], fill=20)])  # longer joiner: the running rows shift right
    assert cache.length == 9 and cache.rows == 3
    assert cache.pad_mask.sum(1).tolist() == [3, 5, 9]
    assert [live(cache, i).tolist() for i in range(3)] == [[10] * 3, [11] * 5, [20] * 9]
    cache.keep([0, 1])  # the long row leaves: 4 all-padding columns go
    assert cache.length == 5 and cache.pad_mask.sum(1).tolist() == [3, 5]
    assert [live(cache, i).tolist() for i in range(2)] == [[10] * 3, [11] * 5]
    assert cache.padded()
    cache.keep([0])
    assert cache.length == 3 and not cache.padded()


def test_storage_grows_in_chunks_and_never_past_block_size():
    model = Transformer(preset_config("micro", block_size=32))
    cache = block(model, [30], fill=1)
    assert cache.capacity == 32  # 30 + GROW capped at block_size
    cache.reserve(2)
    assert cache.capacity == 32
    small = block(model, [4], fill=1)
    assert small.capacity == min(4 + GROW, 32)


def test_a_joiner_longer_than_the_batch_shifts_it_and_all_stay_exact(engine):
    files = engine.files
    short = files.encode("Paris")
    long = files.encode("Return the absolute value of a number. os.path.join joins paths. " * 2)
    assert len(long) > len(short) + 12
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    first = engine.submit(short, greedy, "short-first")
    events = iter(first)
    next(events)
    joiner = collect(engine.submit(long, SamplingParams(max_tokens=8, temperature=0), "long"))
    rest = [e.token_id for e in events]

    def alone(ids, n):
        return generate(engine.model, torch.tensor([ids]), n, greedy=True)[0, len(ids) :].tolist()

    assert joiner.token_ids == alone(long, 8)[: len(joiner.token_ids)]
    assert rest == alone(short, 30)[1:]


def test_prefill_groups_keep_padding_small():
    from lmforge.serve.engine import prefill_groups

    prompts = [[1] * 10, [1] * 2, [1] * 9, [1] * 3]
    assert prefill_groups(prompts) == [[0, 2], [3, 1]]
    assert prefill_groups([[1] * 5] * 4) == [[0, 1, 2, 3]]
    assert prefill_groups(prompts, waste=0.0) == [[0], [2], [3], [1]]
