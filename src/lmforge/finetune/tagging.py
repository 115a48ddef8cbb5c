"""Token tagging (NER-style) on an encoder: word-level tags aligned to subwords, a per-token head.

Records are `{"tokens": [words], "tags": [one tag per word]}` (formats.py). Each word is encoded
on its own (with the space that precedes it in running text, so byte-level BPE sees the same
pieces as in a sentence); its tag trains and is predicted on its first subword only, the rest get
IGNORE_INDEX, as transformers' token-classification recipe does. `TokenTagger` is the encoder plus
`head`, Linear(n_embd, n_tags) with a bias on every position: BertForTokenClassification /
RobertaForTokenClassification, which the finetune stage exports. Metrics are evals.metrics'
tag_metrics (word accuracy; seqeval-style entity precision / recall / F1 for BIO tags), which the
eval stage's tagging task reports too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.finetune.heads import padded_rows, real_tokens
from lmforge.model.chunked_loss import IGNORE_INDEX


def encode_tagged(
    tok: Any, examples: list[dict[str, Any]], tag_index: dict[str, int], seq_len: int
) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded rows (input_ids, tag_labels on first subwords, last); returns rows, truncated.

    A sentence longer than seq_len keeps the words that fit whole; metrics score only those. The
    tokenizer's template wraps the words ([CLS] ... [SEP], <s> ... </s>), untagged, as
    transformers' tokenizer(words, is_split_into_words=True) does.
    """
    ids, tags, last = padded_rows(len(examples), seq_len, tok.pad_id)
    prefix, suffix = tok.template_ends()
    end = seq_len - len(suffix)  # words stop here; the suffix follows them
    truncated = 0
    for r, ex in enumerate(examples):
        ids[r, : len(prefix)] = prefix
        pos = len(prefix)
        for w, (word, tag) in enumerate(zip(ex["tokens"], ex["tags"], strict=True)):
            pieces = tok.encode(word if w == 0 else " " + word) or [tok.pad_id]
            if pos + len(pieces) > end:
                truncated += 1
                break
            ids[r, pos : pos + len(pieces)] = pieces
            tags[r, pos] = tag_index[tag]
            pos += len(pieces)
        ids[r, pos : pos + len(suffix)] = suffix
        last[r] = max(pos + len(suffix) - 1, 0)
    return {"input_ids": ids, "tag_labels": tags, "last": last}, truncated


class TokenTagger(nn.Module):
    """An encoder plus `head`: Linear(n_embd, n_tags) on every position's hidden state."""

    def __init__(self, lm: nn.Module, n_tags: int) -> None:
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.n_embd, n_tags)
        nn.init.normal_(self.head.weight, std=lm.config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """(tag logits (B, T, n_tags), hidden states (B, T, C)); padding after `last` is hidden."""
        h = self.lm.hidden_states(idx, pad_mask=real_tokens(idx, last))
        return self.head(h), h

    def classifier_head(self, labels: list[str]) -> Any:
        """The head as model.convert.ClassifierHead (per_token), for export."""
        from lmforge.model.convert import ClassifierHead

        weight, bias = self.head.weight.detach().cpu(), self.head.bias.detach().cpu()
        return ClassifierHead(weight, labels, bias, per_token=True)


def tag_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Cross-entropy over the first subword of every word."""
    logits, _ = model(batch["input_ids"], batch["last"])
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch["tag_labels"].flatten(), ignore_index=IGNORE_INDEX
    )
    return loss, {"tag_loss": loss.detach()}


@torch.no_grad()
def predict_tags(
    model: nn.Module, rows: dict[str, np.ndarray], batch_size: int = 32
) -> list[list[int]]:
    """Predicted tag id of every word that fit, per row."""
    device = next(model.parameters()).device
    model.eval()
    out: list[list[int]] = []
    for lo in range(0, len(rows["input_ids"]), batch_size):
        ids = torch.from_numpy(rows["input_ids"][lo : lo + batch_size]).to(device)
        last = torch.from_numpy(rows["last"][lo : lo + batch_size]).to(device)
        pred = model(ids, last)[0].argmax(-1).cpu().numpy()
        for r, labels in enumerate(rows["tag_labels"][lo : lo + batch_size]):
            out.append(pred[r][labels != IGNORE_INDEX].tolist())
    return out
