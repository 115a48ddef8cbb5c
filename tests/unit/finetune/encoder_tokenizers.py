"""Local BERT (WordPiece) and RoBERTa (byte-level BPE) tokenizer directories written by
transformers' own tokenizer classes, so their tokenizer.json carries the real post_processor."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the capital is paris . x y ##s def f ( ) : return + 1 and more words here a b c "
         "alpha beta gamma delta one two three four text same different").split()  # fmt: skip
CORPUS = ["The capital is Paris. def f(x): return x + 1 and more words here"] * 5


def bert_tokenizer_dir(path: Path) -> Path:
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(str(path))
    return path


def roberta_tokenizer_dir(path: Path) -> Path:
    import tokenizers
    from transformers import RobertaTokenizerFast

    bpe = tokenizers.ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(CORPUS, vocab_size=300, special_tokens=specials)
    path.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(path))  # vocab.json + merges.txt
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    tok = RobertaTokenizerFast(vocab=str(vocab_file), merges=str(merges_file))
    tok.save_pretrained(str(path))
    return path
