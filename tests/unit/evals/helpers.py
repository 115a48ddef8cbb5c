"""Tiny model directories for eval tests: a BPE tokenizer trained here and a 2-layer model.

The model is saved exactly as the training stages save theirs (save_pretrained + tokenizer files),
so the evals read it through the same loader real runs use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_tokenizers import train_byte_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())\n",
    "Lists are mutable sequences; tuples are immutable.",
    "for i in range(10):\n    print(i * i)\n",
    "A dictionary maps keys to values. Keys must be hashable.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "Strings support slicing: s[1:3] returns two characters.",
]


def build_tokenizer(vocab_size: int = 300, specials: bool = True):
    specials_list = ["<|bos|>", "<|eos|>"] if specials else []
    tok = train_byte_bpe(CORPUS * 4, vocab_size, specials_list)
    return tok


def make_model_dir(
    path: Path, *, seed: int = 0, block_size: int = 64, specials: bool = True, preset="micro"
) -> Path:
    """Writes config.json + model.safetensors + tokenizer.json into path; returns path."""
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer

    tok = build_tokenizer(specials=specials)
    torch.manual_seed(seed)
    cfg = preset_config(preset, vocab_size=tok.get_vocab_size(), block_size=block_size)
    model = Transformer(cfg)
    save_pretrained(model, path, extra_config=_special_ids(tok) if specials else {})
    tok.save(str(path / "tokenizer.json"))
    return path


def train_briefly(model_dir: Path, texts: list[str], steps: int = 60, lr: float = 3e-3) -> Path:
    """Fits the saved model to texts for a few full-batch steps (it then beats a unigram model)."""
    from tokenizers import Tokenizer

    from lmforge.model.convert import load_pretrained, save_pretrained

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = tok.token_to_id("<|bos|>")
    model = load_pretrained(model_dir).train()
    seqs = [[bos, *tok.encode(t).ids] for t in texts]
    width = max(len(s) for s in seqs)
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    y = torch.tensor([s[1:] + [-100] * (width - len(s) + 1) for s in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model.eval(), model_dir, extra_config=_special_ids(tok))
    return model_dir


def _special_ids(tok) -> dict[str, int]:
    return {"bos_token_id": tok.token_to_id("<|bos|>"), "eos_token_id": tok.token_to_id("<|eos|>")}


def write_split(directory: Path, split: str, texts: list[str]) -> Path:
    """A data-stage style split file: <split>.jsonl.zst with one {"text"} per line."""
    import json

    import zstandard

    directory.mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path = directory / f"{split}.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(rows))
    return path


_TRAINED: dict[int, Path] = {}


def trained_model_dir(dest: Path, steps: int = 60) -> Path:
    """A copy of a model fitted to CORPUS; trained once per test process, then copied (fast)."""
    import shutil
    import tempfile

    if steps not in _TRAINED:
        src = Path(tempfile.mkdtemp(prefix="lmforge-trained-")) / "model"
        _TRAINED[steps] = train_briefly(make_model_dir(src), CORPUS, steps=steps)
    shutil.copytree(_TRAINED[steps], dest)
    return dest
