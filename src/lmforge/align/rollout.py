"""What PPO and GRPO share to roll out a policy: answers sampled with the KV-cache sampler, the
(B, T) rows that score them, reference log-probs (a frozen copy, or a LoRA policy's own base with
its adapters off) and RolloutLoader, the seeded schedule of rollouts and their minibatches.

Rows are aligned to logits: at position t the action is token t + 1, so `labels` holds each answer
token one position early and -100 elsewhere (the prompt, the padding).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.align.encode import prompt_ids
from lmforge.align.losses import token_logps
from lmforge.errors import ConfigError
from lmforge.finetune.lora import lora_modules
from lmforge.model.transformer import IGNORE_INDEX
from lmforge.train.distributed import Runtime
from lmforge.train.loop import autocast


@contextlib.contextmanager
def adapters_off(lm: nn.Module) -> Iterator[bool]:
    """Runs `lm` as its frozen base (LoRA scaling 0) inside the block; yields whether it had any."""
    modules = list(lora_modules(lm).values())
    saved = [m.scaling for m in modules]
    for m in modules:
        m.scaling = 0.0
    try:
        yield bool(modules)
    finally:
        for m, s in zip(modules, saved, strict=True):
            m.scaling = s


@contextlib.contextmanager
def eval_mode(lm: nn.Module) -> Iterator[None]:
    """lm in eval mode inside the block, back in the mode it had after (sampling and scoring
    rollouts happen in the middle of training)."""
    was_training = lm.training
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)


def frozen_copy(lm: nn.Module) -> nn.Module:
    """A frozen reference for full tuning (a LoRA policy uses its own base instead)."""
    return copy.deepcopy(lm).eval().requires_grad_(False)


def prompt_room(lm: nn.Module, max_new_tokens: int) -> int:
    """How many prompt tokens fit beside max_new_tokens answer tokens in the model's block."""
    room = lm.config.block_size - max_new_tokens
    if room < 1:  # ids[-0:] would keep the whole prompt and overrun the position table
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"block_size={lm.config.block_size}; lower ppo.max_new_tokens / grpo.max_new_tokens"
        )
    return room


