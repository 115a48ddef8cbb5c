"""SFT data: template rendering as transformers does, the assistant-only mask, truncation, packing."""

import numpy as np
import pytest

from lmforge.errors import InputError
from lmforge.finetune.sft import build_sft_rows, encode_chat, load_chat_tokenizer, truncate

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
    {"role": "user", "content": "And absolute value?"},
    {"role": "assistant", "content": "Return the absolute value."},
]


def test_render_matches_transformers_apply_chat_template(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tok = load_chat_tokenizer(tokenizer_dir)
    for gen in (False, True):
        ours = tok.render_chat(CONV[:2], add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=gen)


def test_loss_mask_is_exactly_the_assistant_turns(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    ids, mask = encode_chat(tok, CONV)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    context = [i for i, m in zip(ids, mask, strict=True) if not m]
    raw = tok.tokenizer.decode
    assert raw(trained, skip_special_tokens=False) == (
        "The capital is Paris.<|im_end|>\nReturn the absolute value.<|im_end|>\n"
    )
    assert raw(context, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
        "France?<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAnd absolute value?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # two contiguous trained runs, one per assistant turn
    runs = np.flatnonzero(np.diff(np.r_[0, mask, 0]) == 1)
    assert len(runs) == 2


def test_truncation_policies():
    ids, mask = list(range(10)), [0] * 5 + [1] * 5
    assert truncate(ids, mask, 4, "right") == ([0, 1, 2, 3], [0, 0, 0, 0])
    assert truncate(ids, mask, 4, "left") == ([6, 7, 8, 9], [1, 1, 1, 1])
    assert truncate(ids, mask, 4, "drop") is None
    assert truncate(ids, mask, 10, "drop") == (ids, mask)


def test_rows_pack_examples_with_boundaries_and_count_truncation(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    short = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Paris."},
            ]
        }
    ]
    long = [{"messages": CONV}]
    n_short = len(encode_chat(tok, short[0]["messages"])[0])
    seq_len = 3 * n_short + 2
    rows, stats = build_sft_rows(tok, short * 6 + long, seq_len, truncation="drop")
    assert stats["dropped"] == 1 and stats["rows"] == 2
    assert rows["doc_ids"][0].max() == 2  # three examples share a row
    # no label crosses an example boundary: the last token of each example predicts nothing
    for r in range(rows["input_ids"].shape[0]):
        d = rows["doc_ids"][r]
        boundary = np.flatnonzero(d[:-1] != d[1:])
        assert (rows["labels"][r, boundary] == -100).all()
    _, left = build_sft_rows(tok, long, 20, truncation="left")
    assert left["truncated"] == 1 and left["rows"] == 1
    _, unpacked = build_sft_rows(tok, short * 6, seq_len, packing=False)
    assert unpacked["rows"] == 6


def test_nothing_fits_is_an_input_error(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    with pytest.raises(InputError, match="seq_len"):
        build_sft_rows(tok, [{"messages": CONV}], 8, truncation="drop")
