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

The jobs live in their own modules: files (a model directory's config.json and tensors),
hf_import (config.json and HF names -> ModelConfig and our state dict), load (load_pretrained,
model_class), classifier (ClassifierHead, load_classifier), mean_head (a mean-pooled encoder
classifier's head file beside its encoder), export (save_pretrained, which writes that file too).
This package is their one public entry point: `from lmforge.model.convert import load_pretrained`.
"""

from lmforge.model.convert.classifier import ClassifierHead, load_classifier
from lmforge.model.convert.export import NATIVE_CLASSIFIER, save_pretrained
from lmforge.model.convert.files import (
    is_encoder_decoder,
    model_display_name,
    read_config,
    read_tensors,
    resolve_model_dir,
)
from lmforge.model.convert.hf_import import (
    NATIVE,
    QUANTIZED_LOADS,
    SUPPORTED_MODEL_TYPES,
    TRAINING_FIELDS,
    QuantizedLoad,
    hf_config_to_model_config,
)
from lmforge.model.convert.load import load_pretrained, model_class
from lmforge.model.convert.mean_head import MEAN_HEAD, MEAN_HEAD_KEY

__all__ = [
    "MEAN_HEAD",
    "MEAN_HEAD_KEY",
    "NATIVE",
    "NATIVE_CLASSIFIER",
    "QUANTIZED_LOADS",
    "SUPPORTED_MODEL_TYPES",
    "TRAINING_FIELDS",
    "ClassifierHead",
    "QuantizedLoad",
    "hf_config_to_model_config",
    "is_encoder_decoder",
    "load_classifier",
    "load_pretrained",
    "model_class",
    "model_display_name",
    "read_config",
    "read_tensors",
    "resolve_model_dir",
    "save_pretrained",
]
