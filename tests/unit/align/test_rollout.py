"""RolloutLoader, the PPO/GRPO loop loader: its schedule of rollouts and minibatches, and resume."""

import pytest
import torch

from lmforge.align.rollout import RolloutLoader
from lmforge.errors import ConfigError


def _loader(calls, seed=0):
    """5 of 20 prompts a rollout, 2 rows each (10 rows), 2 passes in minibatches of 5."""

    def make(chosen, sampling_seed):
        calls.append((chosen, sampling_seed))
        rows = torch.tensor([p for p in chosen for _ in range(2)])
        return {"prompt": rows, "row": torch.arange(10) + 10 * len(calls)}

    return RolloutLoader(make, 20, 5, 10, 2, 5, seed, "grpo.rollout_prompts")


def test_each_pass_serves_every_row_of_a_rollout_once_then_samples_anew():
    calls = []
    loader = _loader(calls)
    assert loader.steps_per_rollout == 4
    batches = [next(loader)["row"].tolist() for _ in range(4)]
    assert len(calls) == 1 and len(set(calls[0][0])) == 5  # distinct prompts
    assert sorted(batches[0] + batches[1]) == sorted(batches[2] + batches[3]) == list(range(10, 20))
    assert batches[:2] != batches[2:]  # a fresh order each pass
    next(loader)
    assert len(calls) == 2 and calls[1] != calls[0]


def test_a_resumed_loader_serves_the_same_batches_and_samples_the_rollout_again():
    calls, again = [], []
    loader = _loader(calls, seed=3)
    for _ in range(2):
        next(loader)
    resumed = _loader(again, seed=0)
    resumed.load_state_dict(loader.state_dict())
    assert next(resumed)["prompt"].tolist() == next(loader)["prompt"].tolist()
    assert again == calls[:1]  # the rollout in progress: the same prompts and sampling seed


def test_more_rollout_prompts_than_prompts_names_the_setting():
    with pytest.raises(ConfigError, match=r"ppo\.rollout_prompts=5 exceeds the 4 training"):
        RolloutLoader(lambda c, s: {}, 4, 5, 5, 1, 5, 0, "ppo.rollout_prompts")
