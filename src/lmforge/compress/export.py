"""`compress export`: onnx/ (model.onnx + tokenizer files) and model.gguf, each checked.

ONNX is compared with PyTorch's logits under onnxruntime (a decoder LM's: a left-padded prefill
and one cached decode step, then timed at greedy decoding; a decoder classifier's label logits
and an encoder's outputs: right- and left-padded batches, compress.onnx_export); GGUF (matrices as `export.gguf_type`) is read back
with gguf's reader, and what its rounding costs is measured on the model holding the file's
weights: max |logit difference| and, with `data`, perplexity. A check that fails is a
StageError, and the stage then leaves no manifest.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.artifacts import StageContext
from lmforge.compress.files import copy_mean_head, copy_side_files, special_ids
from lmforge.compress.gguf_export import check_gguf, encode_tensor, export_gguf
from lmforge.compress.measure import prompt_ids, quality, weights_bytes
from lmforge.compress.onnx_export import (
    EncoderGraph,
    check_classifier_onnx,
    check_encoder_onnx,
    check_onnx,
    export_classifier_onnx,
    export_encoder_onnx,
    export_onnx,
    ort_decode_tokens_per_s,
    ort_session,
)
from lmforge.errors import ConfigError
from lmforge.evals.lm import EvalModel

EXTRAS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "gguf": ("gguf",)}


def require_extra(fmt: str) -> None:
    """ConfigError naming the extra to install when a format's packages are missing."""
    missing = [m for m in EXTRAS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"export to {fmt} needs {', '.join(missing)}: pip install 'lmforge[{fmt}]'"
        )


def gguf_rounded(model: nn.Module, file_type: str) -> nn.Module:
    """model, or a copy whose matrices hold what a GGUF of file_type stores, back in float32.

    Rounding works within a row (q8_0: blocks of 32 columns), so llama.cpp's row reordering and
    splits of q/k/v and gate/up commute with it: the copy's GGUF tensors are the file's.
    """
    import gguf

    if file_type == "f32":
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, weight in rounded.named_parameters():
            if weight.ndim == 2:
                data, qtype = encode_tensor(name, weight.float().numpy(), file_type)
                values = gguf.quants.dequantize(data, qtype).reshape(weight.shape)
                weight.copy_(torch.from_numpy(values))
    return rounded


