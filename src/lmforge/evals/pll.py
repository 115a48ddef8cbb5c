"""Masked-LM pseudo-log-likelihood: how a bidirectional encoder scores text (EncoderScorer).

An encoder has no left-to-right factorisation, so it has no perplexity. Salazar et al. (2020,
"Masked Language Model Scoring") score a text by masking each token in turn and summing
log p(token | every other token): the pseudo-log-likelihood (PLL). One masked copy of the window
per scored token, SCORE_BATCH copies a forward pass; each copy is wrapped in the tokenizer's
template ([CLS] ... [SEP], <s> ... </s>) as pretraining saw it. A text longer than a window is
cut into windows `stride` apart that each score the `stride` tokens in their middle
(centered_windows): every token is scored once, with (max_length - stride) // 2 tokens or more on
each side unless it is that close to the text's start or end. (A causal model's windows score
their right end, which would leave a masked token no right context.)

pseudo_perplexity = exp(-PLL / tokens) and bits_per_byte = -PLL / (ln 2 * bytes) are reported with
scoring "pseudo_log_likelihood": they are not comparable with a causal model's perplexity (every
token sees both sides), so tables and plots carry the label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.evals.scoring import SCORE_BATCH, Scored, picked_logprobs, summed

if TYPE_CHECKING:
    from lmforge.evals.lm import EvalModel
    from lmforge.evals.perplexity import PerplexityResult

PLL = "pseudo_log_likelihood"


def centered_windows(n: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int, int]]:
    """(begin, scored_from, scored_to, end) over n tokens: windows [begin, end) of at most
    max_length tokens, stride apart, each scoring [scored_from, scored_to), its middle stride
    tokens (the first window's span starts at 0, the last one's ends at n), so the spans tile the
    text and a scored token has (max_length - stride) // 2 tokens or more of context each side
    unless it is that close to the text's start or end."""
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride must be in [1, max_length={max_length}], got {stride}")
    margin, begin = (max_length - stride) // 2, 0
    while n:
        end = min(begin + max_length, n)
        scored_from = begin + margin if begin else 0
        yield begin, scored_from, end if end == n else begin + margin + stride, end
        if end == n:
            return
        begin += stride


class EncoderScorer:
    """A BERT/RoBERTa-style encoder with its MLM head: PLL scores, no generation."""

    kind, scoring = "encoder", PLL

    def __init__(self, lm: EvalModel) -> None:
        self.lm = lm
        self.prefix, self.suffix = lm.files.template_ends()
        self.width = lm.block_size - len(self.prefix) - len(self.suffix)  # text tokens a window

    def _require_mlm(self) -> int:
        mask_id = self.lm.files.mask_id
        if not getattr(self.lm.model.config, "mlm_head", False) or mask_id is None:
            raise InputError(
                f"{self.lm.path} is an encoder without a masked-LM head or [MASK] token (a "
                "classifier or bare encoder): likelihood scores need one (pretrain --objective "
                "mlm); score a classifier with `classifier: head`"
            )
        return mask_id

    @torch.no_grad()
    def masked_scores(self, windows: list[tuple[list[int], list[int]]]) -> list[Scored]:
        """For each (text ids, positions): log p(ids[p] | ids with only p masked) per position.

        Copies of one window share a length, so they batch without padding.
        """
        mask_id, model = self._require_mlm(), self.lm.model
        out = []
        for ids, positions in windows:
            row = torch.tensor([*self.prefix, *ids, *self.suffix], dtype=torch.long)
            cols = [len(self.prefix) + p for p in positions]
            logits = []
            for lo in range(0, len(cols), SCORE_BATCH):
                chunk = cols[lo : lo + SCORE_BATCH]
                x = row.repeat(len(chunk), 1)
                x[torch.arange(len(chunk)), chunk] = mask_id
                h = model.hidden_states(x.to(self.lm.device))  # (b, T, C)
                logits.append(model.logits(h[torch.arange(len(chunk)), chunk]))  # (b, V)
            out += picked_logprobs(torch.cat(logits), [[ids[p] for p in positions]])
        return out

    def windows(
        self, ids: list[int], max_length: int, stride: int
    ) -> list[tuple[list[int], list[int]]]:
        """(window ids, scored positions in it) covering every token once (centered_windows)."""
        return [
            (ids[begin:end], list(range(lo - begin, hi - begin)))
            for begin, lo, hi, end in centered_windows(len(ids), max_length, stride)
        ]

    def perplexity(self, texts: list[str], max_length: int | None, stride: int | None,
                   on_doc: Any = None) -> PerplexityResult:  # fmt: skip
        """PLL of every token of every text (the module docstring), as a PerplexityResult."""
        from lmforge.evals.perplexity import DocScore, PerplexityResult, window_lengths

        context = (
            f"the model's context less the {len(self.prefix) + len(self.suffix)} template tokens"
        )
        max_length, stride = window_lengths(max_length, stride, self.width, context)
        total = PerplexityResult(scoring=PLL)
        for i, text in enumerate(texts):
            ids = self.lm.encode(text)
            nll = -sum(
                sum(lps) for lps, _ in self.masked_scores(self.windows(ids, max_length, stride))
            )
            n_bytes = len(text.encode("utf-8"))
            total.add(
                PerplexityResult(len(ids), n_bytes, nll, 1, [DocScore(i, text, len(ids), nll)])
            )
            if on_doc:
                on_doc()
        return total

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """The continuation's share of the PLL of context + continuation: each of its tokens
        masked in turn with the context and the rest of the continuation visible; context is
        dropped from the left when the two exceed a window."""
        ctx, rows = self.lm.encode(context), []
        for text in continuations:
            cont = self.lm.encode(text)[-self.width :]
            ids = ctx[len(ctx) - max(self.width - len(cont), 0) :] + cont
            rows.append((ids, list(range(len(ids) - len(cont), len(ids)))))
        scored = iter(self.masked_scores([r for r in rows if r[1]]))
        return summed([next(scored) if r[1] else ([], True) for r in rows])

    def mean_logprobs(self, texts: list[str]) -> list[float]:
        """PLL per token of each text's first window."""
        rows = []
        for text in texts:
            ids = self.lm.encode(text)[: self.width]
            if not ids:
                raise InputError(f"example {text[:60]!r} has no tokens to score")
            rows.append((ids, list(range(len(ids)))))
        return [sum(lps) / len(lps) for lps, _ in self.masked_scores(rows)]

    def reference_scores(self, prompts: list[str], refs: list[str], chat: bool) -> list[Scored]:
        raise InputError(self._no_generation())

    def generate(self, prompts: list[str], settings: Any, chat: bool, batch_size: int) -> Any:
        raise InputError(self._no_generation())

    def _no_generation(self) -> str:
        return (
            f"{self.lm.path} is a bidirectional encoder (BERT-style): it does not generate. "
            "Evaluate it with classification (its head or label likelihood), tagging, "
            "multiple_choice, counterfactual or perplexity (pseudo-perplexity) tasks"
        )
