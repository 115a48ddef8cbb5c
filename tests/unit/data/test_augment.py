"""Augmentation: EDA operations, synonym sources, marks, train-only and no-leak guarantees."""

from __future__ import annotations

import pytest

from lmforge.data import synonyms as syn_mod
from lmforge.data.augment import (
    AugmentConfig,
    Augmenter,
    attach_augmented,
    refuse_augmented,
    row_id,
    separate_augmented,
)
from lmforge.data.config import DataConfig
from lmforge.data.eda import random_delete, random_swap, synonym_replace
from lmforge.data.pipeline import build_steps
from lmforge.data.synonyms import Synonyms
from lmforge.errors import ConfigError, InputError

ROWS = [
    {"text": "The big dog is happy and runs fast to the old house.", "label": "pets", "id": "a"},
    {"text": "Open the file, read the text and write a new list.", "label": "code", "id": "b"},
    {"text": "A small child asks a good question about the answer.", "label": "kids", "id": "c"},
]


def _cfg(**kw):
    return AugmentConfig(enabled=True, synonyms="builtin", **kw)


def test_rows_are_marked_carry_their_fields_and_differ_from_the_source():
    aug = Augmenter(_cfg(copies=2, alpha=0.2))
    out = aug.augment(ROWS, "train")
    marks = {r["augmented"] for r in out}
    assert marks == {"eda-synonym", "eda-insert", "eda-swap", "eda-delete"}
    by_id = {r["id"]: r for r in ROWS}
    for r in out:
        src = by_id[r["source_id"]]
        assert r["label"] == src["label"] and r["text"] != src["text"]
        assert r["id"].startswith(f"{src['id']}#{r['augmented']}-")
    assert sum(aug.counts.values()) == len(out) and len(out) <= 3 * 4 * 2
    assert aug.synonym_source == "builtin"


def test_seeded_and_independent_of_row_order():
    a = Augmenter(_cfg(seed=3)).augment(ROWS, "train")
    b = Augmenter(_cfg(seed=3)).augment(list(reversed(ROWS)), "train")
    key = lambda r: (r["id"], r["text"])  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, b))
    c = Augmenter(_cfg(seed=4)).augment(ROWS, "train")
    assert sorted(map(key, c)) != sorted(map(key, a))


def test_augmenting_val_or_test_is_refused():
    aug = Augmenter(_cfg())
    for split in ("val", "test", "all"):
        with pytest.raises(ConfigError, match="training split only"):
            aug.augment(ROWS, split)


def test_already_augmented_rows_are_not_augmented_again():
    aug = Augmenter(_cfg(methods=["swap"]))
    first = aug.augment(ROWS, "train")
    assert aug.augment(first, "train") == []


def test_synonym_replacement_keeps_case_and_punctuation():
    import random

    syn = Synonyms("builtin")
    out = synonym_replace("Big, happy DOG!", 1.0, random.Random(0), syn)
    first, second, third = out.split()
    assert first.endswith(",") and first[0].isupper() and first[:-1].lower() in syn.synonyms("big")
    assert second.lower() in syn.synonyms("happy")
    assert third == "DOG!"  # no synonym in the list: untouched


def test_swap_keeps_the_words_and_delete_keeps_one():
    import random

    text = "one two three four five six seven eight nine ten"
    swapped = random_swap(text, 0.3, random.Random(1))
    assert swapped != text and sorted(swapped.split()) == sorted(text.split())
    assert random_delete("only", 1.0, random.Random(0)) == "only"
    assert len(random_delete(text, 0.99, random.Random(0)).split()) >= 1


def test_falls_back_to_the_builtin_list_without_wordnet(monkeypatch):
    monkeypatch.setattr(syn_mod, "wordnet_available", lambda: False)
    assert Synonyms("auto").name == "builtin"
    with pytest.raises(ConfigError, match="WordNet corpus is not installed"):
        Synonyms("wordnet")


def test_wordnet_is_used_when_installed(monkeypatch):
    """With the corpus present, auto picks it (checked by faking nltk's wordnet module)."""
    import types

    import nltk.corpus

    class Lemma:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    fake = types.SimpleNamespace(
        synsets=lambda w: [types.SimpleNamespace(lemmas=lambda: [Lemma("canine"), Lemma(w)])],
        ensure_loaded=lambda: None,
    )
    monkeypatch.setattr(nltk.corpus, "wordnet", fake)
    monkeypatch.setattr(syn_mod, "wordnet_available", lambda: True)
    syn = Synonyms("auto")
    assert syn.name == "wordnet" and syn.synonyms("dog") == ("canine",)


def test_held_out_rows_get_no_copies_in_training():
    aug = Augmenter(_cfg(methods=["swap"]))
    pool = ROWS + aug.augment(ROWS, "train")
    originals, augmented = separate_augmented(pool)
    assert originals == ROWS and len(augmented) == 3
    train = attach_augmented(originals[:2], augmented)
    assert {r["source_id"] for r in train if "source_id" in r} == {"a", "b"}
    with pytest.raises(InputError, match=r"val\.jsonl record 2 is augmented"):
        refuse_augmented([ROWS[0], augmented[0]], "val.jsonl")


def test_rows_without_id_are_keyed_by_text():
    rows = [{"text": "Open the file and read the text.", "label": "x"}]
    out = Augmenter(_cfg(methods=["swap"])).augment(rows, "train")
    assert out[0]["source_id"] == row_id(rows[0]) and "id" not in out[0]
    with pytest.raises(InputError, match=r"row 1 .* no text field"):
        Augmenter(_cfg()).augment([{"label": "x"}], "train")


def test_augmentation_is_no_per_document_step():
    """The pipeline's pre-split steps never include augmentation, whatever the config says."""
    cfg = DataConfig.model_validate({"source": ["x"], "out": "o", "augment": {"enabled": True}})
    assert all("augment" not in s.name for s in build_steps(cfg))


def test_backtranslate_needs_pivot_dirs():
    with pytest.raises(ConfigError, match="pivot is empty"):
        Augmenter(_cfg(methods=["backtranslate"]))