def gguf_quality(
    original: EvalModel,
    file_type: str,
    prompt_tokens: int,
    texts: list[str] | None,
    original_quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the GGUF's rounding costs: max |logit difference| from the original on a fixed
    prompt and, with texts, perplexity / bits-per-byte of the file's weights. An f32 file holds
    the original's weights: no difference, and its quality is original_quality where given."""
    if file_type == "f32" and original_quality and "perplexity" in original_quality:
        keys = ("perplexity", "bits_per_byte")
        return {"max_abs_logit_diff": 0.0, **{k: original_quality[k] for k in keys}}
    if file_type == "f32" and not texts:
        return {"max_abs_logit_diff": 0.0}
    rounded = gguf_rounded(original.model, file_type)
    idx = prompt_ids(original.model.config.vocab_size, prompt_tokens)
    with torch.no_grad():
        diff = (rounded(idx) - original.model(idx)).abs().max().item()
    row: dict[str, Any] = {"max_abs_logit_diff": diff}
    if texts:
        name = f"{original.name}-gguf-{file_type}"
        scored = quality(EvalModel(name, original.path, rounded, original.files), texts)
        row.update(perplexity=scored["perplexity"], bits_per_byte=scored["bits_per_byte"])
    return row


def classifier_onnx(settings: Any, ctx: StageContext, src: Path, original: EvalModel) -> dict:
    """onnx/: a decoder classifier's graph (label logits at the last attended non-pad token)
    beside its config.json (id2label) and tokenizer files, checked against PyTorch; its size and
    check."""
    head = original.head
    if head.reads != "last_token":
        raise ConfigError(f"{src}'s head pools {head.reads}: ONNX export takes a decoder "
                          "classifier (last-token head); use method=quantize")  # fmt: skip
    args = (original.model, head.linear, original.pad_id)

    def write(onnx: Path) -> dict[str, float]:
        export_classifier_onnx(*args, onnx, settings.opset)
        return check_classifier_onnx(*args, ort_session(onnx), settings.atol)

    return onnx_dir(ctx, src, write)


def encoder_onnx(settings: Any, ctx: StageContext, src: Path, original: EvalModel) -> dict:
    """onnx/: an encoder's graph (its sequence head's label logits, pooled in the graph, or its
    hidden states) beside its config.json (and a mean-pooled head's file) and tokenizer files,
    checked against PyTorch on padded batches; its size and check."""
    from lmforge.evals.heads import linear_of
    from lmforge.model.convert import load_classifier

    head = load_classifier(src)  # a sequence head or none (stage.refuse_source: a token head)
    linear = pool = None
    if head is not None:
        linear = linear_of(head.weight, head.bias)
        pool = linear_of(head.pool_weight, head.pool_bias) if head.pooling == "first" else None
    graph = EncoderGraph(original.model, linear, pool)

    def write(onnx: Path) -> dict[str, float]:
        export_encoder_onnx(graph, onnx, settings.opset)
        return check_encoder_onnx(graph, original.pad_id, ort_session(onnx), settings.atol)

    return onnx_dir(ctx, src, write)


def onnx_dir(ctx: StageContext, src: Path, write: Any) -> dict[str, Any]:
    """ctx.out/onnx, written whole or not at all: write(model.onnx) exports and checks the graph,
    then src's config.json, head file (a mean-pooled one's) and tokenizer files go beside it."""
    with ctx.atomic_path(ctx.out / "onnx") as tmp:
        tmp.mkdir(parents=True)
        checks = write(tmp / "model.onnx")
        copy_side_files(src, tmp)
        copy_mean_head(src, tmp)
        shutil.copy2(src / "config.json", tmp / "config.json")
    return {"weights_bytes": weights_bytes(ctx.out / "onnx" / "model.onnx"), **checks}


def export_method(
    cfg: Any,
    ctx: StageContext,
    src: Path,
    original: EvalModel,
    texts: list[str] | None = None,
    original_quality: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the requested formats; returns their checks, sizes and (GGUF, with texts) quality
    ("after" is the ONNX model when exported, else the GGUF file). original_quality: the
    original's perplexity / bits-per-byte when already measured (an f32 GGUF's own)."""
    settings, model = cfg.export, original.model
    for fmt in settings.formats:
        require_extra(fmt)
    result: dict[str, Any] = {}
    if "onnx" in settings.formats and not model.config.causal:  # BERT/RoBERTa: no KV cache
        result["onnx"] = encoder_onnx(settings, ctx, src, original)
    elif "onnx" in settings.formats and original.head is not None:  # a decoder classifier
        result["onnx"] = classifier_onnx(settings, ctx, src, original)
    elif "onnx" in settings.formats:

        def write(onnx: Path) -> dict[str, float]:
            export_onnx(model, onnx, settings.opset)
            return check_onnx(model, ort_session(onnx), settings.atol)

        result["onnx"] = onnx_dir(ctx, src, write)
        speed, session = cfg.speed, ort_session(ctx.out / "onnx" / "model.onnx")
        result["onnx"]["tokens_per_s"] = ort_decode_tokens_per_s(
            session, model, speed.prompt_tokens, speed.new_tokens, speed.repeats
        )
    if "gguf" in settings.formats:
        special, file_type = special_ids(src), settings.gguf_type
        with ctx.atomic_path(ctx.out / "model.gguf") as tmp:
            export_gguf(model, src, tmp, special, file_type)
            checks = check_gguf(tmp, model, src, special, file_type)
        result["gguf"] = {
            "file_type": file_type,
            "weights_bytes": weights_bytes(ctx.out / "model.gguf"),
            **checks,
            **gguf_quality(original, file_type, cfg.speed.prompt_tokens, texts, original_quality),
        }
    first = result.get("onnx") or result["gguf"]
    measured = ("weights_bytes", "tokens_per_s", "perplexity", "bits_per_byte")
    result["after"] = {k: first[k] for k in measured if k in first}
    return result
