"""Builders for tests: a tiny byte-level BPE tokenizer with a ChatML template, micro model dirs."""

import json
import shutil
from pathlib import Path

import torch
from tiny_tokenizers import train_byte_bpe

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? The capital is Paris.",
    "Return the absolute value of a number. os.path.join joins paths.",
    "def f(x): return x + 1  # user assistant system",
] * 20


def make_tokenizer_dir(path: Path, vocab_size: int = 300) -> Path:
    tok = train_byte_bpe(CORPUS, vocab_size, SPECIALS)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "chat_template": CHATML,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def make_model_dir(
    path: Path, tokenizer_dir: Path, preset: str = "micro", seed: int = 0, **overrides: object
) -> Path:
    from tokenizers import Tokenizer

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    model = Transformer(preset_config(preset, vocab_size=vocab, **overrides))
    save_pretrained(model, path)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, path / f.name)
    return path
