"""Back-translation plumbing through two tiny random seq2seq models saved with save_pretrained.

Output quality is not claimed (the models are random); what is tested is that the rows go out
through the first model, come back through the second, in order, deterministically, and are
marked like every augmented row.
"""

from __future__ import annotations

import pytest

from lmforge.data.augment import AugmentConfig, Augmenter
from lmforge.errors import ConfigError

transformers = pytest.importorskip("transformers")

WORDS = "the a dog cat runs sleeps house garden big small red blue and is on in".split()


def _tiny_t5(path, seed):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1,
        num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    model.generation_config.suppress_tokens = [0, 1, 2]  # a random model: words, never specials
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _reference(texts, dirs, max_new_tokens):
    """The same round trip written directly against transformers."""
    import torch

    for d in dirs:
        tok = transformers.AutoTokenizer.from_pretrained(d)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return texts


def test_back_translation_round_trip_through_local_models(tmp_path):
    dirs = [_tiny_t5(tmp_path / "to", 1), _tiny_t5(tmp_path / "back", 2)]
    rows = [
        {"id": "r1", "text": "the dog runs in the garden", "label": "a"},
        {"id": "r2", "text": "a small cat sleeps on the red house", "label": "b"},
    ]
    cfg = AugmentConfig(enabled=True, methods=["backtranslate"], pivot=dirs, max_new_tokens=8)
    out = Augmenter(cfg).augment(rows, "train")
    expected = _reference([r["text"] for r in rows], dirs, 8)
    kept = [(r, e) for r, e in zip(rows, expected, strict=True) if e and e != r["text"]]
    assert kept, f"the random models returned the inputs unchanged: {expected}"
    assert [o["text"] for o in out] == [e for _, e in kept]
    assert all(o["augmented"] == "backtranslate" for o in out)
    assert [o["source_id"] for o in out] == [r["id"] for r, _ in kept]
    assert all(set(o["text"].split()) <= set(WORDS) for o in out)  # decoded by the 2nd model
    assert Augmenter(cfg).augment(rows, "train") == out  # greedy: reproducible


def test_pivot_that_is_no_model_dir_is_named(tmp_path):
    cfg = AugmentConfig(
        enabled=True, methods=["backtranslate"], pivot=[tmp_path / "nope", tmp_path]
    )
    with pytest.raises(ConfigError, match="nope is no model directory"):
        Augmenter(cfg).augment([{"text": "the dog"}], "train")
