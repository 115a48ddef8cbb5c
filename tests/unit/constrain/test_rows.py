"""constrain.rows.write_allowed, the mask serve's guided rows and `lmforge generate`'s share:
the grammar's tokens, stop tokens exactly where the answer may end, nothing past the
tokenizer's ids (a model vocabulary padded past it)."""

from __future__ import annotations

import torch

from lmforge.constrain import compiler_for
from lmforge.constrain.rows import GuidedRow, write_allowed
from lmforge.tokenizer.files import TokenizerFiles
from unit.finetune.helpers import make_tokenizer_dir


def test_write_allowed_pads_and_allows_stops_where_the_answer_may_end(tmp_path):
    files = TokenizerFiles.load(make_tokenizer_dir(tmp_path / "tok"))
    guide = compiler_for(files).compile("regex", "a|ab")
    tokens, stop = guide.tokens, 2
    (a,) = files.encode("a")  # one token: the tokenizer holds every byte
    size = tokens.vocab.size
    into = torch.ones(size + 5, dtype=torch.bool)  # stale values everywhere
    write_allowed(into, tokens, tokens.start, [stop, size + 7])  # a stop id past the vocabulary
    grammar = tokens.allowed(tokens.start).clone()
    assert torch.equal(into[:size], grammar) and not into[size:].any()
    assert grammar[a] and not into[stop]  # "" is no answer: no stop token yet
    after = tokens.advance(tokens.start, a)
    write_allowed(into, tokens, after, [stop])
    assert into[stop] and into[:size].sum() == tokens.allowed(after).sum() + 1  # "a": may end
    assert torch.equal(tokens.allowed(tokens.start), grammar)  # the cached mask is not written
    row = GuidedRow(guide, [stop])
    assert torch.equal(row.allowed(size - 1), grammar[: size - 1])  # a smaller head: cut
