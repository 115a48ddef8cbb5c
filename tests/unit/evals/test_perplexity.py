"""Perplexity equals exp(mean token NLL) computed independently; windows score each token once."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.evals.perplexity import (
    iter_texts,
    perplexity,
    read_texts,
    sliding_windows,
    unigram_baseline,
)
from lmforge.evals.tasks import TaskSpec, run_task

from .helpers import CORPUS, make_model_dir

TEXTS = CORPUS[:5]


def reference_nll(model: EvalModel, text: str, context: int | None = None) -> tuple[float, int]:
    """Sum of -log p(token) with plain torch: one forward per token when context is limited."""
    seq = [model.prefix_id, *model.encode(text)]
    total = 0.0
    with torch.no_grad():
        if context is None:
            logits = model.model(torch.tensor([seq[:-1]]))[0]
            total = F.cross_entropy(logits, torch.tensor(seq[1:]), reduction="sum").item()
        else:
            for t in range(1, len(seq)):
                ctx = seq[max(0, t - context) : t]
                logp = torch.log_softmax(model.model(torch.tensor([ctx]))[0, -1], dim=-1)
                total -= logp[seq[t]].item()
    return total, len(seq) - 1


def test_perplexity_is_exp_of_mean_token_nll(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    result = perplexity(model, TEXTS).metrics()
    pairs = [reference_nll(model, t) for t in TEXTS]
    nll, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    assert result["tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    # an untrained model is near-uniform: perplexity within a factor of 2 of the vocab size
    assert (
        model.model.config.vocab_size / 2 < result["perplexity"] < 2 * model.model.config.vocab_size
    )


def test_sliding_window_scores_each_token_once_with_max_context(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    text = " ".join(CORPUS[:3])
    assert len(model.encode(text)) > 3 * 12  # several windows
    got = perplexity(model, [text], max_length=12, stride=1).metrics()
    nll, n = reference_nll(model, text, context=12)
    assert got["tokens"] == n
    assert got["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)


@pytest.mark.parametrize(("n", "length", "stride"), [(1, 4, 2), (2, 4, 2), (50, 8, 3), (50, 8, 8)])
def test_windows_cover_every_target_exactly_once(n: int, length: int, stride: int) -> None:
    scored: list[int] = []
    for begin, start, end in sliding_windows(n, length, stride):
        assert end - 1 - begin <= length and begin < start
        scored += range(start, end)
    assert scored == list(range(1, n))


def test_bad_stride_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="stride must be in"):
        list(sliding_windows(10, 4, 5))


def test_without_prefix_token_first_token_and_its_bytes_are_not_scored(tmp_path: Path) -> None:
    model = EvalModel.load(make_model_dir(tmp_path / "m", specials=False))
    assert model.prefix_id is None
    text = CORPUS[1]
    ids = model.encode(text)
    got = perplexity(model, [text]).metrics()
    assert got["tokens"] == len(ids) - 1
    assert got["bytes"] == len(text.encode()) - len(model.decode(ids[:1]).encode())


def test_unigram_baseline_matches_hand_computed_frequencies(model_dir: Path) -> None:
    model = EvalModel.load(model_dir)
    train, evals = CORPUS[:6], CORPUS[6:]
    vocab = model.tokenizer.get_vocab_size()
    counts = [0] * vocab
    for t in train:
        for i in model.encode(t):
            counts[i] += 1
    total = sum(counts)
    nll = n = 0
    for t in evals:
        for i in model.encode(t):
            nll -= math.log((counts[i] + 1) / (total + vocab))
            n += 1
    got = unigram_baseline(model, train, evals)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)


def test_read_texts_from_data_dir_and_errors(tmp_path: Path) -> None:
    import zstandard

    rows = "".join(json.dumps({"text": t}) + "\n" for t in ["a", "", "b"])
    (tmp_path / "val.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    assert read_texts(tmp_path, "val") == ["a", "b"]
    assert read_texts(tmp_path, "val", limit=1) == ["a"]
    with pytest.raises(InputError, match=r"has no test\.jsonl\.zst"):
        read_texts(tmp_path, "test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl record 2: needs a string field"):
        read_texts(bad)


def test_iter_texts_streams_and_an_empty_split_names_its_file(tmp_path: Path) -> None:
    """Calibration reads a split through iter_texts: what it never reaches is never parsed,
    and a split without text is still an error that names the file."""
    rows = [{"text": "a"}, {"text": "b"}, {"body": "never read"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = iter_texts(tmp_path, "train")
    assert [next(texts), next(texts)] == ["a", "b"]  # record 3 is not read yet
    with pytest.raises(InputError, match=r"train\.jsonl record 3: needs a string field"):
        next(texts)
    (tmp_path / "val.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(InputError, match=r"val\.jsonl: no non-empty 'text' records"):
        list(iter_texts(tmp_path, "val"))


@pytest.mark.parametrize(
    ("max_length", "why"),
    [(512, r"max_length 512 was capped to 64, the model's context"), (None, r"unset")],
)
def test_stride_past_the_capped_window_names_task_field_and_both_lengths(
    model_dir: Path, max_length: int | None, why: str
) -> None:
    """A user who set max_length 512 on a 64-token model learns why 100 is too long a stride."""
    model = EvalModel.load(model_dir)
    spec = TaskSpec(name="wiki", type="perplexity", examples=[{"text": TEXTS[0]}],
                    max_length=max_length, stride=100)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_task(model, spec, GenerationSettings())
    msg = str(err.value)
    assert msg.startswith("task 'wiki': stride 100 is longer than the effective max_length 64")
    assert re.search(why, msg) and "set stride to 64 or less" in msg
