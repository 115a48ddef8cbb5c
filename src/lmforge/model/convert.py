"""Import and export models in the Hugging Face layout: config.json + safetensors, never pickles.

Export writes what transformers.AutoModelForCausalLM loads (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM or GPT2LMHeadModel, whichever represents the config exactly), plus an "lmforge"
key holding our ModelConfig so a round trip is lossless. A config no HF family can express is
written in lmforge's own layout (model_type "lmforge", our parameter names).

A sequence classifier (save_pretrained(..., classifier=ClassifierHead)) is exported as the family's
*ForSequenceClassification: the body without lm_head, `score.weight` (bias-free), and
id2label/label2id in config.json, which AutoModelForSequenceClassification loads as is. Such a
directory (ours or transformers') loads here as a Transformer (load_pretrained) plus its head
(load_classifier). transformers pools the rightmost token that is not config.pad_token_id, so the
exporter writes the pad id its rows were padded with (lmforge.finetune.heads pools the same way).

An encoder-decoder (ModelConfig.is_encoder_decoder: n_dec_layer > 0, model.seq2seq.Seq2SeqLM)
exports as BartForConditionalGeneration (AutoModelForSeq2SeqLM) and local BART checkpoints import
as one.
Local T5 checkpoints load as model.t5.T5Adapter (transformers' module behind the same interface).

An encoder (ModelConfig.causal=False) exports as BertForMaskedLM, or RobertaForMaskedLM when its
positions start at an offset (RoBERTa's pad id + 1); without an MLM head, as BertModel/RobertaModel.

Import reads our exports and local HF checkpoints of the llama, mistral, qwen2, gpt2, bert and
roberta families, single-file or sharded. An encoder checkpoint without MLM head tensors (a
classifier, a bare BertModel) loads with mlm_head off. An lmforge-quantized checkpoint (`compress
quantize`) loads quantized by default (model.quant_checkpoint: QuantLinear / QuantEmbedding from
its codes); training callers pass quantized="dequantize". Legacy pytorch_model.bin files are read
only through torch.load(weights_only=True), which refuses anything but plain tensors.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmforge.common.io import atomic_path, atomic_write_json
from lmforge.errors import ConfigError, InputError
from lmforge.model.config import ModelConfig
from lmforge.model.hf_families import ENCODER_FAMILIES, FAMILIES, family_for
from lmforge.model.hf_families.bert import encoder_head_names, token_classifier_architecture
from lmforge.model.hf_families.rules import SCORE, Rule, hf_to_ours, ours_to_hf, without_lm_head
from lmforge.model.quant import QuantEmbedding, QuantLinear
from lmforge.model.quant_checkpoint import (
    SCALE_SUFFIX,
    QuantWeight,
    dequantize_tensors,
    keep_quantized,
    read_quantized,
)
from lmforge.model.t5 import wraps_transformers
from lmforge.model.transformer import Transformer

log = logging.getLogger(__name__)

NATIVE = "lmforge"  # model_type of exports in our own layout
QuantizedLoad = Literal["keep", "dequantize"]
QUANTIZED_LOADS: tuple[str, ...] = ("keep", "dequantize")
SUPPORTED_MODEL_TYPES = (*FAMILIES, "t5", NATIVE)
MEAN_POOLING_REFUSAL = (
    "a mean-pooled classifier has no transformers class (BERT/RoBERTa *ForSequenceClassification "
    "pool the first token): not exported as one, which would compute different logits; use "
    "pooling 'first' to export"
)
NATIVE_CLASSIFIER = "LmforgeForSequenceClassification"  # architecture of a native-layout classifier


# Training-only fields HF configs do not carry; taken from an export's "lmforge" key when present.
TRAINING_FIELDS = ("dropout", "init_std")


@dataclass(frozen=True)
class ClassifierHead:
    """A classification head: score weight (n_labels, n_embd) and its labels.

    A decoder's is bias-free on the last real token. An encoder's has a bias and either a pooler
    (pool_weight/pool_bias: dense + tanh on the first token, *ForSequenceClassification) or none
    and per_token (*ForTokenClassification: every position is classified). pooling "mean" (an
    encoder's mean of its real tokens' states, no pooler) has no transformers class: save_pretrained
    refuses it rather than writing a model that computes something else.
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


