"""Greedy speculative decoding: a small draft proposes, the target verifies (Leviathan et al.).

Each round the draft guesses k tokens one at a time over its own KV cache; the target then reads
its last token and the k guesses in ONE forward over its KV cache and takes its own argmax at
every position. The longest prefix of guesses the target agrees with is kept, plus the target's
next token after it, so a round yields 1..k+1 tokens for one target pass. Every kept token is
the target's own argmax given the tokens before it, so the output is the target's greedy
generate() token for token; the draft only changes how many target passes it takes.

Rejected guesses need no copy-back: both caches keep their columns in place and the next round
writes over the rejected ones (KVCache.update returns only the columns up to what it wrote).
Batch size 1: rows of a batch would accept different counts and leave the cache ragged.

How many tokens the draft proposes follows transformers' assisted generation: schedule
"heuristic" grows k by 2 after a round with every guess accepted and shrinks it by 1 (to 1 at
least) after one with a miss, from draft_tokens again for each call (transformers'
"heuristic_transient"; its "heuristic" carries k over to the next generate call); confidence
stops a round's drafting after a guess the draft gives less than that probability, that guess
included (transformers' assistant_confidence_threshold, fixed here: transformers re-fits its
threshold during a call from the guesses' probabilities and outcomes).
Schedule "backoff" is "heuristic" that can also stop drafting: a round at k = 1 that keeps no
guess pauses the draft for 1, then 2, 4, ... (at most MAX_PAUSE) plain target steps, back to 1
once a guess is kept. On one CPU core a (k+1)-token verify costs 1.5-2x a one-token step
(docs/benchmarks.md), so a draft that never agrees costs ~0.6x with k >= 1; paused, it costs
little more than its probes. None of these changes the tokens, only how many guesses each target
pass checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.model.generate import KVCache, check_room, last_logits

SCHEDULES = ("constant", "heuristic", "backoff")  # how k moves between rounds
MAX_PAUSE = 32  # backoff: the most plain target steps between two probes of the draft


@dataclass
class DraftStats:
    """How a draft fared: the tokens it proposed, those the target kept, the target's passes."""

    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, the ones it agreed with
    target_passes: int = 0  # target forwards, the prompt's prefill included
    tokens: int = 0  # new tokens generated

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def add(self, other: DraftStats) -> None:
        """Sum other into self (totals over prompts)."""
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.target_passes += other.target_passes
        self.tokens += other.tokens


@dataclass
class SpeculativeResult:
    """New tokens (through the first stop) and how the draft fared."""

    tokens: list[int]
    stats: DraftStats = field(default_factory=DraftStats)


def check_draft(target: nn.Module, draft: nn.Module) -> None:
    """ConfigError unless draft can propose tokens for target: both causal decoders (no
    encoder-decoder) over the same vocabulary size. The tokenizers' identity is the caller's
    check (the models know only ids)."""
    for role, model in (("target", target), ("draft", draft)):
        cfg = model.config
        if not getattr(cfg, "causal", True) or getattr(cfg, "is_encoder_decoder", False):
            raise ConfigError(f"speculative decoding needs causal decoders; the {role} is not one")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ConfigError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the "
            f"target's ({target.config.vocab_size}); a draft must share the target's tokenizer "
            "(e.g. a `lmforge compress --method distill` student of it)"
        )


@dataclass
class DraftLength:
    """How many guesses each round drafts under a schedule (the module docstring's rules)."""

    schedule: str
    k: int  # the next drafting round's guesses, before room cuts them
    paused: int = 0  # backoff: plain target steps left before the draft's next probe
    pause: int = 1  # backoff: the next pause's length

    def next(self, room: int) -> int:
        """This round's guesses: 0 (a plain target step) while paused, at most room."""
        return 0 if self.paused else min(self.k, room)

    def update(self, proposed: int, agreed: int) -> None:
        """After a round whose target pass checked proposed guesses and agreed with the first
        agreed of them."""
        if self.paused:
            self.paused -= 1
        elif self.schedule != "constant" and proposed:
            if self.schedule == "backoff" and agreed == 0 and self.k == 1:
                self.paused, self.pause = self.pause, min(2 * self.pause, MAX_PAUSE)
            elif agreed:
                self.pause = 1
            self.k = self.k + 2 if agreed == proposed else max(1, self.k - 1)


def _check_controls(draft_tokens: int, schedule: str, confidence: float | None) -> None:
    """ConfigError for a draft length, schedule or confidence speculative_generate cannot use."""
    if draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise ConfigError(f"confidence must be a probability in [0, 1], got {confidence}")


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    draft_tokens: int = 4,
    schedule: str = "constant",
    confidence: float | None = None,
    stop_tokens: Sequence[int] = (),
) -> SpeculativeResult:
    """The target's greedy continuation of prompt (token ids), verified k=draft_tokens at a time
    (schedule "heuristic"/"backoff": k starts there and adapts; confidence: a round's drafting
    stops after a guess below that probability).

    Returns the same new tokens as new_tokens(generate(target, prompt, max_new_tokens,
    greedy=True, stop_tokens=...)): at most max_new_tokens, through the first stop token.
    Both models must hold prompt + max_new_tokens positions (InputError otherwise).
    """
    _check_controls(draft_tokens, schedule, confidence)
    if not prompt:
        raise InputError("speculative decoding needs a prompt of at least one token")
    check_draft(target, draft)
    total = check_room(target, len(prompt), max_new_tokens)
    check_room(draft, len(prompt), max_new_tokens)
    stops = set(stop_tokens)
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    try:
        t_cache = KVCache.for_model(target, 1, total)
        d_cache = KVCache.for_model(draft, 1, total)
        out = list(prompt)
        last = _next_token(target, out, t_cache, 0)  # prefill
        result = SpeculativeResult([last], DraftStats(target_passes=1))
        out.append(last)
        d_seen = 0  # leading positions of the draft's cache that hold out's tokens
        length = DraftLength(schedule, draft_tokens)
        while last not in stops and len(result.tokens) < max_new_tokens:
            k = length.next(room=max_new_tokens - len(result.tokens) - 1)  # never overshoot
            guesses, d_seen = _propose(draft, d_cache, out, d_seen, k, confidence)
            n = len(out)  # the target's cache holds out[:n - 1]
            verify = _logits(target, [out[-1], *guesses], t_cache, n - 1).argmax(-1).tolist()
            m = next((i for i, g in enumerate(guesses) if g != verify[i]), len(guesses))
            new = [*guesses[:m], verify[m]]
            cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            new = new[:cut]
            result.stats.proposed += len(guesses)
            result.stats.accepted += min(m, cut)
            result.stats.target_passes += 1
            d_seen = min(d_seen, n + m)  # columns past the accepted tokens are rewritten next round
            length.update(proposed=len(guesses), agreed=m)
            out += new
            result.tokens += new
            last = new[-1]
    finally:
        target.train(modes[0])
        draft.train(modes[1])
    result.stats.tokens = len(result.tokens)
    return result


def _propose(
    draft: nn.Module, cache: KVCache, out: list[int], seen: int, k: int, confidence: float | None
) -> tuple[list[int], int]:
    """Up to k greedy draft tokens after out (fewer when one falls below confidence: it is the
    last); feeds the draft what its cache lacks, then its guesses but the last. Returns the
    guesses and how many leading cache columns are now filled."""
    guesses: list[int] = []
    feed = out[seen:]
    for _ in range(k):
        logits = _last_logits(draft, feed, cache, seen)
        seen += len(feed)
        guesses.append(int(logits.argmax()))
        if confidence is not None and float(logits.double().softmax(-1).max()) < confidence:
            break
        feed = guesses[-1:]
    return guesses, seen


def _next_token(model: nn.Module, ids: list[int], cache: KVCache, start_pos: int) -> int:
    """The greedy token after ids, read at start_pos over cache."""
    return int(_last_logits(model, ids, cache, start_pos).argmax())


def _last_logits(model: nn.Module, ids: list[int], cache: KVCache, start_pos: int) -> Tensor:
    """Next-token logits (V,) after ids, read at start_pos over cache (lm_head on the last
    position only, as generate's prefill)."""
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    return last_logits(model, idx, kv_cache=cache, start_pos=start_pos)[0]


def _logits(model: nn.Module, ids: list[int], cache: KVCache, start_pos: int) -> Tensor:
    """Next-token logits (T, V) at every position of ids, read at start_pos over cache."""
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    h = model.hidden_states(idx, kv_cache=cache, start_pos=start_pos)  # (1, T, C)
    return model.lm_head(h)[0].float()
