"""lmforge.model: ModelConfig + presets, the Transformer, generation, Hugging Face conversion."""

from lmforge.model.config import PRESETS, ModelConfig, preset_config
from lmforge.model.convert import hf_config_to_model_config, load_pretrained, save_pretrained
from lmforge.model.generate import KVCache, generate
from lmforge.model.transformer import Transformer

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "generate",
    "hf_config_to_model_config",
    "load_pretrained",
    "preset_config",
    "save_pretrained",
]
