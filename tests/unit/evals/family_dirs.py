"""Micro model directories of every family the evals score: a BERT masked LM, a BERT sequence
classifier and token tagger, a BART seq2seq and a dialogue model (BART + intent head)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..finetune.encoder_tokenizers import bert_tokenizer_dir
from ..finetune.helpers import make_tokenizer_dir

SEQ2SEQ_IDS = {"pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}  # helpers' ids


def _copy_files(src: Path, dst: Path) -> Path:
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


def bert_dirs(root: Path) -> dict[str, Path]:
    """{"tok", "mlm", "clf", "tag"}: one random bert-micro body saved three ways."""
    from lmforge.finetune.heads import SequenceClassifier
    from lmforge.finetune.tagging import TokenTagger
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.files import TokenizerFiles

    tok = bert_tokenizer_dir(root / "tok")
    torch.manual_seed(0)
    lm = Transformer(preset_config("bert-micro", vocab_size=TokenizerFiles.load(tok).vocab_size))
    clf = SequenceClassifier(lm, 3).eval()
    tagger = TokenTagger(lm, 5).eval()
    with torch.no_grad():
        for p in (*clf.head.parameters(), *clf.pool.parameters()):
            p.normal_(std=0.5)
        tagger.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 50.0]))  # always "B-PER"
    dirs = {"tok": tok, "mlm": root / "mlm", "clf": root / "clf", "tag": root / "tag"}
    save_pretrained(lm, dirs["mlm"])
    save_pretrained(lm, dirs["clf"], classifier=clf.classifier_head(["neg", "neu", "pos"]))
    labels = ["O", "B-LOC", "I-LOC", "I-PER", "B-PER"]
    save_pretrained(lm, dirs["tag"], classifier=tagger.classifier_head(labels))
    for name in ("mlm", "clf", "tag"):
        _copy_files(tok, dirs[name])
    return dirs


def bart_dirs(root: Path) -> dict[str, Path]:
    """{"bart", "dialogue", "t5"}: a random bart-micro, the same with a 2-intent head beside it,
    and a tiny T5 saved by transformers itself."""
    import transformers

    from lmforge.finetune.dialogue import DialogueModel, save_intent_head
    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.seq2seq import Seq2SeqLM
    from lmforge.tokenizer.files import TokenizerFiles

    tok = make_tokenizer_dir(root / "tok")
    torch.manual_seed(0)
    s2s = Seq2SeqLM(preset_config("bart-micro", vocab_size=TokenizerFiles.load(tok).vocab_size))
    dialogue = DialogueModel(s2s, 2).eval()
    with torch.no_grad():
        dialogue.intent_head.weight.normal_(std=2.0)
    dirs = {"tok": tok, "bart": root / "bart", "dialogue": root / "dialogue", "t5": root / "t5"}
    for name in ("bart", "dialogue"):
        save_pretrained(s2s, dirs[name], extra_config=SEQ2SEQ_IDS, generation_config=SEQ2SEQ_IDS)
        _copy_files(tok, dirs[name])
    save_intent_head(dialogue, ["ask", "thank"], dirs["dialogue"])
    t5 = transformers.T5Config(
        vocab_size=TokenizerFiles.load(tok).vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
        num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(t5).save_pretrained(dirs["t5"])
    _copy_files(tok, dirs["t5"])
    return dirs
