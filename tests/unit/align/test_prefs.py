"""Preference records: pairs, ranked lists, message prompts, bad records; synthetic pairs; rows."""

import json

import numpy as np
import pytest

from lmforge.align.encode import encode_pairs
from lmforge.align.prefs import load_pairs, pairs_of
from lmforge.align.synthetic import degenerate, synthetic_pairs
from lmforge.errors import InputError
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.model.transformer import IGNORE_INDEX


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_ranked_and_message_prompts_normalize_to_pairs():
    user = [{"role": "user", "content": "hi"}]
    assert pairs_of({"prompt": "hi", "chosen": "a", "rejected": "b"}) == [
        {"prompt": user, "chosen": "a", "rejected": "b"}
    ]
    ranked = pairs_of({"prompt": user, "ranked": ["best", "mid", "worst"]})
    assert [(p["chosen"], p["rejected"]) for p in ranked] == [
        ("best", "mid"), ("best", "worst"), ("mid", "worst"),
    ]  # fmt: skip
    trl = {
        "prompt": [{"role": "system", "content": "be brief"}, *user],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    (pair,) = pairs_of(trl)
    assert pair["prompt"][0]["role"] == "system" and (pair["chosen"], pair["rejected"]) == (
        "a",
        "b",
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, "has no prompt"),
        ({"prompt": "q", "chosen": "a"}, "fits no preference shape"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same text"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen must be a non-empty string"),
        ({"prompt": "q", "ranked": ["a"]}, "at least two"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "role"),
    ],
)
def test_a_malformed_record_names_file_and_line(tmp_path, record, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "prefs.jsonl", [good, record])
    with pytest.raises(InputError, match=f"prefs.jsonl line 2: .*{message}"):
        load_pairs(path)


def test_a_directory_reads_every_jsonl_file(tmp_path):
    _write(tmp_path / "a.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    _write(tmp_path / "b.jsonl", [{"prompt": "q", "ranked": ["x", "y", "z"]}])
    assert len(load_pairs(tmp_path)) == 4
    with pytest.raises(InputError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")


def test_synthetic_pairs_reject_with_another_answer_or_a_repetition():
    assert degenerate("Return the absolute value of a number.") == (
        "Return the absolute Return the absolute Return the absolute"
    )
    records = [
        {"instruction": f"Explain f{i}", "output": f"Does thing {i} well."} for i in range(40)
    ]
    others = synthetic_pairs(records, seed=0, degenerate_fraction=0.0)
    assert all(p["rejected"] != p["chosen"] and p["kind"] == "other_function" for p in others)
    assert {p["rejected"] for p in others} <= {r["output"] for r in records}
    mixed = synthetic_pairs(records, seed=0, degenerate_fraction=0.5)
    kinds = [p["kind"] for p in mixed]
    assert 10 <= kinds.count("degenerate") <= 30
    assert mixed == synthetic_pairs(records, seed=0, degenerate_fraction=0.5)  # seeded
    # the kind travels with the pair into the rows' stats, for per-kind accuracy
    assert pairs_of(mixed[0])[0]["kind"] == mixed[0]["kind"]


def test_pair_rows_label_exactly_the_reply(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    pairs = [{"prompt": [{"role": "user", "content": "What is the capital?"}],
              "chosen": "The capital is Paris.", "rejected": "Paris Paris Paris"}]  # fmt: skip
    long = {**pairs[0], "prompt": [{"role": "user", "content": "Why? " * 80}]}
    rows, stats, kept = encode_pairs(tok, [long, *pairs], seq_len=64)
    assert rows["input_ids"].shape == (1, 2, 64)
    assert stats == {"pairs": 1, "truncated": 2, "dropped": 1} and kept == [1]
    for side, reply in enumerate(["The capital is Paris.", "Paris Paris Paris"]):
        labels = rows["labels"][0, side]
        target = labels[labels != IGNORE_INDEX].tolist()
        assert tok.decode(target, skip_special_tokens=False).startswith(reply)
        ids = rows["input_ids"][0, side]
        assert rows["last"][0, side] == int(np.flatnonzero(ids != tok.pad_id).max())
        # labels are the next input token wherever set
        at = np.flatnonzero(labels != IGNORE_INDEX)
        assert (labels[at] == ids[at + 1]).all()
    # a reply cut away entirely drops the pair
    with pytest.raises(InputError, match=r"raise train\.seq_len"):
        encode_pairs(tok, pairs, seq_len=4)
