"""generate(): the KV cache changes nothing but speed; sampling filters do what they promise."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import preset_config
from lmforge.model.generate import (
    apply_repetition_penalty,
    generate,
    generate_batched,
    left_pad,
    new_tokens,
    row_seed,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.model.transformer import Transformer


def make(name: str = "micro", **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset_config(name, init_std=0.2, **overrides))  # peaky, varied tokens


@pytest.mark.parametrize(
    ("style", "overrides"), [("micro", {}), ("micro", {"sliding_window": 6}), ("micro-gpt2", {})]
)
def test_cached_greedy_equals_uncached_token_for_token(style, overrides):
    model = make(style, **overrides)
    prompt = torch.randint(0, 256, (3, 7))
    cached = generate(model, prompt, 30, greedy=True)
    uncached = generate(model, prompt, 30, greedy=True, use_cache=False)
    assert cached.shape == (3, 37)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], prompt)
    assert len(set(cached[:, 7:].flatten().tolist())) > 3  # not a degenerate constant model


def test_temperature_zero_and_top_k_one_are_greedy():
    model = make()
    prompt = torch.randint(0, 256, (2, 5))
    greedy = generate(model, prompt, 12, greedy=True)
    assert torch.equal(generate(model, prompt, 12, temperature=0.0), greedy)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(generate(model, prompt, 12, top_k=1, generator=g), greedy)


def test_sampling_is_reproducible_with_a_generator_and_restores_train_mode():
    model = make().train()
    prompt = torch.randint(0, 256, (2, 5))
    a = generate(model, prompt, 10, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, generator=torch.Generator().manual_seed(3))
    c = generate(model, prompt, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training


def test_stop_tokens_end_rows_and_pad_with_the_stop_token():
    model = make()
    prompt = torch.randint(0, 256, (2, 4))
    free = generate(model, prompt, 20, greedy=True)
    stop = int(free[0, 4 + 3])  # the token row 0 emits at its 4th step
    first = (free[0, 4:] == stop).nonzero()[0].item() + 4
    out = generate(model, prompt, 20, greedy=True, stop_tokens=[stop])
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == stop).all()  # padded with the stop token after stopping
    hits1 = (free[1, 4:] == stop).nonzero()
    if len(hits1) == 0:  # row 1 never stops: it runs the full length, unchanged
        assert torch.equal(out[1], free[1])
    else:
        end1 = hits1[0].item() + 4
        assert torch.equal(out[1, : end1 + 1], free[1, : end1 + 1])
        assert (out[1, end1:] == stop).all()
        assert out.size(1) == max(first, end1) + 1  # both stopped: generation ended early


def test_generation_ends_early_when_every_row_stops():
    model = make()
    prompt = torch.randint(0, 256, (1, 4))
    free = generate(model, prompt, 10, greedy=True)
    out = generate(model, prompt, 10, greedy=True, stop_tokens=[int(free[0, 4])])
    assert out.shape == (1, 5)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_left_pad_pads_on_the_left_and_new_tokens_cut_at_the_first_stop():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(InputError, match="empty"):
        left_pad([[1], []])
    out = torch.tensor([[0, 3, 4, 2, 2], [0, 4, 4, 4, 4]])
    assert new_tokens(out, 1, stop_tokens=[2]) == [[3, 4, 2], [4, 4, 4, 4]]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(
    ("style", "overrides"), [("micro", {}), ("micro", {"sliding_window": 6}), ("micro-gpt2", {})]
)
def test_batched_greedy_equals_one_prompt_at_a_time(style, overrides, use_cache):
    model = make(style, **overrides)
    prompts = random_prompts([3, 11, 1, 7, 5])
    alone = [generate(model, torch.tensor([p]), 24, greedy=True)[0, len(p) :] for p in prompts]
    stop = int(alone[1][4])  # some rows stop early on it, at different steps
    assert any(stop not in a.tolist() for a in alone)  # and at least one row never does
    ids, mask = left_pad(prompts, pad_id=9)
    for stops in ([], [stop]):
        out = generate(
            model, ids, 24, pad_mask=mask, greedy=True, stop_tokens=stops, use_cache=use_cache
        )
        assert torch.equal(out[:, : ids.size(1)], ids)  # the prompts, padding included
        expected = [new_tokens(a[None], 0, stops)[0] for a in alone]
        assert new_tokens(out, ids.size(1), stops) == expected
    assert out.size(1) == ids.size(1) + 24  # a row that never stops runs the full length


def test_generate_batched_keeps_the_prompts_order():
    model = make("micro-gpt2")
    prompts = random_prompts([6, 2, 9, 4, 1], seed=3)
    alone = [generate(model, torch.tensor([p]), 10, greedy=True)[0, len(p) :] for p in prompts]
    stop = int(alone[2][3])
    expected = [new_tokens(a[None], 0, [stop])[0] for a in alone]
    got = generate_batched(model, prompts, 10, batch_size=2, stop_tokens=[stop], greedy=True)
    assert got == expected
    with pytest.raises(ConfigError, match="batch_size"):
        generate_batched(model, prompts, 10, batch_size=0)
    with pytest.raises(InputError, match=r"1 of the 6 prompts are empty \(the first at index 4\)"):
        generate_batched(model, [*prompts[:4], [], prompts[4]], 10, batch_size=2, greedy=True)
    assert generate_batched(model, [], 10) == []


def test_repetition_penalty_ignores_padding():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history, history_mask = torch.tensor([[3, 3, 0, 1]]), torch.tensor([[0, 0, 1, 1]])
    out = apply_repetition_penalty(logits, history, 2.0, history_mask)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # token 3 sits only in padding: untouched
    model = make()
    prompts = random_prompts([2, 6, 4], seed=1)
    alone = [
        generate(model, torch.tensor([p]), 16, greedy=True, repetition_penalty=1.5)[0, len(p) :]
        for p in prompts
    ]
    ids, mask = left_pad(prompts, pad_id=int(alone[0][0]))  # pad with a token row 0 emits
    out = generate(model, ids, 16, pad_mask=mask, greedy=True, repetition_penalty=1.5)
    assert [r.tolist() for r in out[:, ids.size(1) :]] == [a.tolist() for a in alone]


@pytest.mark.parametrize("style", ["micro", "micro-gpt2"])
def test_padded_sampling_never_sees_padding_and_stops_per_row(style):
    model = make(style)
    prompts = random_prompts([2, 9, 5, 1], seed=2)

    def sample(pad_id: int, stops=()):
        ids, mask = left_pad(prompts, pad_id=pad_id)
        g = torch.Generator().manual_seed(5)
        out = generate(model, ids, 20, pad_mask=mask, top_k=20, stop_tokens=stops, generator=g)
        return ids, out

    ids, free = sample(pad_id=0)
    _, other_pad = sample(pad_id=123)
    assert torch.equal(free[:, ids.size(1) :], other_pad[:, ids.size(1) :])  # pads are not seen
    stop = int(free[0, ids.size(1) + 2])
    _, out = sample(pad_id=0, stops=[stop])
    for row in range(len(prompts)):
        expected = new_tokens(free[row : row + 1], ids.size(1), [stop])[0]
        got = out[row, ids.size(1) :].tolist()
        assert got[: len(expected)] == expected  # same draws until the row stops
        assert all(t == stop for t in got[len(expected) :])  # then padded with its stop token


def test_bad_pad_masks_are_reported():
    model = make()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(InputError, match="left"):
        generate(model, ids, 2, pad_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(InputError, match="left"):
        generate(model, ids, 2, pad_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(InputError, match="match"):
        generate(model, ids, 2, pad_mask=torch.ones(2, 3))


def test_top_k_filter_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]


@pytest.mark.parametrize(("p", "expected"), [(0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (1.0, 4)])
def test_top_p_filter_keeps_the_smallest_nucleus(p, expected):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    filtered = top_p_filter(probs.log(), p)
    kept = torch.isfinite(filtered)[0]
    assert kept.sum().item() == expected
    order = [1, 3, 0, 2]  # tokens by probability
    assert kept[order[:expected]].all()


def test_per_row_generators_draw_from_the_softmax_and_only_their_own_rows():
    p = torch.tensor([0.1, 0.6, 0.05, 0.25])
    logits = p.log().repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sample_next(logits, logits.new_zeros(4000, 1, dtype=torch.long), generator=gens)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, p, atol=0.025)  # Gumbel-max samples p exactly in distribution
    filtered = sample_next(logits[:200], logits.new_zeros(200, 1, dtype=torch.long), top_k=2,
                           generator=gens[:200])  # fmt: skip
    assert set(filtered.tolist()) <= {1, 3}
    # row 0's draw depends on its generator alone, not on the rows beside it
    one = sample_next(logits[:1], None, generator=[torch.Generator().manual_seed(7)])
    many = sample_next(
        logits[:3], None, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    )
    assert one[0] == many[0]


@pytest.mark.parametrize("style", ["micro", "micro-gpt2"])
def test_seeded_batched_sampling_does_not_depend_on_the_batch_size(style):
    model = make(style)
    prompts = random_prompts([3, 11, 1, 7, 5, 2], seed=5)
    runs = {
        b: generate_batched(model, prompts, 16, batch_size=b, seed=11, temperature=1.0, top_p=0.9)
        for b in (1, 4, 16)
    }
    assert runs[1] == runs[4] == runs[16]
    assert len({tuple(r) for r in runs[1]}) > 1
    other_seed = generate_batched(model, prompts, 16, seed=12, temperature=1.0, top_p=0.9)
    assert other_seed != runs[1]
    alone = generate_batched(model, prompts[:1], 16, seed=11, temperature=1.0, top_p=0.9)
    assert alone[0] == runs[1][0]  # prompt 0 has seed (11, 0) in both calls
    assert len({row_seed(11, i) for i in range(1000)}) == 1000
    with pytest.raises(ConfigError, match="either seed"):
        generate_batched(model, prompts, 4, seed=1, generator=torch.Generator())


def test_top_p_sampling_only_draws_from_the_nucleus():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, logits.new_zeros(2000, 1, dtype=torch.long), top_p=0.7, generator=g)
    assert set(draws.tolist()) == {1, 3}
    frac = (draws == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.04  # renormalised inside the nucleus


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = torch.tensor([[0, 1, 1]])
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # greedy would pick token 0 without the penalty, token 2 with a strong one
    logits = torch.tensor([[3.0, 0.0, 2.0]])
    hist = torch.tensor([[0]])
    assert sample_next(logits, hist, greedy=True).item() == 0
    assert sample_next(logits, hist, greedy=True, repetition_penalty=2.0).item() == 2


def test_bad_sampling_settings_and_lengths_are_reported():
    model = make()
    prompt = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, prompt, 2, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, prompt, 2, top_p=0.0)
    with pytest.raises(InputError, match="block_size"):
        generate(model, prompt, 200)


def test_length_sorted_batches_span_at_most_max_span():
    from lmforge.model.generate import length_sorted_batches

    prompts = [[1] * 3, [1] * 2, [1] * 3, [1] * 3, [1] * 2, [1]]
    assert length_sorted_batches(prompts, 2) == [[5, 1], [4, 0], [2, 3]]
    assert length_sorted_batches(prompts, 2, max_span=0) == [[5], [1, 4], [0, 2], [3]]
    assert length_sorted_batches(prompts, 4) == [[5, 1, 4, 0], [2, 3]]
    assert length_sorted_batches(prompts, 4, max_span=1) == [[5, 1, 4], [0, 2, 3]]


@pytest.mark.parametrize("greedy", [True, False])
def test_max_length_batches_varied_lengths_each_row_as_alone(greedy, monkeypatch):
    """Under max_length each row stops at its own budget (max_length - its length) in a batch of
    varied lengths: the same tokens as each prompt run alone, forced eos at its own last step."""
    import importlib

    from lmforge.model.logits_rules import LogitsRules

    gen = importlib.import_module("lmforge.model.generate")  # the module, not the function
    model = make()  # block_size 64: max_length 20 lets lengths span 44 in a batch
    torch.manual_seed(1)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (3, 9, 5, 14, 7)]
    kw = dict(greedy=greedy, seed=None if greedy else 5, rules=LogitsRules(forced_eos_token_id=2))
    calls = []
    run = gen.generate
    monkeypatch.setattr(
        gen, "generate", lambda m, ids, *a, **k: calls.append(ids) or run(m, ids, *a, **k)
    )
    batched = generate_batched(model, prompts, 30, batch_size=8, max_length=20, **kw)
    assert [c.size(0) for c in calls] == [5]  # one batch of five lengths
    assert [len(p) + len(r) for p, r in zip(prompts, batched, strict=True)] == [20] * 5
    assert all(r[-1] == 2 for r in batched)  # forced at each row's own last step
    for i, (prompt, row) in enumerate(zip(prompts, batched, strict=True)):
        alone = gen.generate(model, torch.tensor([prompt]), 20 - len(prompt), greedy=greedy,
                             rules=kw["rules"], generator=None if greedy else [
                                 torch.Generator().manual_seed(row_seed(5, i))])  # fmt: skip
        assert row == alone[0, len(prompt) :].tolist(), i