def sample_answers(
    lm: nn.Module, tok: Any, records: list, max_new_tokens: int, seed: int, temperature: float
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids through the stop token) sampled with one generator per record
    (align.grpo_data.PromptRecord), its prompt rendered as training renders it (prompt_ids) and
    cut from the left to prompt_room (cut_prompts_warning counts those)."""
    from lmforge.model.generate import generate_batched

    room = prompt_room(lm, max_new_tokens)
    ids = [prompt_ids(tok, r.prompt, r.tool_conversation)[-room:] for r in records]
    answers = generate_batched(
        lm, ids, max_new_tokens, batch_size=len(ids), stop_tokens=tok.stop_ids(), seed=seed,
        temperature=temperature,
    )  # fmt: skip
    return ids, answers


def cut_prompts_warning(
    lm: nn.Module, tok: Any, records: list, max_new_tokens: int, setting: str
) -> str | None:
    """A warning counting the prompts longer than prompt_room, which sampling truncates keeping
    their end (finetune's sft.truncation=left): their start is dropped. None when all fit."""
    room = prompt_room(lm, max_new_tokens)
    cut = sum(len(prompt_ids(tok, r.prompt, r.tool_conversation)) > room for r in records)
    if not cut:
        return None
    return (
        f"{setting.split('.')[0]}: {cut} of {len(records)} prompts are longer than the {room} "
        f"tokens the model's block_size={lm.config.block_size} leaves beside {setting}="
        f"{max_new_tokens}: they are truncated keeping their end (their start dropped) when "
        f"sampled; lower {setting} or shorten those prompts"
    )


def answer_texts(tok: Any, answers: list[list[int]], strip: bool = True) -> list[str]:
    """Each answer decoded without its stop token, stripped (what a text reward reads) unless
    strip=False (code: a body's leading indentation is part of the program)."""
    stops = set(tok.stop_ids())
    texts = [tok.decode([t for t in a if t not in stops]) for a in answers]
    return [t.strip() for t in texts] if strip else texts


def answer_rows(
    prompt_ids: list[list[int]], answers: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) (N, T) of prompt + answer rows, right-padded; labels mark the answer."""
    T = max(len(p) + len(a) for p, a in zip(prompt_ids, answers, strict=True))
    ids = torch.full((len(answers), T), pad_id, dtype=torch.long)
    labels = torch.full((len(answers), T), IGNORE_INDEX, dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompt_ids, answers, strict=True)):
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a, dtype=torch.long)
    return ids, labels


@torch.no_grad()
def reference_logps(lm: nn.Module, reference: nn.Module | None, ids: Tensor, labels: Tensor):
    """Token log-probs (B, T) of labels under the reference: `reference`, or with None the
    policy `lm`'s own base (its LoRA adapters switched off)."""
    if reference is None:
        with adapters_off(lm):
            return token_logps(lm(ids), labels)
    return token_logps(reference.to(ids.device)(ids), labels)


class RolloutLoader:
    """The loop's loader of PPO and GRPO: a fresh rollout every `steps_per_rollout` steps, its
    rows served as shuffled minibatches in between.

    Rollout `index` is make(prompt indices, sampling seed) on `rollout_prompts` distinct prompts
    of `n_prompts`, both drawn from (train.seed, index): two seeds sample differently, a resume
    (state_dict: position, seed) samples the rollout in progress again, from the resumed policy.
    Each of `passes` passes over its `rows` rows takes them in a fresh seeded order.
    """

    def __init__(
        self, make: Callable[[list[int], int], dict[str, Tensor]], n_prompts: int,
        rollout_prompts: int, rows: int, passes: int, batch_size: int, seed: int, setting: str,
    ) -> None:  # fmt: skip
        if rollout_prompts > n_prompts:
            raise ConfigError(
                f"{setting}={rollout_prompts} exceeds the {n_prompts} training prompts; lower it"
            )
        self.make, self.n_prompts, self.rollout_prompts = make, n_prompts, rollout_prompts
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.steps_per_rollout = passes * (rows // batch_size)
        self.position = 0
        self.rollout: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])
        self.rollout = None

    def __iter__(self) -> RolloutLoader:
        return self

    def __next__(self) -> dict[str, Tensor]:
        index, k = divmod(self.position, self.steps_per_rollout)
        if k == 0 or self.rollout is None:
            rng = np.random.default_rng([self.seed, index])
            chosen = rng.choice(self.n_prompts, self.rollout_prompts, replace=False).tolist()
            sampling = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
            self.rollout = self.make(chosen, sampling)
        epoch, mb = divmod(k, self.rows // self.batch_size)
        order = np.random.default_rng([self.seed, index, epoch]).permutation(self.rows)
        rows = torch.from_numpy(order[mb * self.batch_size : (mb + 1) * self.batch_size])
        self.position += 1
        return {name: t[rows] for name, t in self.rollout.items()}


def standard_error(x: Tensor) -> float:
    """Standard error of the mean of x (N,); 0 for a single value."""
    return float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0


class HeldOutEval:
    """The loop's eval_fn (held-out rollout -> its metrics) that keeps its last rollout.

    Every rollout it samples, before training (sample), during and after, runs in eval mode under
    the loop's autocast (rt), on the device the caller moved the policy to (rt's), so "before"
    and "after" are sampled in the same numerics. The training loop evaluates at its last step
    (train.loop: at max_steps, or the step an early stop breaks at), so once it returns, the
    last rollout sampled from the policy itself (not a compiled or DDP wrapper) is exactly what
    sampling the final policy again would give: final() returns it instead of spending another
    held-out rollout.
    """

    def __init__(
        self,
        policy: nn.Module,
        rollout: Callable[[nn.Module], dict[str, Tensor]],
        metrics: Callable[[dict[str, Tensor]], dict[str, float]],
        rt: Runtime,
    ) -> None:
        self.policy, self.rollout, self.metrics, self.rt = policy, rollout, metrics, rt
        self.last: dict[str, Tensor] | None = None

    def sample(self, model: nn.Module) -> dict[str, Tensor]:
        """model's held-out rollout, in eval mode under the loop's autocast."""
        with eval_mode(model), autocast(self.rt):
            return self.rollout(model)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        rollout = self.sample(model)
        self.last = rollout if model is self.policy else None
        return self.metrics(rollout)

    def final(self) -> dict[str, Tensor]:
        """The final policy's held-out rollout (sampled now only if the loop made none)."""
        return self.last if self.last is not None else self.sample(self.policy)


def reward_headline(
    before: dict[str, Tensor],
    after: dict[str, Tensor],
    metrics: Callable[[dict[str, Tensor]], dict[str, float]],
    before_keys: list[str] | None = None,
) -> dict[str, float]:
    """PPO's and GRPO's held-out headline: the final rollout's metrics (val_loss aside), those of
    `before_keys` (default: all) before training as `*_before`, and the reward gain paired by
    prompt, whose standard error leaves out the spread between prompts."""
    now, then = metrics(after), metrics(before)
    keys = before_keys if before_keys is not None else [k for k in then if k != "val_loss"]
    gain = after["prompt_reward"] - before["prompt_reward"]
    headline = {k: v for k, v in now.items() if k != "val_loss"}
    headline.update({f"{k}_before": then[k] for k in keys})
    headline.update(val_reward_gain=gain.mean(), val_reward_gain_se=standard_error(gain))
    return {k: round(float(v), 5) for k, v in headline.items()}
