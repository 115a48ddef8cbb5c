"""Trained task heads of a model directory, read where their training pooled.

A head is chosen by the files that hold it, never by the model's name:

- a dialogue model's intent_head.safetensors (finetune.dialogue): the mean of the encoder states
  over the source (the text, then eos), through a biased Linear;
- an encoder's *ForSequenceClassification (biased head with pooler: BERT's pooler, RoBERTa's
  classification head dense): the first token of the template-wrapped text through dense + tanh;
- an encoder's mean-pooled head (finetune pooling "mean", model.convert.mean_head's file beside
  the encoder): the mean of the template-wrapped text's states, through a biased Linear;
- a decoder's *ForSequenceClassification (score.weight, no bias), or the older head.safetensors +
  labels.json: the rightmost token that is not the pad token (finetune.heads.pooled_index);
- an encoder's *ForTokenClassification (per-token head): the tagging task's TokenTagger.

A sequence head (and the tagging task's token head) reads at most the tokens its fine-tune did:
the input length config.json records (finetune.heads.SEQ_LEN_KEY, the train.seq_len its rows
were cut at), else the model's block size, so a long text gets in eval the logits finetune's val
metrics gave it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmforge.errors import InputError

if TYPE_CHECKING:
    from lmforge.evals.lm import EvalModel

# (lm, text, text_pair or None, tokens read at most) -> pooled state (C,)
Pool = Callable[["EvalModel", str, "str | None", int], torch.Tensor]


@dataclass
class SequenceHead:
    """A sequence classifier's labels, its pooling, and the Linear over the pooled state."""

    labels: list[str]
    linear: nn.Linear
    pool: Pool
    reads: str  # how it pools, recorded in the task's metrics
    max_len: int  # tokens read at most, where its fine-tune cut its rows (module docstring)

    @torch.no_grad()
    def log_probs(self, lm: EvalModel, text: str, pair: str | None = None) -> list[float]:
        pooled = self.pool(lm, text, pair, self.max_len)
        logits = self.linear(pooled.to(self.linear.weight.dtype)).float()  # (n_classes,)
        return torch.log_softmax(logits, dim=-1).double().tolist()


def last_token(lm: EvalModel, text: str, pair: str | None, max_len: int) -> torch.Tensor:
    """A decoder's state at the rightmost non-pad token (where fine-tuning and transformers pool)
    of the text's first max_len tokens; a pair is read as fine-tuning joined it
    (finetune.heads.joined_pair)."""
    from lmforge.finetune.heads import joined_pair, pooled_index

    ids = lm.encode(joined_pair(text, pair))[:max_len] or [lm.pad_id]
    h = lm.model.hidden_states(torch.tensor([ids], device=lm.device))
    return h[0, pooled_index(ids, lm.pad_id)]


def encoder_states(lm: EvalModel, text: str, pair: str | None, max_len: int) -> torch.Tensor:
    """An encoder's states (T, C) over the template-wrapped text's real tokens (cut to max_len as
    finetune.heads.encode_texts cuts them): up to the last one that is not the pad id, as
    encode_texts sets `last` and training masks.
    A pair is wrapped as in training, by the template (BERT: [CLS] text [SEP] pair [SEP], token
    type 1 on the pair; RoBERTa: <s> text </s></s> pair </s>, all type 0, its one type).
    Only a tokenizer without a template ([CLS] ... [SEP]) lets a text end in pad ids; for such a
    text transformers' tokenizer marks them attended, so its logits differ from ours there."""
    from lmforge.finetune.heads import pooled_index

    ids, types, _ = lm.files.encode_input(text, pair, max_len=max_len)
    ids, types = ids or [lm.pad_id], types or [0]
    n = pooled_index(ids, lm.pad_id) + 1
    x, t = (torch.tensor([v[:n]], device=lm.device) for v in (ids, types))
    return lm.model.hidden_states(x, token_type_ids=t)[0]


def pooled_first_token(dense: nn.Linear) -> Pool:
    """An encoder's first-token state of the template-wrapped text through dense + tanh."""

    def pool(lm: EvalModel, text: str, pair: str | None, max_len: int) -> torch.Tensor:
        return torch.tanh(dense(encoder_states(lm, text, pair, max_len)[0]))

    return pool


def mean_token_state(lm: EvalModel, text: str, pair: str | None, max_len: int) -> torch.Tensor:
    """The mean of an encoder's states over the template-wrapped text (finetune pooling "mean")."""
    return encoder_states(lm, text, pair, max_len).mean(0)