def resolve_model_dir(path: Path | str) -> Path:
    """A model directory; a training stage's directory stands for its final/ model."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def model_display_name(model_dir: Path | str) -> str:
    """The name a model goes by in tables, the server and exports: its run stage when the
    directory is a stage's final/ model (runs/q/sft/final -> "sft"), else the directory's name."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name == "final" and model_dir.parent.name:
        return model_dir.parent.name
    return model_dir.name


def hf_config_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict.

    The HF fields are the source of truth for the architecture (a checkpoint edited or resized by
    transformers stays consistent); our own "lmforge" key only fills the training-only fields.
    """
    model_type = hf.get("model_type")
    if model_type == NATIVE:
        return ModelConfig.from_dict(hf[NATIVE])
    if model_type not in FAMILIES:
        raise InputError(
            f"config.json model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        cfg = FAMILIES[model_type].to_config(hf)
    except KeyError as err:
        raise InputError(f"config.json (model_type {model_type}) lacks key {err}") from None
    ours = hf.get(NATIVE) or {}
    return replace(cfg, **{k: ours[k] for k in TRAINING_FIELDS if k in ours})


def _load_bin(path: Path) -> dict[str, Tensor]:
    log.warning("reading legacy pickle %s with weights_only=True; prefer safetensors", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(
            f"{path} holds pickled objects other than tensors; lmforge does not unpickle untrusted "
            "files. Convert it to model.safetensors with a tool you trust"
        ) from err


def read_tensors(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single or sharded safetensors, or legacy .bin)."""
    for weights, index, loader in (
        ("model.safetensors", "model.safetensors.index.json", load_file),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin),
    ):
        if (model_dir / weights).exists():
            return loader(model_dir / weights)
        if (model_dir / index).exists():
            weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            tensors: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(loader(model_dir / shard))
            return tensors
    raise InputError(
        f"{model_dir} has no model.safetensors (or model.safetensors.index.json); "
        "point --model at a directory written by lmforge or transformers' save_pretrained"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise InputError(
            f"{path} not found; a model directory needs config.json + model.safetensors "
            "(written by lmforge pretrain/finetune or transformers' save_pretrained)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err}") from None


def load_pretrained(
    model_dir: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantized: QuantizedLoad = "keep",
) -> Transformer:
    """A Transformer (in eval mode) from an lmforge export or a local HF checkpoint directory.

    quantized: what to do with an lmforge-quantized checkpoint (`lmforge compress quantize`).
    "keep" (inference: serve, eval, generate) builds QuantLinear / QuantEmbedding modules from
    the codes and scales as stored, so the model takes int8/int4 memory; "dequantize" (training,
    which needs float weights to update) loads float weights.
    """
    if quantized not in QUANTIZED_LOADS:
        raise ConfigError(f"quantized={quantized!r}; valid: {', '.join(QUANTIZED_LOADS)}")
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    if hf.get("model_type") == "t5":  # transformers' own module behind our interface (model.t5)
        from lmforge.model.t5 import load_t5

        return load_t5(model_dir, device, dtype)
    cfg, state = _checkpoint_state(model_dir, hf, quantized)
    state = {k: v.to(device, dtype if _floating(v) else v.dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = model_class(cfg)(cfg)  # no memory, no init: the weights are assigned below
        state = keep_quantized(model, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise InputError(f"{model_dir}: weights do not match config.json: {first}") from None
    kept = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if not isinstance(getattr(model, "tok_emb", None), QuantEmbedding):
        model.tie_weights()  # a kept tied pair already shares its codes (one tensor, assigned)
    model.init_buffers(device)
    if kept:
        bits = sorted({f"int{m.bits}" for m in kept})
        log.info("%s: kept %d matrices quantized (%s)", model_dir, len(kept), "/".join(bits))
    return model.eval()


def _checkpoint_state(
    model_dir: Path, hf: dict[str, Any], quantized: QuantizedLoad
) -> tuple[ModelConfig, dict[str, Tensor | QuantWeight]]:
    """The ModelConfig and our state dict (quantized weights as QuantWeight when kept) of a
    checkpoint, its lm_head tied or, for a classifier without one, zeros."""
    cfg = hf_config_to_model_config(hf)
    quant = hf.get("quantization_config")
    if quant and quantized == "keep":
        tensors = read_quantized(read_tensors(model_dir), quant, model_dir)
    else:
        tensors = dequantize_tensors(read_tensors(model_dir), quant, model_dir)
    score = tensors.pop(SCORE, None)  # a sequence classifier's head: load_classifier reads it
    model_type = hf.get("model_type")
    if model_type in ENCODER_FAMILIES:
        cfg, tensors = _encoder_body(cfg, tensors, model_type)
    if model_type == NATIVE:
        state = tensors
    else:
        family = FAMILIES[model_type]
        if family.prefix:
            tensors = {_with_prefix(k, family.prefix): v for k, v in tensors.items()}
        rules = family.rules(cfg)
        try:
            state = _to_ours(tensors, rules if score is None else without_lm_head(rules))
        except InputError as err:  # a tensor missing or unexpected: say whose
            raise InputError(f"{model_dir}: {err}") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" not in state:
        log.warning(
            "%s is a classifier without an LM head: next-token scores are uniform", model_dir
        )
        state["lm_head.weight"] = torch.zeros(state["tok_emb.weight"].shape)
    return cfg, state


def _floating(value: Tensor | QuantWeight) -> bool:
    return isinstance(value, QuantWeight) or value.is_floating_point()


def _to_ours(tensors: dict[str, Any], rules: list[Rule]) -> dict[str, Any]:
    """hf_to_ours, with the quantized weights a rule takes kept quantized (QuantWeight.fused);
    ones that cannot stay quantized (mixed bits in one fused weight) are dequantized."""
    kept: dict[str, QuantWeight] = {}
    for rule in rules:
        parts = [tensors.get(n) for n in rule.hf_names]
        if all(isinstance(p, QuantWeight) for p in parts):
            fused = parts[0].fused(parts[1:], rule.transpose)
            if fused is not None:
                kept[rule.ours] = fused
    used = {n for rule in rules if rule.ours in kept for n in rule.hf_names}
    needed = {n for rule in rules if rule.ours not in kept for n in rule.hf_names}
    rest = {  # a name no rule takes (ignored or unexpected) is only named, never computed on
        n: v.dequantize() if n in needed and isinstance(v, QuantWeight) else v
        for n, v in tensors.items()
        if n not in used
    }
    state = hf_to_ours(rest, [rule for rule in rules if rule.ours not in kept])
    return {**state, **kept}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The module a config builds: Seq2SeqLM for an encoder-decoder, else the Transformer."""
    if cfg.is_encoder_decoder:
        from lmforge.model.seq2seq import Seq2SeqLM

        return Seq2SeqLM
    return Transformer


def _encoder_body(
    cfg: ModelConfig, tensors: dict[str, Tensor], model_type: str
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The encoder's body tensors (pooler and task heads set aside), and cfg with mlm_head off
    when the checkpoint has no MLM head; unprefixed (bare BertModel) names get the prefix."""
    prefix = f"{model_type}."
    heads = ("classifier.", "cls.", "lm_head.")
    tensors = {k if k.startswith((prefix, *heads)) else prefix + k: v for k, v in tensors.items()}
    body = {
        k: v for k, v in tensors.items() if not k.startswith((f"{prefix}pooler.", "classifier."))
    }
    has_mlm = any(k.startswith(("cls.predictions.", "lm_head.")) for k in body)
    return replace(cfg, mlm_head=has_mlm), body


def load_classifier(model_dir: Path | str) -> ClassifierHead | None:
    """The sequence-classification head of a model directory (score.weight + id2label), if any.

    Labels missing from id2label (transformers omits the default two) are named LABEL_<i>.
    """
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
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
    tensor = _read_tensor(model_dir, name)
    quant = hf.get("quantization_config")
    if tensor is None or not quant or name not in quant.get("bits", {}):
        return tensor
    scale = {name + SCALE_SUFFIX: _read_tensor(model_dir, name + SCALE_SUFFIX)}
    scale = {k: v for k, v in scale.items() if v is not None}  # missing: read_quantized says so
    alone = {**quant, "bits": {name: quant["bits"][name]}}  # only this tensor was read
    return dequantize_tensors({name: tensor, **scale}, alone, model_dir)[name]


def _read_tensor(model_dir: Path, name: str) -> Tensor | None:
    """One tensor of a checkpoint without reading the others (safetensors), or None."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text())["weight_map"].get(name)
        path = model_dir / shard if shard else None
    elif (model_dir / "model.safetensors").exists():
        path = model_dir / "model.safetensors"
    else:
        return read_tensors(model_dir).get(name)  # legacy .bin: no partial reads
    if path is None:
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None  # noqa: SIM118


def _with_prefix(name: str, prefix: str) -> str:
    return name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name


def save_pretrained(
    model: nn.Module,
    out_dir: Path | str,
    extra_config: dict[str, Any] | None = None,
    classifier: ClassifierHead | None = None,
    generation_config: dict[str, Any] | None = None,
) -> None:
    """Write config.json + model.safetensors (each atomically) in the HF layout when possible.

    extra_config is merged into config.json (e.g. bos_token_id/eos_token_id from the tokenizer).
    generation_config is written as generation_config.json, the stop tokens transformers'
    generate() reads (lmforge.tokenizer.generation builds it from the tokenizer).
    With classifier, the model is written as a sequence classifier (see the module docstring);
    extra_config should then carry the pad_token_id the classifier's inputs are padded with.
    A torch.compile'd model is unwrapped; pass the bare module, not a DDP/FSDP wrapper.
    """
    model = getattr(model, "_orig_mod", model)
    if classifier is not None and classifier.pooling != "first":
        raise ConfigError(MEAN_POOLING_REFUSAL)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if wraps_transformers(model):  # the T5 adapter: transformers writes its own module
        model.save_hf(out_dir, extra_config)
        if generation_config is not None:
            atomic_write_json(out_dir / "generation_config.json", generation_config)
        return
    cfg: ModelConfig = model.config
    state = model.state_dict()
    model_type = family_for(cfg)
    if model_type is None and classifier is not None and classifier.encoder:
        raise ValueError(
            "an encoder classifier exports only as BERT/RoBERTa (family_for found none for this "
            "config); keep the bert-* preset's shape"
        )
    if model_type is None:
        log.info("model config has no Hugging Face equivalent; writing lmforge's own layout")
        architecture = NATIVE_CLASSIFIER if classifier else "LmforgeTransformer"
        hf: dict[str, Any] = {"architectures": [architecture], "model_type": NATIVE}
        skip = "lm_head.weight" if cfg.tie_embeddings else None
        tensors = {k: v.detach() for k, v in state.items() if k != skip}
    elif classifier is None:
        family = FAMILIES[model_type]
        architecture = family.architecture
        if model_type in ENCODER_FAMILIES and not cfg.mlm_head:
            architecture = f"{architecture.removesuffix('ForMaskedLM')}Model"
        hf = family.hf_config(cfg, model_type, architecture)
        tensors = ours_to_hf(state, family.rules(cfg))
    else:
        family = FAMILIES[model_type]
        architecture = family.classifier
        if classifier.per_token:
            architecture = token_classifier_architecture(model_type)
        hf = family.hf_config(cfg, model_type, architecture)
        tensors = ours_to_hf(state, without_lm_head(family.rules(cfg)))
    dtype = next(model.parameters()).dtype
    if classifier is not None:
        if model_type in ENCODER_FAMILIES:
            head = classifier.encoder_tensors(model_type)
        else:
            head = {SCORE: classifier.weight}
        tensors.update({k: v.detach().to(dtype) for k, v in head.items()})
        hf.update(classifier.hf_config())
    hf.update(torch_dtype=str(dtype).removeprefix("torch."), **(extra_config or {}))
    if model_type == "roberta":  # its positions count from pad_token_id + 1, whatever the tokenizer
        hf["pad_token_id"] = cfg.pos_offset - 1
    hf[NATIVE] = cfg.to_dict()
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    stale_index = out_dir / "model.safetensors.index.json"
    if stale_index.exists():  # an older sharded export would shadow the new single file
        stale_index.unlink()
    if generation_config is not None:
        atomic_write_json(out_dir / "generation_config.json", generation_config)
    atomic_write_json(out_dir / "config.json", hf)
