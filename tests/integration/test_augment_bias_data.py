"""The data stage with augment: and bias: on: augmented rows only in train, the planted skew shown.

The corpus is labeled sentences; "she"/"her" always travel with label "care" and "he"/"his"
are rare, so the data-side report must show the female side far more frequent and entirely on
one label, and the religion group (never mentioned) at zero.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from unit.data.corpus import prose

from lmforge.common.io import read_jsonl
from lmforge.data import prepare

pytestmark = pytest.mark.integration


def _corpus(path, n=120):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        # the corpus's own "Her ..." and "priest" would blur the planted signal
        text = re.sub(r"\b(her|priest)\b", "the", prose(i, 2), flags=re.IGNORECASE)
        if i % 3 == 0:
            rows.append({"id": f"d{i}", "text": f"She said her {text}", "label": "care"})
        elif i % 10 == 1:
            rows.append({"id": f"d{i}", "text": f"He said {text}", "label": "build"})
        else:
            rows.append({"id": f"d{i}", "text": text, "label": rng.choice(["care", "build"])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(src, out):
    return {
        "source": [str(src)],
        "out": str(out),
        "workers": 1,
        "language": {"enabled": False},
        "quality": {"preset": "lenient"},
        "dedup": {"fuzzy": False},
        "augment": {"enabled": True, "copies": 2, "alpha": 0.2, "synonyms": "builtin"},
        "bias": {"enabled": True},
    }


def test_augmented_rows_stay_in_train_and_bias_skew_is_reported(tmp_path):
    out = prepare(_config(_corpus(tmp_path / "src.jsonl"), tmp_path / "data"))
    splits = {s: list(read_jsonl(out / f"{s}.jsonl.zst")) for s in ("train", "val", "test")}
    train_aug = [r for r in splits["train"] if r.get("augmented")]
    assert len(train_aug) > len(splits["train"]) // 2
    held = splits["val"] + splits["test"]
    assert held and not any(r.get("augmented") for r in held)
    held_ids, held_texts = {r["id"] for r in held}, {r["text"] for r in held}
    train_ids = {r["id"] for r in splits["train"] if not r.get("augmented")}
    for r in train_aug:
        assert r["source_id"] in train_ids and r["source_id"] not in held_ids
        assert r["text"] not in held_texts
    assert all("label" in r and "fold" not in r for r in train_aug)

    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["augment"]["rows"].values()) == len(train_aug)
    assert stats["augment"]["synonyms"] == "builtin"
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    assert manifest["train_docs"] == len(splits["train"])

    gender = stats["bias"]["train"]["groups"]["gender"]
    male, female = gender["sides"]["male"], gender["sides"]["female"]
    assert female["per_1k_words"] > 3 * male["per_1k_words"] > 0
    assert gender["ratio"] < 0.34
    assert set(female["by_label"]) == {"care"}  # the planted shortcut
    assert female["top_terms"].keys() >= {"she", "her"}
    assert female["examples"] and "he" in female["examples"][0].lower()
    religion = stats["bias"]["train"]["groups"]["religion"]["sides"]
    assert religion["christian"]["count"] == religion["muslim"]["count"] == 0

    again = prepare(_config(tmp_path / "src.jsonl", tmp_path / "data2"))
    assert (again / "train.jsonl.zst").read_bytes() == (out / "train.jsonl.zst").read_bytes()