def mean_source_state(lm: EvalModel, text: str, pair: str | None, max_len: int) -> torch.Tensor:
    """The mean of an encoder-decoder's encoder states over the source (the dialogue's intent;
    the scorer cuts the source, max_len is the block size)."""
    if pair is not None:
        raise InputError(
            f"{lm.path}'s intent head reads one dialogue text, not a pair: drop the examples' "
            "text_pair or evaluate a sentence-pair classifier (lmforge finetune --task classify)"
        )
    src = torch.tensor([lm.scorer.source(text)], device=lm.device)
    return lm.model.encode(src)[0].mean(0)


def linear_of(
    weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device | str = "cpu"
) -> nn.Linear:
    """An eval-mode Linear holding a head's weight (and bias) on device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
    return linear.to(device).eval()


def input_len(lm: EvalModel) -> int:
    """Tokens a sequence or token head reads at most: the train.seq_len its fine-tune recorded
    in config.json (finetune.heads.SEQ_LEN_KEY), else the block size (an imported classifier)."""
    return recorded_input_len(lm.path, lm.block_size) or lm.block_size


def recorded_input_len(model_dir: Path, block_size: int) -> int | None:
    """The train.seq_len a classifier's config.json records (finetune.heads.SEQ_LEN_KEY), None
    when it records none; InputError for a value that is no length from 1 to block_size."""
    from lmforge.finetune.heads import SEQ_LEN_KEY
    from lmforge.model.convert import read_config

    recorded = read_config(model_dir).get(SEQ_LEN_KEY)
    if recorded is not None and (type(recorded) is not int or not 0 < recorded <= block_size):
        raise InputError(
            f"{model_dir}/config.json: {SEQ_LEN_KEY}={recorded!r} is not a length from 1 to the "
            f"block size {block_size}; fix it, or delete the key to read up to the block size"
        )
    return recorded


def load_sequence_head(lm: EvalModel) -> SequenceHead | None:
    """The directory's sequence-classification head, if it has one (module docstring)."""
    from lmforge.finetune.dialogue import INTENT_HEAD, load_intent_head
    from lmforge.model.convert import load_classifier

    if (lm.path / INTENT_HEAD).is_file():
        linear, labels = load_intent_head(lm.path)
        return SequenceHead(labels, linear.to(lm.device), mean_source_state, "mean_source",
                            lm.block_size)  # fmt: skip
    head = load_classifier(lm.path)
    if head is not None and head.per_token:
        return None
    if head is None:
        return _legacy_head(lm)
    linear, max_len = linear_of(head.weight, head.bias, lm.device), input_len(lm)
    if head.pooling == "mean":
        return SequenceHead(head.labels, linear, mean_token_state, "mean_tokens", max_len)
    if head.pool_weight is not None:
        dense = linear_of(head.pool_weight, head.pool_bias, lm.device)
        return SequenceHead(head.labels, linear, pooled_first_token(dense), "first_token_pooler",
                            max_len)  # fmt: skip
    return SequenceHead(head.labels, linear, last_token, "last_token", max_len)


def _legacy_head(lm: EvalModel) -> SequenceHead | None:
    """head.safetensors (a Linear with bias) + labels.json beside the model (older lmforge)."""
    model_dir: Path = lm.path
    if not ((model_dir / "head.safetensors").is_file() and (model_dir / "labels.json").is_file()):
        return None
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "head.safetensors"))
    labels = [str(x) for x in json.loads((model_dir / "labels.json").read_text(encoding="utf-8"))]
    if state["weight"].shape[0] != len(labels):
        raise InputError(
            f"{model_dir}: head.safetensors has {state['weight'].shape[0]} classes but "
            f"labels.json {len(labels)}"
        )
    return SequenceHead(labels, linear_of(state["weight"], state.get("bias"), lm.device),
                        last_token, "last_token", lm.block_size)  # fmt: skip


def load_token_head(lm: EvalModel) -> tuple[nn.Module, list[str]]:
    """(finetune.tagging.TokenTagger with the directory's per-token head, its tag labels)."""
    from lmforge.finetune.tagging import TokenTagger
    from lmforge.model.convert import load_classifier

    head = load_classifier(lm.path)
    if head is None or not head.per_token:
        raise InputError(
            f"{lm.path} has no token-classification head (*ForTokenClassification); train one "
            "with `lmforge finetune --task tag` on an encoder"
        )
    tagger = TokenTagger(lm.model, len(head.labels))
    tagger.head.load_state_dict({"weight": head.weight, "bias": head.bias})
    return tagger.to(lm.device).eval(), head.labels
