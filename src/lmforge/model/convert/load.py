"""Loading: the module a model directory holds (Transformer, Seq2SeqLM, or T5 through
model.t5), its weights assigned without a second copy; quantized weights kept as QuantLinear /
QuantEmbedding (inference) or dequantized (training)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.model.config import ModelConfig
from lmforge.model.convert.files import read_config
from lmforge.model.convert.hf_import import QUANTIZED_LOADS, QuantizedLoad, checkpoint_state
from lmforge.model.quant import QuantEmbedding, QuantLinear
from lmforge.model.quant_checkpoint import QuantWeight, keep_quantized
from lmforge.model.transformer import Transformer

log = logging.getLogger(__name__)


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
    cfg, state = checkpoint_state(model_dir, hf, quantized)
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


def _floating(value: Tensor | QuantWeight) -> bool:
    return isinstance(value, QuantWeight) or value.is_floating_point()


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    """The module a config builds: Seq2SeqLM for an encoder-decoder, else the Transformer."""
    if cfg.is_encoder_decoder:
        from lmforge.model.seq2seq import Seq2SeqLM

        return Seq2SeqLM
    return Transformer
