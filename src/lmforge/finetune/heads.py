"""Sequence classification on a causal LM: a linear head over the last real token, and its losses.

`SequenceClassifier(lm, n_classes)` reads `lm.hidden_states(ids)` and pools the last non-pad
token (what a causal model has seen the whole text at) into `head`, a Linear without bias: the
`score` layer of transformers' *ForSequenceClassification, which the finetune stage exports.

Pooling contract (so our logits are transformers' logits): transformers pools the rightmost
position whose id is not config.pad_token_id (position 0 when every id is the pad). encode_texts
right-pads with tok.pad_id and sets `last` by that same rule, so a text that itself ends in the pad
token (possible when the pad is EOS, or spelled in the text) is pooled at its last other token,
exactly as transformers does; the export writes tok.pad_id as pad_token_id. Causal attention
makes the right padding invisible to the pooled position. `classify_loss` trains the head (and
whatever of the LM is trainable); `multitask_loss` adds next-token loss on the same texts,
w_lm * LM + w_cls * classification, in one forward pass. Metrics: accuracy, macro precision /
recall / F1, and the majority-class baseline they should beat.

An encoder (lm.config.causal False) is pooled as BERT is: the first token's state through `pool`
(dense + tanh), then `head` with a bias (BertForSequenceClassification's pooler + classifier,
RobertaForSequenceClassification's classification head); its padding is hidden with a pad mask
built from `last` (bidirectional attention would otherwise see it). An encoder's inputs carry the
specials of its tokenizer's template ([CLS] text [SEP], <s> text </s>; a pair's second text with
token type 1), exactly as transformers' tokenizer makes them, so an imported checkpoint is tuned
on the inputs it was pretrained on. pooling="mean" averages the real tokens' states instead (no
pooler): sentence-transformers style, which no transformers *ForSequenceClassification computes,
so such a classifier is not exported as one (model.convert refuses): final/ holds the encoder
and the head beside it (model.convert.mean_head), which evals.heads reloads.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.transformer import IGNORE_INDEX, next_token_loss

# config.json key of a fine-tuned classifier: the train.seq_len its rows were cut at, where eval
# cuts them too (evals.heads), so a text longer than that scores the same in both
SEQ_LEN_KEY = "lmforge_classifier_seq_len"


class SequenceClassifier(nn.Module):
    """A Transformer plus `head`: Linear(n_embd, n_classes, bias=False) on the pooled state."""

    def __init__(self, lm: nn.Module, n_classes: int, pooling: str = "first") -> None:
        super().__init__()
        self.lm = lm
        self.encoder = not lm.config.causal
        if pooling not in ("first", "mean") or (pooling == "mean" and not self.encoder):
            raise ValueError(f"pooling {pooling!r}: 'first', or 'mean' for an encoder")
        self.pooling = pooling
        C = lm.config.n_embd
        self.pool = nn.Linear(C, C) if self.encoder and pooling == "first" else None
        self.head = nn.Linear(C, n_classes, bias=self.encoder)
        for layer in (self.pool, self.head):
            if layer is not None:
                nn.init.normal_(layer.weight, std=lm.config.init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(
        self, idx: Tensor, last: Tensor, token_type_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(class logits (B, n_classes), hidden states (B, T, C)); last: (B,) last real index."""
        if self.encoder:
            mask = real_tokens(idx, last)
            h = self.lm.hidden_states(idx, pad_mask=mask, token_type_ids=token_type_ids)
            if self.pool is None:  # mean of the real tokens' states
                return self.head(mean_pool(h, mask)), h
            return self.head(torch.tanh(self.pool(h[:, 0]))), h
        h = self.lm.hidden_states(idx)  # (B, T, C)
        pooled = h[torch.arange(h.size(0), device=h.device), last]  # (B, C)
        return self.head(pooled), h

    @classmethod
    def from_head(cls, lm: nn.Module, head: Any) -> SequenceClassifier:
        """lm with a saved head (model.convert.ClassifierHead: a sequence head, class i =
        head.labels[i]) on it again, pooling as it was trained: classifier_head's inverse."""
        model = cls(lm, len(head.labels), pooling=head.pooling)
        saved = {"head.weight": head.weight, "head.bias": head.bias,
                 "pool.weight": head.pool_weight, "pool.bias": head.pool_bias}  # fmt: skip
        state = model.state_dict()  # tensors sharing the parameters' storage
        with torch.no_grad():
            for name in (n for n in saved if n in state):  # an encoder's bias, a pooler's dense
                state[name].copy_(saved[name])
        return model

    def classifier_head(self, labels: list[str]) -> Any:
        """The head as model.convert.ClassifierHead, for export."""
        from lmforge.model.convert import ClassifierHead

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        pool_w, pool_b = (self.pool.weight, self.pool.bias) if self.pool else (None, None)
        return ClassifierHead(
            cpu(self.head.weight), labels, cpu(self.head.bias), cpu(pool_w), cpu(pool_b),
            pooling=self.pooling,
        )  # fmt: skip


def real_tokens(idx: Tensor, last: Tensor) -> Tensor:
    """Pad mask (B, T) of right-padded rows: 1 up to and including each row's `last`."""
    return (torch.arange(idx.size(1), device=idx.device)[None, :] <= last[:, None]).long()


def mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """(B, C) mean of states h (B, T, C) over the tokens mask (B, T) marks: the mean-pooled
    classifier's input, its ONNX graph's (compress.onnx_export), the dialogue model's intent
    head's (finetune.dialogue) and `lmforge serve`'s encoder embeddings (serve/embeddings.py). A
    row with no marked token pools to zeros, not NaN."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_index(ids: list[int], pad_id: int) -> int:
    """The position a classifier reads: the rightmost id that is not pad_id, 0 if there is none."""
    return max((i for i, t in enumerate(ids) if t != pad_id), default=0)


def padded_rows(n: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty right-padded rows to fill: (ids all pad_id, labels all IGNORE_INDEX, last zeros)."""
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    return ids, labels, np.zeros(n, dtype=np.int64)


def joined_pair(text: str, pair: str | None) -> str:
    """How a decoder reads a sentence pair: one text, "text pair" (encoders use their template)."""
    return text if pair is None else f"{text} {pair}"


def encode_texts(
    tok: Any,
    texts: list[str],
    labels: list[int],
    seq_len: int,
    pairs: list[str | None] | None = None,
    template: bool = False,
) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded rows for classification (+ LM labels on the text); returns rows, truncated.

    A text longer than seq_len keeps its start (the docstring's first lines say most). `last` is
    the rightmost position that is not tok.pad_id, 0 if none (see the module docstring).
    template (encoders): the tokenizer's specials and token types, as transformers' tokenizer(
    text, pair, truncation=True, max_length=seq_len); pairs are second texts (None: single).
    """
    ids, lm_labels, last = padded_rows(len(texts), seq_len, tok.pad_id)
    types = np.zeros_like(ids)
    truncated = 0
    for r, text in enumerate(texts):
        pair = pairs[r] if pairs else None
        if template:
            toks, segs, cut = tok.encode_input(text, pair, max_len=seq_len)
        else:
            full = tok.encode(joined_pair(text, pair))
            toks, segs, cut = full[:seq_len], [0] * min(len(full), seq_len), len(full) > seq_len
        toks = toks or [tok.pad_id]
        truncated += cut
        ids[r, : len(toks)] = toks
        types[r, : len(segs)] = segs
        lm_labels[r, : len(toks) - 1] = toks[1:]
        last[r] = pooled_index(toks, tok.pad_id)
    rows = {
        "input_ids": ids,
        "labels": lm_labels,
        "last": last,
        "class_labels": np.asarray(labels, dtype=np.int64),
    }
    if template:
        rows["token_type_ids"] = types
    return rows, truncated


def classify_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the class logits; logs batch accuracy."""
    logits, _ = model(batch["input_ids"], batch["last"], batch.get("token_type_ids"))
    loss = F.cross_entropy(logits.float(), batch["class_labels"])
    acc = (logits.argmax(-1) == batch["class_labels"]).float().mean()
    return loss, {"cls_loss": loss.detach(), "acc": acc}  # tensors: the loop reads them once


def make_multitask_loss(w_lm: float, w_cls: float):
    """loss_fn for w_lm * next-token loss on the text + w_cls * classification loss."""

    def multitask_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        logits, h = model(batch["input_ids"], batch["last"])
        cls = F.cross_entropy(logits.float(), batch["class_labels"])
        lm = next_token_loss(model.lm.logits(h), batch["labels"])
        loss = w_lm * lm + w_cls * cls
        return loss, {"lm_loss": lm.detach(), "cls_loss": cls.detach()}

    return multitask_loss


@torch.no_grad()
def predict(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Predicted class of every row."""
    device = next(model.parameters()).device
    model.eval()
    preds = []
    for lo in range(0, len(rows["input_ids"]), batch_size):
        ids = torch.from_numpy(rows["input_ids"][lo : lo + batch_size]).to(device)
        last = torch.from_numpy(rows["last"][lo : lo + batch_size]).to(device)
        types = rows.get("token_type_ids")
        if types is not None:
            types = torch.from_numpy(types[lo : lo + batch_size]).to(device)
        preds.append(model(ids, last, types)[0].argmax(-1).cpu().numpy())
    return np.concatenate(preds)


def classification_metrics(
    y_true: list[int], y_pred: list[int], n_classes: int
) -> dict[str, float]:
    """Accuracy, macro precision / recall / F1, and the same for always guessing the majority."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)

    def scores(pred: np.ndarray) -> tuple[float, float, float, float]:
        p, r, f = [], [], []
        for c in range(n_classes):
            tp = float(((pred == c) & (y_true == c)).sum())
            prec = tp / max(1.0, float((pred == c).sum()))
            rec = tp / max(1.0, float((y_true == c).sum()))
            p.append(prec)
            r.append(rec)
            f.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
        present = [c for c in range(n_classes) if (y_true == c).any() or (pred == c).any()]
        mean = lambda xs: float(np.mean([xs[c] for c in present])) if present else 0.0  # noqa: E731
        return float((pred == y_true).mean()), mean(p), mean(r), mean(f)

    acc, prec, rec, f1 = scores(y_pred)
    majority = Counter(y_true.tolist()).most_common(1)[0][0]
    base_acc, _, _, base_f1 = scores(np.full_like(y_true, majority))
    return {
        "accuracy": round(acc, 4),
        "precision": round(prec, 4),
        "recall": round(rec, 4),
        "macro_f1": round(f1, 4),
        "majority_accuracy": round(base_acc, 4),
        "majority_macro_f1": round(base_f1, 4),
    }
