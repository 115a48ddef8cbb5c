"""Export: save_pretrained writes config.json + model.safetensors in the family's HF layout (a
causal or masked LM, a sequence or token classifier, BART), else in lmforge's own layout; a
mean-pooled classifier as its encoder plus its head's file (model.convert.mean_head)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.common.io import atomic_path, atomic_write_json
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.convert.classifier import ClassifierHead
from lmforge.model.convert.hf_import import NATIVE
from lmforge.model.convert.mean_head import MEAN_HEAD, MEAN_HEAD_KEY, save_mean_head
from lmforge.model.hf_families import ENCODER_FAMILIES, FAMILIES, family_for
from lmforge.model.hf_families.bert import token_classifier_architecture
from lmforge.model.hf_families.rules import SCORE, ours_to_hf, without_lm_head
from lmforge.model.quant_module import QuantModule
from lmforge.model.t5 import wraps_transformers

log = logging.getLogger(__name__)


NATIVE_CLASSIFIER = "LmforgeForSequenceClassification"  # architecture of a native-layout classifier


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
    With classifier, the model is written as a sequence or token classifier; a mean-pooled one,
    which no transformers class computes, as the encoder transformers loads plus MEAN_HEAD beside
    it, named by config.json (model.convert.mean_head). extra_config should then carry the
    pad_token_id the classifier's inputs are padded with.
    A torch.compile'd model is unwrapped; pass the bare module, not a DDP/FSDP wrapper. A model
    holding quantized modules (QuantLinear / QuantEmbedding) is refused: see _refuse_quantized.
    """
    model = getattr(model, "_orig_mod", model)
    _refuse_quantized(model, out_dir)
    out_dir = Path(out_dir)
    if classifier is not None and classifier.pooling == "mean":
        out_dir.mkdir(parents=True, exist_ok=True)
        save_mean_head(classifier, out_dir)  # before config.json, which names it, is written
        extra_config = {**(extra_config or {}), MEAN_HEAD_KEY: MEAN_HEAD}
        classifier = None
    if wraps_transformers(model):  # the T5 adapter: transformers writes its own module
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_hf(out_dir, extra_config)
        if generation_config is not None:
            atomic_write_json(out_dir / "generation_config.json", generation_config)
        return
    cfg: ModelConfig = model.config
    model_type = family_for(cfg)
    if model_type is None and classifier is not None and classifier.encoder:
        raise ConfigError(
            f"{out_dir}: an encoder classifier exports only as BERT/RoBERTa (family_for found "
            "none for this config); keep the bert-* preset's shape"
        )
    out_dir.mkdir(parents=True, exist_ok=True)  # refused above: no empty directory left behind
    hf, tensors = _body_layout(cfg, model.state_dict(), model_type, classifier)
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


def _refuse_quantized(model: nn.Module, out_dir: Path | str) -> None:
    """ConfigError naming a quantized module of model and what to save instead: the layouts
    save_pretrained writes hold float weights (its config.json carries no quantization_config);
    a quantized module has codes and scales under other names."""
    kept = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    if not kept:
        return
    name, module = kept[0]
    raise ConfigError(
        f"{out_dir}: the model keeps {len(kept)} module(s) quantized (e.g. {name}, "
        f"int{module.bits}), and save_pretrained writes float weights only. A model loaded "
        "kept-quantized from an `lmforge compress quantize` output is that output: copy its "
        "directory, or load it with load_pretrained(..., quantized='dequantize') to save float "
        "weights; a QLoRA model: merge its adapters first (lmforge.finetune.lora.merge)"
    )


def _body_layout(
    cfg: ModelConfig,
    state: dict[str, Tensor],
    model_type: str | None,
    classifier: ClassifierHead | None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json's architecture fields and the body's tensors under the family's names (the
    LM, the bare encoder, or a classifier's body without lm_head), else lmforge's own layout."""
    if model_type is None:
        log.info("model config has no Hugging Face equivalent; writing lmforge's own layout")
        architecture = NATIVE_CLASSIFIER if classifier else "LmforgeTransformer"
        skip = "lm_head.weight" if cfg.tie_embeddings else None
        tensors = {k: v.detach() for k, v in state.items() if k != skip}
        return {"architectures": [architecture], "model_type": NATIVE}, tensors
    family = FAMILIES[model_type]
    rules = family.rules(cfg)
    if classifier is None:
        architecture = family.architecture
        if model_type in ENCODER_FAMILIES and not cfg.mlm_head:
            architecture = f"{architecture.removesuffix('ForMaskedLM')}Model"
    else:
        architecture = family.classifier
        if classifier.per_token:
            architecture = token_classifier_architecture(model_type)
        rules = without_lm_head(rules)
    return family.hf_config(cfg, model_type, architecture), ours_to_hf(state, rules)
