"""Back-translation: text -> pivot language -> back, through local seq2seq model directories.

Any pair of Hugging Face encoder-decoder directories works (Marian opus-mt en-de and de-en, a T5
fine-tuned both ways, ...); nothing is downloaded. The paraphrase quality is the models', not
ours: this module is only the batching and greedy (so reproducible) decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError


def _load(model_dir: Path) -> tuple[Any, Any]:
    try:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError("back-translation needs transformers: pip install 'lmforge[hf]'") from exc
    if not (Path(model_dir) / "config.json").is_file():
        raise ConfigError(
            f"augment.pivot: {model_dir} is no model directory (no config.json); give local "
            "seq2seq model dirs saved with save_pretrained (e.g. a Marian opus-mt pair)"
        )
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForSeq2SeqLM.from_pretrained(
        model_dir
    ).eval()


class BackTranslator:
    """Translates through each pivot model in turn ([to_pivot, from_pivot]); models load once."""

    def __init__(self, pivot: list[Path], max_new_tokens: int = 64, batch_size: int = 16) -> None:
        if len(pivot) < 2:
            raise ConfigError(
                "augment.pivot needs at least two model dirs: [to_pivot_language, back_to_source]"
            )
        self.models = [_load(p) for p in pivot]
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _translate(self, texts: list[str], tok: Any, model: Any) -> list[str]:
        """Each text through one model; empty texts (a failed earlier hop) stay empty."""
        import torch

        todo = [i for i, t in enumerate(texts) if t.strip()]
        out = [""] * len(texts)
        for lo in range(0, len(todo), self.batch_size):
            idx = todo[lo : lo + self.batch_size]
            batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                        truncation=True)  # fmt: skip
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
            for i, text in zip(idx, tok.batch_decode(ids, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
        return out

    def __call__(self, texts: list[str]) -> list[str]:
        for tok, model in self.models:
            texts = self._translate(texts, tok, model)
        return texts
