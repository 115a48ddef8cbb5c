"""Decontamination by 13-gram overlap, and the built-in stdlib-docs corpus."""

from __future__ import annotations

import json
import sys

import pytest

from lmforge.data.decontam import Decontaminator
from lmforge.data.stdlib_docs import _clean, _module_names, iter_functions, read_stdlib_docs
from lmforge.errors import InputError

from .corpus import prose


def test_decontaminator_finds_shared_13grams_from_jsonl_and_text(tmp_path):
    question = prose(11, 6)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": question, "answer": "yes"}) + "\n")
    (tmp_path / "eval.txt").write_text(prose(12, 6))
    dc = Decontaminator.from_files([tmp_path / "eval.jsonl", tmp_path / "eval.txt"], ngram=13)
    words = question.split()
    leaked = prose(13, 6) + " " + " ".join(words[5:25]) + " " + prose(14, 3)
    assert dc.overlap(leaked) >= 1
    assert dc.overlap(prose(13, 6)) == 0
    assert dc.overlap(" ".join(words[5:17])) == 0  # 12 words: below the n-gram length
    with pytest.raises(InputError, match="eval_sets"):
        Decontaminator.from_files([tmp_path / "missing.jsonl"])


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(read_stdlib_docs())


def test_stdlib_docs_corpus_is_real_text_with_duplicates(stdlib_docs):
    kinds = {d.meta["kind"] for d in stdlib_docs}
    assert kinds == {"topic", "module", "class", "function", "html_page"}
    by_id = {d.id: d for d in stdlib_docs}
    assert "stdlib:json.dumps" in by_id and by_id["stdlib:json.dumps"].meta["module"] == "json"
    assert "Serialize" in by_id["stdlib:json.dumps"].text
    assert not any(
        d.meta["module"].split(".")[0] in ("tkinter", "idlelib", "antigravity", "this", "test")
        for d in stdlib_docs
    )
    text_chars = sum(len(d.text) for d in stdlib_docs if d.meta["kind"] != "html_page")
    assert 1_000_000 < text_chars < 5_000_000
    texts = [d.text for d in stdlib_docs]
    assert len(texts) - len(set(texts)) > 500  # inherited docstrings: many exact duplicates
    assert " at 0x" not in "".join(d.text for d in stdlib_docs if d.meta["kind"] == "html_page")


def test_stdlib_module_order_is_deterministic():
    names = _module_names()
    assert names == sorted(names) and names == _module_names()
    assert "json" in names and "email.mime.text" in names and "tkinter" not in names


def test_iter_functions_records():
    recs = list(iter_functions())
    assert len(recs) > 1000
    dumps = next(r for r in recs if r["qualname"] == "json.dumps")
    assert dumps["module"] == "json" and dumps["signature"].startswith("(obj, *, skipkeys=False")
    assert dumps["docstring"].startswith("Serialize")


def test_stdlib_text_does_not_depend_on_where_python_is_installed():
    signature = f"(executable='{sys.executable}', bits='', linkage='')"
    assert _clean(signature) == "(executable='<python>', bits='', linkage='')"
    if sys.prefix != sys.base_prefix:  # inside a venv (as tests and the quickstart run)
        assert _clean(f"site: {sys.prefix}/share") == "site: <venv>/share"
    assert _clean("see /usr/bin/env and 0x1F") == "see /usr/bin/env and 0x1F"
