"""Perplexity and bits-per-byte of a model on a text split, plus a unigram baseline.

Long documents are scored with a sliding window: windows of at most `max_length` tokens advance by
`stride`, and each window scores only the tokens no earlier window scored, so every token is
scored exactly once with at least max_length - stride tokens of context (the Hugging Face
"perplexity of fixed-length models" method). Every document starts with the model's prefix token
(BOS, else EOS) when the vocabulary has one, so its first real token is scored too.

Perplexity depends on the tokenizer (more, shorter tokens = lower per-token loss), bits-per-byte
does not: bpb = total NLL in nats / (ln 2 * UTF-8 bytes scored), so models with different
tokenizers compare fairly. The unigram baseline (token frequencies of the train split, add-one
smoothed, same tokenizer) is the number a trained model must beat by a wide margin.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common.io import read_jsonl
from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, nll_to_ppl

LN2 = math.log(2.0)


@dataclass
class DocScore:
    """One document's share of the total, kept for error analysis (highest-loss documents)."""

    index: int
    text: str
    tokens: int
    nll: float  # nats, summed over the document's scored tokens


@dataclass
class PerplexityResult:
    """Totals over a split; the metrics are derived so they can never disagree."""

    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0
    documents: int = 0
    docs: list[DocScore] = field(default_factory=list)
    scoring: str = "causal"  # "pseudo_log_likelihood" for an encoder (evals.pll)

    def add(self, other: PerplexityResult) -> None:
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.nll += other.nll
        self.documents += other.documents
        self.docs += other.docs

    def metrics(self) -> dict[str, Any]:
        """A pseudo-log-likelihood's perplexity is named pseudo_perplexity, so no table can put
        it beside a causal perplexity unlabelled."""
        name = "perplexity" if self.scoring == "causal" else "pseudo_perplexity"
        return {
            name: nll_to_ppl(self.nll, self.tokens),
            "scoring": self.scoring,
            "bits_per_byte": self.nll / (LN2 * max(self.bytes, 1)),
            "nll_per_token": self.nll / max(self.tokens, 1),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def split_file(path: Path, split: str) -> Path:
    """A JSONL file, or `<split>.jsonl[.zst]` inside a data stage directory."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (f"{split}.jsonl.zst", f"{split}.jsonl", f"{split}.jsonl.gz"):
        if (path / name).exists():
            return path / name
    raise InputError(
        f"{path} has no {split}.jsonl.zst (nor .jsonl); pass a JSONL file with a 'text' field or "
        "a data directory built by: lmforge data prepare --source SRC --out DIR"
    )


def iter_texts(path: Path, split: str = "val") -> Iterator[str]:
    """The non-empty 'text' fields of a split, streamed: a reader that needs only the first
    few (calibration) stops early and reads no more of the file."""
    file = split_file(path, split)
    empty = True
    for i, row in enumerate(read_jsonl(file)):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"{file} record {i + 1}: needs a string field 'text'")
        if row["text"]:
            empty = False
            yield row["text"]
    if empty:
        raise InputError(f"{file}: no non-empty 'text' records")


def read_texts(path: Path, split: str = "val", limit: int | None = None) -> list[str]:
    """The 'text' field of the first `limit` records of a split (empty texts skipped)."""
    return list(islice(iter_texts(path, split), limit))


def sliding_windows(n: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, scored_from, end) over a sequence of n tokens whose first token is given.

    The window's input is seq[begin:end-1] (at most max_length tokens); it scores the targets
    seq[scored_from:end], which earlier windows did not score. Targets are positions 1..n-1.
    """
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride must be in [1, max_length={max_length}], got {stride}")
    scored_until = 1
    begin = 0
    while scored_until < n:
        end = min(begin + max_length + 1, n)
        if end > scored_until:
            yield begin, scored_until, end
            scored_until = end
        begin += stride


def window_lengths(
    max_length: int | None, stride: int | None, window: int, context: str
) -> tuple[int, int]:
    """(max_length, stride) a scorer's windows use: max_length capped to `window`, the most text
    tokens the model reads at once (`context` says why, for the error), stride half of it unless
    set. A stride longer than the capped max_length is refused naming the requested and the
    effective max_length: the cap is what a user who set max_length does not see."""
    effective = min(max_length or window, window)
    if not stride:
        return effective, max(effective // 2, 1)
    if stride > effective:
        if max_length is None:
            why = f"max_length is unset, so it is {context}, {window} tokens"
        elif max_length > window:
            why = f"max_length {max_length} was capped to {window}, {context}"
        else:
            why = f"max_length is {max_length}"
        raise ConfigError(
            f"stride {stride} is longer than the effective max_length {effective} ({why}): set "
            f"stride to {effective} or less, or leave it unset (half of max_length)"
        )
    return effective, stride


def document_tokens(model: EvalModel, text: str) -> tuple[list[int], int]:
    """(seq, bytes): the document as scored; targets are seq[1:], covering `bytes` UTF-8 bytes.

    With a prefix token every text token is a target. Without one the first token has no
    context: it is not scored, and neither are its bytes.
    """
    ids = model.encode(text)
    n_bytes = len(text.encode("utf-8"))
    if model.prefix_id is not None:
        return [model.prefix_id, *ids], n_bytes
    if ids:
        n_bytes -= len(model.decode(ids[:1]).encode("utf-8"))
    return ids, max(n_bytes, 0)


def score_document(
    model: EvalModel, text: str, max_length: int, stride: int, index: int = 0
) -> PerplexityResult:
    """NLL of every token of one document (see sliding_windows)."""
    seq, n_bytes = document_tokens(model, text)
    windows = [
        (seq[begin:scored_from], seq[scored_from:end])
        for begin, scored_from, end in sliding_windows(len(seq), max_length, stride)
    ]
    nll = -sum(sum(logps) for logps, _ in model.scorer.score_batch(windows))
    n_tokens = max(len(seq) - 1, 0)
    return PerplexityResult(n_tokens, n_bytes, nll, 1, [DocScore(index, text, n_tokens, nll)])


def perplexity(
    model: EvalModel,
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    on_doc: Callable[[], None] | None = None,
    task: str | None = None,
) -> PerplexityResult:
    """Perplexity / bits-per-byte of model over texts, as the model's family defines it
    (model.scorer: causal sliding windows, an encoder's pseudo-log-likelihood, or a refusal).

    Args:
        max_length: tokens of input per window (default and maximum: the model's block_size).
        stride: how far each window moves (default max_length // 2); smaller = more context for
            every token and more compute.
        task: the task's name, which a window error (window_lengths) names.
    """
    try:
        return model.scorer.perplexity(list(texts), max_length, stride, on_doc)
    except ConfigError as exc:
        if task is None:
            raise
        raise ConfigError(f"task '{task}': {exc}") from None


def causal_perplexity(
    model: EvalModel,
    texts: Iterable[str],
    max_length: int | None,
    stride: int | None,
    on_doc: Callable[[], None] | None = None,
) -> PerplexityResult:
    """A causal LM's perplexity with the module docstring's sliding windows."""
    max_length, stride = window_lengths(max_length, stride, model.block_size, "the model's context")
    total = PerplexityResult()
    for i, text in enumerate(texts):
        total.add(score_document(model, text, max_length, stride, index=i))
        if on_doc:
            on_doc()
    return total


def unigram_baseline(
    model: EvalModel, train_texts: Iterable[str], eval_texts: Iterable[str]
) -> dict[str, float]:
    """Perplexity and bpb of an add-one-smoothed token frequency model fit on train_texts.

    Same tokenizer, same scored tokens and bytes as perplexity() (see document_tokens), so the
    two numbers are directly comparable.
    """
    vocab_size = max(model.tokenizer.get_vocab_size(with_added_tokens=True), 1)
    counts = np.zeros(vocab_size, dtype=np.float64)
    for text in train_texts:
        ids = np.asarray(model.encode(text), dtype=np.int64)
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    nll, n_tokens, n_bytes = 0.0, 0, 0
    for text in eval_texts:
        seq, scored_bytes = document_tokens(model, text)
        targets = np.asarray(seq[1:], dtype=np.int64)
        nll -= float(logp[np.minimum(targets, vocab_size - 1)].sum())
        n_tokens += len(targets)
        n_bytes += scored_bytes
    return {
        "perplexity": nll_to_ppl(nll, n_tokens),
        "bits_per_byte": nll / (LN2 * max(n_bytes, 1)),
        "tokens": n_tokens,
    }
