"""lmforge.model: ModelConfig + presets, the Transformer and the encoder-decoder Seq2SeqLM,
generation, Hugging Face conversion."""

from lmforge.model.config import PRESETS, ModelConfig, preset_config
from lmforge.model.convert import hf_config_to_model_config, load_pretrained, save_pretrained
from lmforge.model.generate import KVCache, generate
from lmforge.model.seq2seq import Seq2SeqLM
from lmforge.model.seq2seq_generate import generate_seq2seq_batched
from lmforge.model.transformer import Transformer

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Seq2SeqLM",
    "Transformer",
    "generate",
    "generate_seq2seq_batched",
    "hf_config_to_model_config",
    "load_pretrained",
    "preset_config",
    "save_pretrained",
]
