"""Speculative decoding returns the target's own greedy tokens, whatever the draft proposes."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import preset_config
from lmforge.model.generate import generate, new_tokens
from lmforge.model.speculative import SCHEDULES, speculative_generate
from lmforge.model.transformer import Transformer


def make(seed: int, name: str = "micro", **overrides) -> Transformer:
    torch.manual_seed(seed)
    # float64: the target's k+1-token verify pass and its one-token steps round alike
    return Transformer(preset_config(name, init_std=0.2, **overrides)).double()


def greedy(model: Transformer, prompt: list[int], n: int, stops: list[int] = ()) -> list[int]:
    out = generate(model, torch.tensor([prompt]), n, greedy=True, stop_tokens=stops)
    return new_tokens(out, len(prompt), stops)[0]


PROMPTS = [[5], [17, 3, 99, 42, 7, 200, 11], list(range(30, 50))]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize(("style", "overrides"), [("micro", {}), ("micro-gpt2", {}),
                                                  ("micro", {"sliding_window": 6})])  # fmt: skip
def test_a_disagreeing_draft_still_gives_the_targets_greedy_tokens(k, style, overrides):
    target = make(0, style, **overrides)
    draft = make(1, "micro", n_layer=1)  # another random model: mostly wrong guesses
    for prompt in PROMPTS:
        res = speculative_generate(target, draft, prompt, 40, draft_tokens=k)
        assert res.tokens == greedy(target, prompt, 40)
        assert len(res.tokens) == 40
        assert res.stats.proposed > 0 and res.stats.acceptance_rate < 0.5  # the draft did disagree
        assert res.stats.target_passes <= 40


def test_the_target_as_its_own_draft_has_every_guess_accepted():
    target = make(0)
    res = speculative_generate(target, target, PROMPTS[1], 41, draft_tokens=4)
    assert res.tokens == greedy(target, PROMPTS[1], 41)
    # 41 tokens: 1 from the prefill, then 8 rounds of 4 accepted guesses + the target's own
    assert res.stats.accepted == res.stats.proposed == 32
    assert res.stats.acceptance_rate == 1.0
    assert res.stats.target_passes == 1 + 8  # prefill, then 5 tokens a pass


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stop_tokens_end_the_answer_where_generate_ends_it(schedule):
    target, draft = make(0), make(0)
    full = greedy(target, PROMPTS[1], 40)
    stop = full[9]  # inside a round's guesses: accepted, then the answer ends there
    expected = full[: full.index(stop) + 1]
    res = speculative_generate(target, draft, PROMPTS[1], 40, draft_tokens=4,
                               schedule=schedule, stop_tokens=[stop])  # fmt: skip
    assert res.tokens == expected == greedy(target, PROMPTS[1], 40, [stop])
    res = speculative_generate(target, make(2), PROMPTS[1], 40, draft_tokens=3,
                               schedule=schedule, stop_tokens=[stop])  # fmt: skip
    assert res.tokens == expected


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n", [1, 2, 6, 7, 12])
def test_max_new_tokens_is_never_exceeded(n, schedule):
    target = make(0)
    res = speculative_generate(target, target, PROMPTS[1], n, draft_tokens=5, schedule=schedule)
    assert res.tokens == greedy(target, PROMPTS[1], n)


def test_the_block_size_of_either_model_bounds_the_generation():
    target, draft = make(0, block_size=32), make(1, block_size=16)
    assert speculative_generate(target, target, [1] * 8, 24).tokens == greedy(target, [1] * 8, 24)
    with pytest.raises(InputError, match="block_size 32"):
        speculative_generate(target, target, [1] * 8, 25)
    with pytest.raises(InputError, match="block_size 16"):
        speculative_generate(target, draft, [1] * 8, 10)


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(ConfigError, match=r"draft's vocabulary \(300 tokens\) differs"):
        speculative_generate(make(0), make(1, vocab_size=300), [1, 2], 5)


def test_bad_arguments_are_refused():
    model = make(0)
    with pytest.raises(ConfigError, match="draft_tokens must be >= 1"):
        speculative_generate(model, model, [1], 5, draft_tokens=0)
    with pytest.raises(InputError, match="at least one token"):
        speculative_generate(model, model, [], 5)
    encoder = Transformer(preset_config("bert-micro"))
    with pytest.raises(ConfigError, match="draft is not one"):
        speculative_generate(model, encoder, [1], 5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("confidence", [None, 0.5, 1.0])
def test_the_schedule_and_the_confidence_stop_keep_the_targets_greedy_tokens(schedule, confidence):
    target = make(0)
    for draft in (make(1, n_layer=1), target):  # mostly wrong guesses; every guess right
        for prompt in PROMPTS:
            res = speculative_generate(target, draft, prompt, 33, draft_tokens=2,
                                       schedule=schedule, confidence=confidence)  # fmt: skip
            assert res.tokens == greedy(target, prompt, 33)


def test_the_heuristic_schedule_grows_k_while_every_guess_is_accepted():
    target = make(0)
    # k = 1, 3, 5, 7, 9, 11, then the last 3 tokens' room: 1 + (2+4+6+8+10+12) + (3+1) = 47
    res = speculative_generate(target, target, PROMPTS[1], 47, draft_tokens=1, schedule="heuristic")
    assert res.tokens == greedy(target, PROMPTS[1], 47)
    assert res.stats.target_passes == 1 + 7
    assert res.stats.accepted == res.stats.proposed == 1 + 3 + 5 + 7 + 9 + 11 + 3


def test_the_heuristic_schedule_shrinks_k_to_one_when_guesses_miss():
    target, draft = make(0), make(1, n_layer=1)
    res = speculative_generate(target, draft, PROMPTS[1], 30, draft_tokens=6, schedule="heuristic")
    constant = speculative_generate(target, draft, PROMPTS[1], 30, draft_tokens=6)
    assert res.tokens == constant.tokens
    # every round misses here, so k goes 6, 5, 4, 3, 2, then 1 a round: far fewer guesses
    assert res.stats.accepted == constant.stats.accepted == 0
    assert res.stats.proposed < constant.stats.proposed / 3


def test_a_confidence_of_one_stops_each_round_after_one_guess():
    target = make(0)
    res = speculative_generate(target, target, PROMPTS[1], 21, draft_tokens=4, confidence=1.0)
    assert res.tokens == greedy(target, PROMPTS[1], 21)
    assert res.stats.proposed == res.stats.accepted == 10  # one guess + the target's own a pass
    assert res.stats.target_passes == 1 + 10


def test_bad_schedule_or_confidence_is_refused():
    model = make(0)
    with pytest.raises(ConfigError, match="schedule must be one of constant, heuristic, backoff"):
        speculative_generate(model, model, [1], 5, schedule="fast")
    with pytest.raises(ConfigError, match=r"confidence must be a probability in \[0, 1\]"):
        speculative_generate(model, model, [1], 5, confidence=1.5)


def test_backoff_pauses_a_draft_that_never_agrees_and_keeps_the_targets_tokens():
    target, useless = make(0), make(1, n_layer=1)
    for prompt in PROMPTS:
        res = speculative_generate(target, useless, prompt, 60, draft_tokens=2, schedule="backoff")
        assert res.tokens == greedy(target, prompt, 60)
        assert res.stats.accepted == 0
        # k 2, 1, then probes of 1 guess after pauses of 1, 2, 4, 8, 16, 32 plain steps
        assert res.stats.proposed <= 2 + 1 + 6
        assert res.stats.target_passes == 60  # one token a pass, as plain greedy


def test_backoff_with_a_draft_that_agrees_never_pauses():
    target = make(0)
    for prompt in PROMPTS:
        res = speculative_generate(target, target, prompt, 40, schedule="backoff")
        heuristic = speculative_generate(target, target, prompt, 40, schedule="heuristic")
        assert res.tokens == heuristic.tokens == greedy(target, prompt, 40)
        assert res.stats == heuristic.stats


def test_backoff_with_a_partly_agreeing_draft_keeps_the_targets_tokens():
    target = make(0)
    partly = copy.deepcopy(target)  # the target, perturbed: agrees on 30-50% of its guesses
    torch.manual_seed(5)
    with torch.no_grad():
        for w in partly.parameters():
            w.add_(torch.randn_like(w) * 0.01)
    for prompt in PROMPTS:
        res = speculative_generate(target, partly, prompt, 50, draft_tokens=3, schedule="backoff")
        assert res.tokens == greedy(target, prompt, 50)
        assert 0 < res.stats.acceptance_rate < 1
        assert res.stats.target_passes < 40  # kept drafting: guesses saved target passes


class _WrongFirst(torch.nn.Module):
    """An lm_head whose first `wrong` calls return negated logits (a guess the target never
    makes), then the real ones: a draft that disagrees, is paused, then agrees."""

    def __init__(self, head: torch.nn.Module, wrong: int) -> None:
        super().__init__()
        self.head, self.wrong = head, wrong

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.wrong -= 1
        return -self.head(h) if self.wrong >= 0 else self.head(h)


@pytest.mark.parametrize("wrong", [2, 4, 6])
def test_backoff_catches_the_draft_cache_up_on_tokens_made_while_paused(wrong):
    target = make(0)
    draft = copy.deepcopy(target)  # the target itself once its head turns right
    draft.lm_head = _WrongFirst(draft.lm_head, wrong)
    prompt = PROMPTS[1]
    res = speculative_generate(target, draft, prompt, 120, draft_tokens=1, schedule="backoff")
    assert res.tokens == greedy(target, prompt, 120)
    # the draft's cache skipped the paused steps' tokens; fed them on its next probe, every guess
    # after the head turns right is the target's own: the only misses are the wrong ones
    assert res.stats.proposed - res.stats.accepted == wrong
    assert res.stats.accepted > 30
