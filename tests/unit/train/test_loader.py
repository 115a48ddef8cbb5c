"""Token windows, document packing and row batches: determinism, rank slices, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.errors import InputError
from lmforge.train.loader import RowBatches, TokenWindows, open_tokens, pack_documents

TOKENS = np.arange(1000, dtype=np.uint16)


def test_windows_are_contiguous_and_labels_shifted():
    batch = TokenWindows(TOKENS, seq_len=16, batch_size=4, seed=1).batch(0)
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.all(x[:, 1:] - x[:, :-1] == 1)  # arange: contiguous windows
    assert torch.all(y[:, -1] == x[:, -1] + 1)


def test_batches_depend_only_on_seed_and_index():
    a = TokenWindows(TOKENS, 16, 4, seed=3)
    first = [next(a) for _ in range(3)]
    assert torch.equal(
        first[2]["input_ids"], TokenWindows(TOKENS, 16, 4, seed=3).batch(2)["input_ids"]
    )
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])
    assert not torch.equal(
        first[0]["input_ids"], TokenWindows(TOKENS, 16, 4, seed=4).batch(0)["input_ids"]
    )


def test_resume_continues_with_the_next_batch():
    a = TokenWindows(TOKENS, 16, 4, seed=0)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = next(a)
    b = TokenWindows(TOKENS, 16, 4, seed=99)
    b.load_state_dict(state)
    assert torch.equal(next(b)["input_ids"], expected["input_ids"])


def test_ranks_read_disjoint_shares_of_the_same_global_batch():
    single = TokenWindows(TOKENS, 8, 4, seed=5).batch(7)["input_ids"]
    r0 = TokenWindows(TOKENS, 8, 2, seed=5, rank=0, world_size=2).batch(7)["input_ids"]
    r1 = TokenWindows(TOKENS, 8, 2, seed=5, rank=1, world_size=2).batch(7)["input_ids"]
    assert torch.equal(torch.cat([r0, r1]), single)


def test_sequential_windows_cover_the_file_in_order_and_wrap():
    seq = TokenWindows(TOKENS, seq_len=100, batch_size=3, shuffle=False)
    assert seq.num_windows == 9
    starts = [int(seq.batch(i)["input_ids"][r, 0]) for i in range(4) for r in range(3)]
    assert starts == [0, 100, 200, 300, 400, 500, 600, 700, 800, 0, 100, 200]


def test_too_short_token_file_is_a_clear_error():
    with pytest.raises(InputError, match="seq_len"):
        TokenWindows(TOKENS[:10], seq_len=16, batch_size=1)


def test_open_tokens_memmaps_and_checks(tmp_path):
    TOKENS.astype(np.uint32).tofile(tmp_path / "train.bin")
    assert np.array_equal(open_tokens(tmp_path / "train.bin", "uint32"), TOKENS)
    with pytest.raises(InputError, match="missing"):
        open_tokens(tmp_path / "val.bin", "uint16")
    with pytest.raises(InputError, match="int8"):
        open_tokens(tmp_path / "train.bin", "int8")


def test_packing_keeps_documents_whole_and_masks_boundaries():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10] * 12]
    masks = [[1, 1, 1], [0, 1], [1, 1, 1, 1], [1] * 12]
    rows, stats = pack_documents(docs, seq_len=6, loss_masks=masks, pad_id=0)
    assert rows["input_ids"].tolist() == [
        [1, 2, 3, 4, 5, 0],
        [6, 7, 8, 9, 0, 0],
        [10, 10, 10, 10, 10, 10],
    ]
    assert rows["doc_ids"].tolist()[0] == [0, 0, 0, 1, 1, -1]
    # labels: next token inside a document, -100 across boundaries, on padding, and on masked targets
    assert rows["labels"].tolist()[0] == [2, 3, -100, 5, -100, -100]
    assert rows["labels"].tolist()[1] == [7, 8, 9, -100, -100, -100]
    assert stats["truncated"] == 1 and stats["rows"] == 3
    assert stats["pad_fraction"] == pytest.approx(3 / 18)


def test_row_batches_cover_an_epoch_once_and_resume_exactly():
    rows = {"input_ids": np.arange(20).reshape(10, 2)}
    loader = RowBatches(rows, batch_size=2, seed=0, world_size=1)
    seen = [next(loader)["input_ids"][:, 0].tolist() for _ in range(5)]
    assert sorted(x for b in seen for x in b) == list(range(0, 20, 2))
    state = loader.state_dict()
    expected = next(loader)["input_ids"]
    other = RowBatches(rows, batch_size=2, seed=0)
    other.load_state_dict(state)
    assert torch.equal(next(other)["input_ids"], expected)


def test_row_batches_rank_shares_match_single_process():
    rows = {"input_ids": np.arange(24).reshape(12, 2)}
    single = RowBatches(rows, batch_size=4, seed=1).batch(3)["input_ids"]
    parts = [
        RowBatches(rows, batch_size=2, seed=1, rank=r, world_size=2).batch(3)["input_ids"]
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat(parts), single)
