"""One builder for the tiny byte-level BPE tokenizers that unit and integration tests train."""

from __future__ import annotations

from collections.abc import Sequence


def train_byte_bpe(
    corpus: Sequence[str], vocab_size: int, specials: Sequence[str], add_prefix_space: bool = False
):
    """A `tokenizers.Tokenizer`: byte-level BPE trained on corpus in memory (GPT-2's layout when
    add_prefix_space, lmforge's without)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok
