"""The logits rules a checkpoint's generation_config can ask for, as transformers applies them.

One LogitsRules value is applied at every decoding step by greedy and sampled decoding
(generate.generate, seq2seq_generate.generate_seq2seq) and by beam search (on log-probabilities,
as transformers does), so the three agree. Each rule is transformers' processor of the same
name: NoRepeatNGramLogitsProcessor (no_repeat_ngram_size), MinLengthLogitsProcessor (min_length:
the whole sequence, prompt or decoder start included), MinNewTokensLengthLogitsProcessor
(min_new_tokens; when it is set, min_length is not applied: transformers then sets
min_length = min_new_tokens + the input length, the same rule), ForcedBOSTokenLogitsProcessor
(the first token after a one-token start, i.e. an encoder-decoder's first target token) and
ForcedEOSTokenLogitsProcessor (the last step). Lengths
and n-grams are per row, without left padding, i.e. what transformers does for one prompt (in a
left-padded batch transformers counts the padding in min_length and in its n-grams), so a row's
tokens do not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.errors import ConfigError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class LogitsRules:
    """Which rules apply (transformers' generation_config names; 0 / None = off)."""

    no_repeat_ngram_size: int = 0
    min_length: int = 0
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if any(i < 0 for i in self.forced_ids()):  # -1 would force the vocabulary's last token
            raise ConfigError(
                f"forced_bos_token_id / forced_eos_token_id must be token ids >= 0, got "
                f"{self.forced_bos_token_id} / {self.forced_eos_token_id}"
            )

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any]) -> LogitsRules:
        """The rules a generation_config-style mapping sets (a missing key: that rule off; a list
        of forced EOS ids, as JSON holds it, becomes a tuple)."""
        eos = keys.get("forced_eos_token_id")
        return cls(
            no_repeat_ngram_size=keys.get("no_repeat_ngram_size", 0),
            min_length=keys.get("min_length", 0),
            min_new_tokens=keys.get("min_new_tokens", 0),
            forced_bos_token_id=keys.get("forced_bos_token_id"),
            forced_eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def forced_ids(self) -> list[int]:
        """Every id a forcing rule names."""
        bos, eos = self.forced_bos_token_id, self.forced_eos_token_id
        return [*([] if bos is None else [bos]), *([eos] if isinstance(eos, int) else eos or ())]

    @property
    def active(self) -> bool:
        """Whether any rule may change a logit (callers skip the work otherwise)."""
        return self != NO_RULES

    def apply(
        self,
        logits: Tensor,
        history: Tensor,
        history_mask: Tensor | None,
        step: int,
        max_new_tokens: int | Tensor,
        eos: Sequence[int],
    ) -> Tensor:
        """logits (B, V) for new token `step` (0-based) after history (B, T) with the rules
        applied; history_mask (B, T) 0 at left padding; eos: the stop ids min lengths hold off;
        max_new_tokens: the limit (or (B,) each row's) whose last step a forced eos takes.
        logits may be written in place (the n-gram ban): pass a step's logits no one else
        reads, and use the tensor returned."""
        if not self.active:
            return logits
        if (big := max(self.forced_ids(), default=-1)) >= logits.size(-1):
            raise ConfigError(
                f"forced token id {big} is outside the model's vocabulary of {logits.size(-1)}; "
                "fix forced_bos_token_id / forced_eos_token_id (settings or generation_config.json)"
            )
        lengths = (
            torch.full((history.size(0),), history.size(1), device=history.device)
            if history_mask is None
            else history_mask.sum(dim=1)
        )  # (B,) each row's tokens so far
        if self.no_repeat_ngram_size:
            logits = ban_repeated_ngrams_(logits, history, lengths, self.no_repeat_ngram_size)
        min_length = 0 if self.min_new_tokens else self.min_length  # min_new_tokens wins
        if eos and (step < self.min_new_tokens or min_length):
            too_short = (lengths < min_length) | (step < self.min_new_tokens)  # (B,)
            logits = ban_tokens(logits, too_short, eos)
        if self.forced_bos_token_id is not None and step == 0:  # only then can a row hold one
            logits = force_token(logits, lengths == 1, [self.forced_bos_token_id])
        forced = self.forced_eos_token_id
        last = step == max_new_tokens - 1  # a bool, or (B,) with each row's limit
        if forced is not None and (bool(last.any()) if isinstance(last, Tensor) else last):
            ids = [forced] if isinstance(forced, int) else list(forced)
            rows = torch.as_tensor(last, device=logits.device).expand(lengths.shape)
            logits = force_token(logits, rows, ids)
        return logits


NO_RULES = LogitsRules()  # the default everywhere: decoding as before


def ban_tokens(logits: Tensor, rows: Tensor, ids: Sequence[int]) -> Tensor:
    """logits with ids set to -inf in the rows (B,) marked True."""
    cols = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
    cols[list(ids)] = True
    return logits.masked_fill(rows[:, None] & cols[None, :], NEG_INF)


def force_token(logits: Tensor, rows: Tensor, ids: Sequence[int]) -> Tensor:
    """In the rows (B,) marked True: every logit -inf except ids, which become 0."""
    forced = torch.full_like(logits, NEG_INF)
    forced[:, list(ids)] = 0.0
    return torch.where(rows[:, None], forced, logits)


def ban_repeated_ngrams_(logits: Tensor, history: Tensor, lengths: Tensor, n: int) -> Tensor:
    """logits, written in place: -inf for each token that would complete an n-gram its row has
    already produced; lengths (B,): each row's tokens at the end of history (left padding
    before them). Tensor ops over every window of history at once: no per-row Python loop, no
    device sync, no (B, V) copy or mask (at 32k ids either costs more than the ban itself)."""
    T = history.size(1)
    if n > T:  # no complete n-gram yet, in any row
        return logits
    windows = history.unfold(1, n, 1)  # (B, W, n), W = T - n + 1: every n-gram, in order
    prefix = history[:, T - n + 1 :]  # (B, n - 1) the n-1 tokens the next one would follow
    matches = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)  # (B, W)
    starts = torch.arange(windows.size(1), device=history.device)  # (W,)
    matches &= starts[None, :] >= (T - lengths)[:, None]  # windows inside the row's own tokens
    # a match writes -inf at its token; the rest write +inf, a no-op under amin, at column 0
    # (one cache line per row: scattered at their own tokens they cost a cache miss each)
    cols = torch.where(matches, windows[:, :, n - 1], 0)  # (B, W)
    bans = torch.where(matches, NEG_INF, float("inf")).to(logits.dtype)  # (B, W)
    return logits.scatter_reduce_(1, cols, bans, reduce="amin")
