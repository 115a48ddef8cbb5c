"""A classification head beside a model's body: ClassifierHead (what export writes) and
load_classifier (a directory's sequence or token head: ours, or transformers' *ForSequence/
*ForTokenClassification)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lmforge.model.convert.files import read_config, read_tensor
from lmforge.model.convert.mean_head import load_mean_head
from lmforge.model.hf_families import ENCODER_FAMILIES
from lmforge.model.hf_families.bert import encoder_head_names
from lmforge.model.hf_families.rules import SCORE
from lmforge.model.quant_checkpoint import SCALE_SUFFIX, dequantize_tensors


@dataclass(frozen=True)
class ClassifierHead:
    """A classification head: score weight (n_labels, n_embd) and its labels.

    A decoder's is bias-free on the last real token. An encoder's has a bias and either a pooler
    (pool_weight/pool_bias: dense + tanh on the first token, *ForSequenceClassification) or none
    and per_token (*ForTokenClassification: every position is classified). pooling "mean" (an
    encoder's mean of its real tokens' states, no pooler) has no transformers class: save_pretrained
    writes the encoder and this head in a file beside it (model.convert.mean_head).
    """

    weight: Tensor
    labels: list[str]
    bias: Tensor | None = None
    pool_weight: Tensor | None = None
    pool_bias: Tensor | None = None
    per_token: bool = False
    pooling: str = "first"

    @property
    def encoder(self) -> bool:
        """Whether this is an encoder's head (biased, or per token), exported as BERT/RoBERTa's."""
        return self.bias is not None or self.per_token

    def encoder_tensors(self, model_type: str) -> dict[str, Tensor]:
        """The head's tensors under the encoder family's names (hf_families.bert.encoder_head_names)."""
        names = encoder_head_names(model_type, self.per_token)
        ours = {"out_weight": self.weight, "out_bias": self.bias,
                "pool_weight": self.pool_weight, "pool_bias": self.pool_bias}  # fmt: skip
        missing = [role for role in names if ours[role] is None]
        if missing:
            raise ValueError(f"an encoder classifier head needs {', '.join(missing)}")
        return {names[role]: ours[role] for role in names}

    def hf_config(self) -> dict[str, Any]:
        """The config.json keys transformers reads for a classifier."""
        hf: dict[str, Any] = {
            "num_labels": len(self.labels),
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }
        if len(self.labels) > 1:  # transformers refuses single_label with one label
            hf["problem_type"] = "single_label_classification"
        return hf


def load_classifier(model_dir: Path | str) -> ClassifierHead | None:
    """The sequence-classification head of a model directory (score.weight + id2label, or a
    mean-pooled encoder's mean_head.MEAN_HEAD), if any.

    Labels missing from id2label (transformers omits the default two) are named LABEL_<i>.
    """
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    mean = load_mean_head(model_dir, hf)
    if mean is not None:
        return mean
    if hf.get("model_type") in ENCODER_FAMILIES:
        return _load_encoder_classifier(model_dir, hf)
    weight = _read_head_tensor(model_dir, hf, SCORE)
    if weight is None:
        return None
    return ClassifierHead(weight.float(), _labels(hf, weight.shape[0]))


def _labels(hf: dict[str, Any], n: int) -> list[str]:
    id2label = {str(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    return [id2label.get(str(i), f"LABEL_{i}") for i in range(n)]


def _load_encoder_classifier(model_dir: Path, hf: dict[str, Any]) -> ClassifierHead | None:
    """A BERT/RoBERTa sequence or token classifier's head (None for an MLM or bare encoder)."""
    per_token = any(a.endswith("ForTokenClassification") for a in hf.get("architectures") or [])
    names = encoder_head_names(hf["model_type"], per_token)
    found = {role: _read_head_tensor(model_dir, hf, name) for role, name in names.items()}
    if found["out_weight"] is None:
        return None
    found = {role: t.float() if t is not None else None for role, t in found.items()}
    return ClassifierHead(
        found["out_weight"], _labels(hf, found["out_weight"].shape[0]), found["out_bias"],
        found.get("pool_weight"), found.get("pool_bias"), per_token,
    )  # fmt: skip


def _read_head_tensor(model_dir: Path, hf: dict[str, Any], name: str) -> Tensor | None:
    """One head tensor, dequantized when `compress quantize` stored it as codes (+ its scale)."""
    tensor = read_tensor(model_dir, name)
    quant = hf.get("quantization_config")
    if tensor is None or not quant or name not in quant.get("bits", {}):
        return tensor
    scale = {name + SCALE_SUFFIX: read_tensor(model_dir, name + SCALE_SUFFIX)}
    scale = {k: v for k, v in scale.items() if v is not None}  # missing: read_quantized says so
    alone = {**quant, "bits": {name: quant["bits"][name]}}  # only this tensor was read
    return dequantize_tensors({name: tensor, **scale}, alone, model_dir)[name]
