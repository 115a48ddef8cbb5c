"""The engine's scheduling policy: which waiting requests join this step, which newcomers share a
prefill pass, and which prompts are prefilled alone, a budget-sized chunk per step.

Plain functions over prompts (lists of token ids); the engine applies them under its lock and
runs the passes they describe. Kept apart from the model-facing step so the policy can be read,
tested and changed without a model.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, TypeVar

PREFILL_PADDING = 0.25  # most padding a prefill pass may add, as a fraction of its prompt tokens


class _Prompted(Protocol):
    prompt: list[int]
    chain: Any  # its prompt's block keys, hashed once (serve/prefix_cache.py's TokenChain)


R = TypeVar("R", bound=_Prompted)


class PrefixIndex(Protocol):
    """What admission asks of a prefix cache (serve/prefix_cache.py's PrefixCache)."""

    def prefill_need(self, prompt: Any) -> tuple[int, bytes | None]: ...


def admit(waiting: deque[R], free: int, budget: int, prefix: PrefixIndex | None = None) -> list[R]:
    """Pops the waiting requests for this step's prefill: as many as the batch has `free` rows
    and the `budget` of prompt tokens allows (one at least), so a burst of long prompts delays
    the running rows' next tokens by one budget's prefill, not by all of them.

    With a prefix cache a prompt costs only its uncached tokens, and one whose first uncached
    block is also that of a prompt joining now waits (and those behind it, in order) for the
    next step, when the block is cached: a burst sharing a new system prompt prefills it once,
    not once per prompt admitted with the first (SGLang's in-batch prefix check)."""
    joining: list[R] = []
    starts: set[bytes] = set()  # the joining prompts' first uncached blocks
    while waiting and len(joining) < free:
        head = waiting[0]
        tokens, start = (
            (len(head.prompt), None) if prefix is None else prefix.prefill_need(head.chain)
        )
        if joining and (tokens > budget or start in starts):
            break
        joining.append(waiting.popleft())
        budget -= tokens
        if start is not None:
            starts.add(start)
    return joining


def plan_prefill(prompts: list[list[int]], budget: int) -> tuple[list[list[int]], list[int]]:
    """(groups prefilled whole, one pass each; prompts prefilled alone in chunks, longest first),
    as indices into `prompts`: a group whose padded pass exceeds `budget` tokens is chunked."""
    whole: list[list[int]] = []
    chunked: list[int] = []
    for group in prefill_groups(prompts):
        if len(group) * len(prompts[group[0]]) > budget:
            chunked += group
        else:
            whole.append(group)
    return whole, chunked


def prefill_groups(prompts: list[list[int]], waste: float = PREFILL_PADDING) -> list[list[int]]:
    """Indices of prompts grouped for prefill: longest first, a group closed when padding to its
    longest prompt would add more than `waste` (a fraction) to its tokens. A prefill is already
    compute-bound on its own tokens, so padding is pure loss; similar lengths still share a pass.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    groups: list[list[int]] = []
    total = 0
    for i in order:
        n = len(prompts[i])
        if groups and len(prompts[groups[-1][0]]) * (len(groups[-1]) + 1) <= (1 + waste) * (
            total + n
        ):
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups
