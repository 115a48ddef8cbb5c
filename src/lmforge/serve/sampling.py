"""Per-request sampling settings, and the next token of every row under its own settings.

Every row of the running batch may ask for something else (greedy, a temperature, top-k, top-p, a
seed), so the batch's logits are sampled in two groups: greedy rows take one vectorized argmax;
sampled rows go through model.generate's filters (batched per top_k/top_p setting) and draw with
the Gumbel-max trick, each row's uniforms from its own generator (draw_per_row), so a seeded
request draws the same tokens whatever else shares its batch. A row's OpenAI logit_bias is added
to its logits before either (apply_logit_bias); logprobs are taken from the raw logits. A row's
structured-output guide masks its logits before all of this (serve/guided_rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.constrain import Guide
from lmforge.errors import InputError
from lmforge.model.generate import draw_per_row, top_k_filter, top_p_filter
from lmforge.model.logits_rules import NO_RULES, LogitsRules

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_LOGIT_BIAS = 100.0  # OpenAI's range [-100, 100]: -100 bans a token in effect, 100 forces it


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (the OpenAI completion parameters the engine implements)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()  # stop strings: output is cut before them
    stop_token_ids: tuple[int, ...] = ()  # added to the model's own stop set
    seed: int | None = None  # fixed seed => reproducible whatever the batch it runs in
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob + top-k alternatives
    ignore_eos: bool = False  # do not stop at the model's own stop tokens
    repetition_penalty: float = 1.0  # 1 = off; over the prompt and the answer so far
    rules: LogitsRules = field(default=NO_RULES)  # the checkpoint's n-gram/min-length/forced rules
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the row's logits
    guide: Guide | None = None  # structured output: only tokens its grammar allows (constrain/)
    keep_special: tuple[str, ...] = ()  # special tokens the text keeps (auto tool calls' tags)
    cache_salt: str | None = None  # prefix-cache blocks are shared only with the same salt

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def sees_history(self) -> bool:
        """Whether decoding needs the row's tokens so far (a penalty or a rule applies)."""
        return self.repetition_penalty != 1.0 or self.rules.active

    def validate(self) -> None:
        """Raises InputError naming the first bad field and its valid range."""
        checks = [
            ("max_tokens", type(self.max_tokens) is int and self.max_tokens >= 1, "an int >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "a number in [0, 100] (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", type(self.top_k) is int and self.top_k >= 0, "an int >= 0 (0 = off)"),
            (
                "stop",
                isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
                "a tuple of non-empty strings",
            ),
            (
                "stop_token_ids",
                all(type(t) is int and t >= 0 for t in self.stop_token_ids),
                "token ids >= 0",
            ),
            ("repetition_penalty", self.repetition_penalty > 0, "a number > 0 (1 = off)"),
            (
                "logit_bias",
                all(
                    type(t) is int and t >= 0 and abs(b) <= MAX_LOGIT_BIAS
                    for t, b in self.logit_bias
                ),
                f"(token id >= 0, bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]) pairs",
            ),
            (
                "guide",
                self.guide is None or (isinstance(self.guide, Guide) and self.guide.compiled),
                "None or a compiled constrain.Guide (GuideCompiler.compile)",
            ),
            (
                "keep_special",
                isinstance(self.keep_special, tuple)
                and all(isinstance(s, str) and s for s in self.keep_special),
                "a tuple of non-empty strings (special tokens' texts)",
            ),
            ("seed", self.seed is None or type(self.seed) is int, "an int or None"),
            (
                "cache_salt",
                self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt),
                "None or a non-empty string",
            ),
            (
                "logprobs",
                self.logprobs is None
                or (type(self.logprobs) is int and 0 <= self.logprobs <= MAX_LOGPROBS),
                f"None or an int in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise InputError(f"{name} must be {valid}, got {getattr(self, name)!r}")


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own generator: seeded when the request has a seed, else from fresh entropy."""
    gen = torch.Generator(device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % 2**63)
    return gen


def sample_rows(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    bias: LogitBias | None,
) -> Tensor:
    """Next token of each row (B,) from last-position logits (B, V), each row by its params;
    bias: the rows' logit_bias (logit_bias_of(params), kept per batch by serve/row_batch.py).

    The sampled rows are scaled, filtered and drawn as one batch (rows sharing top_k/top_p
    settings filter together), not one at a time: every op here is row-wise, so a row's token
    is the same whatever shares its batch, and a per-row loop only added Python and kernel
    launch overhead (16 sampled rows of a 4k vocabulary: see the commit that vectorized it).
    """
    logits = apply_logit_bias(logits.float(), bias)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return logits.argmax(dim=-1)
    # a (B, V) argmax costs as much as a sampling op: only when some row is greedy
    greedy = len(sampled) < len(params)
    out = logits.argmax(dim=-1) if greedy else logits.new_empty(len(params), dtype=torch.long)
    index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    rows = logits.index_select(0, index) / temps[:, None]
    groups: dict[tuple[int, float], list[int]] = {}
    for j, i in enumerate(sampled):
        groups.setdefault((params[i].top_k, params[i].top_p), []).append(j)
    for (top_k, top_p), members in groups.items():
        if not top_k and top_p >= 1.0:
            continue
        at = torch.tensor(members, dtype=torch.long, device=logits.device)
        group = rows.index_select(0, at)
        if top_k:
            group = top_k_filter(group, top_k)
        if top_p < 1.0:
            group = top_p_filter(group, top_p)
        rows[at] = group
    out[index] = draw_per_row(rows, [generators[i] for i in sampled])
    return out


@dataclass(frozen=True)
class LogitBias:
    """A batch's logit_bias as one scatter: the (row, token) positions and their biases."""

    where: tuple[Tensor, Tensor]
    values: Tensor  # float32


def logit_bias_of(params: list[SamplingParams], device: torch.device) -> LogitBias | None:
    """The rows' logit_bias entries as index tensors; None when no row has one."""
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if not entries:
        return None
    rows, cols, biases = zip(*entries, strict=True)
    where = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return LogitBias(where, torch.tensor(biases, dtype=torch.float32, device=device))


def apply_logit_bias(logits: Tensor, bias: LogitBias | None) -> Tensor:
    """logits (B, V) plus the batch's logit_bias in one scatter; without any, logits itself
    comes back (rows without a bias pay nothing)."""
    if bias is None:
        return logits
    # a new tensor: logits stay raw
    return logits.index_put(bias.where, bias.values.to(logits.dtype), accumulate=True)


def top_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[list[float], Tensor, Tensor]:
    """log_softmax of raw logits (B, V): each row's chosen-token logprob and its top-k (values,
    ids), computed for the whole batch at once."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    values, ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], chosen[:, None][:, :0])
    return chosen_lp, values, ids
