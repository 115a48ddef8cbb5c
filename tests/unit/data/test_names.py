"""Person-name detection (data.names) and the PII step / data stage counting it."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.common.io import read_jsonl
from lmforge.data import prepare
from lmforge.data.config import PiiConfig
from lmforge.data.document import Document
from lmforge.data.names import _WORD, LEXICON, lexicon, name_patterns, trie_regex
from lmforge.data.pii import PiiStep

# text -> the names the detector must replace in it (an empty list: it must leave it alone)
CASES = [
    ("I am Alice Smith (<EMAIL>). How do I join paths?", ["Alice Smith"]),
    ("Hello, my name is Will.", ["Will"]),  # a stop-list given name after a cue
    ("My name is Gerhard Häring", ["Gerhard Häring"]),
    # letters beyond Latin Extended-A: Azerbaijani ə, Romanian ș/ț, Vietnamese ầ
    ("My name is Cəlal Kərimov. Dear Ștefan, ask Mr. Trần.", ["Cəlal Kərimov", "Ștefan", "Trần"]),
    ("I'm Eve, thanks", ["Eve"]),
    ("This is Mark.", ["Mark"]),
    ("Dear Bob,\nthe build is green.", ["Bob"]),
    ("Regards,\nCarol White", ["Carol White"]),
    ("Thanks,\r\nCarol White\r\nSincerely,\r\nBob", ["Carol White", "Bob"]),  # CRLF lines
    ("Anna Smith-Jones and Will Kowalczyk-Brown", ["Anna Smith-Jones", "Will Kowalczyk-Brown"]),
    ("Ask Mr. Kowalczyk or Dr. Alice B. Smith.", ["Kowalczyk", "Alice B. Smith"]),
    ("Will Smith and Dan Brown met Frank Moore.", ["Will Smith", "Dan Brown", "Frank Moore"]),
    ("Return Alice Smith now", ["Alice Smith"]),  # a Title-case word before the name
    ("Alice Smith's book", ["Alice Smith"]),  # the possessive stays: "<NAME>'s book"
    ("Written by Sjoerd Mullender.", ["Sjoerd Mullender"]),  # unknown surname, not a word
    # surname particles, after a given name or a title
    ("Written by Guido van Rossum.", ["Guido van Rossum"]),
    ("Ludwig von Mises, Vincent van der Berg", ["Ludwig von Mises", "Vincent van der Berg"]),
    ("Maria de la Cruz met Mr. van Rossum.", ["Maria de la Cruz", "van Rossum"]),
    # an abbreviated particle, an elided one, four-part names: two given names and two surnames
    ("Written by Martin v. Löwis.", ["Martin v. Löwis"]),
    ("(C) 2000 Luke Kenneth Casson Leighton <x>", ["Luke Kenneth Casson Leighton"]),
    (
        "Amaury Forgeot d'Arc, José Luis Rodríguez Zapatero",
        ["Amaury Forgeot d'Arc", "José Luis Rodríguez Zapatero"],
    ),
    ("Geraldine Sim Wei Ying", ["Geraldine Sim Wei Ying"]),  # "-ing" after two letters or more
    # the second surname word: on the same line, not an English noun or adjective
    ("Steve Purcell\nCopyright 2001", ["Steve Purcell"]),
    ("the William Lowell Putnam Mathematical Competition", ["William Lowell Putnam"]),
    # technical words, places and companies (installed packages' docs)
    ("O'Reilly Media Inc., French Dataset, Nile Valley, Mac Catalyst, Marine License", []),
    ("Darija Translation tasks", []),
    # a name wrapped onto the next line
    (
        "Thanks to Guido\nvan Rossum and Sjoerd\r\nMullender.",
        ["Guido\nvan Rossum", "Sjoerd\r\nMullender"],
    ),
    # a given name that is also a word, before a surname-like word that is not one
    ("Thanks to Skip Montanaro.", ["Skip Montanaro"]),
    # double given names, also when the first is a word
    ("Mary Ann Smith and Jean Paul Sartre", ["Mary Ann Smith", "Jean Paul Sartre"]),
    # stop-list given names need a cue or a known surname after them
    ("Will Return the value. May 2024. Mark the item. Grant Access.", []),
    ("Bill Payment Service, Rose Garden, Case Study, Long Term", []),
    ("Alice's turn", []),  # a lone given name without a cue is not enough
    ("Alice Python, Alice Return, Jan Feb Mar, Sep Oct", []),  # not surname-like
    # names inside code identifiers, paths and dotted names
    ("self.Alice Smith, Alice_Smith, AliceSmith, Alice(x), alice.smith, /Alice Smith", []),
    ("The Python Software Foundation and the Unicode Standard", []),
    ("i am alice smith", []),  # lowercase is not a name to this detector
    # the new rules' limits: one line break (not a paragraph), particles need a name after them
    ("Alice\n\nSmith, Alice\n\nvan Rossum", []),
    ("Alice de la mode, Grace van the Return, the van der Waals force", []),
    ("Skip Return values. Max Heap. Will Python do? An\nObject. Tab Nanny", []),
    # technical words that are given names, before words the lexicon does not know
    ("TLS Web Server Authentication; Unknown Error; Odd Function; Math Software", []),
    # a name is taken from its first word, also when a later word is an ambiguous given name
    # ("Ward"): run alone first, that word's pattern left "Greg" in clear text
    ("By Greg Ward Distutils and Alice Smith Jr", ["Greg Ward", "Alice Smith Jr"]),
    # a Python module's name is no surname (a heading word after a name)
    ("Raymond Hettinger Itertools; Mr. Itertools", ["Raymond Hettinger"]),
    # an everyday given name before a name: the name is still found, the word stays
    ("Max Alice Kowalczyk and Will Alice Kowalczyk", ["Alice Kowalczyk", "Alice Kowalczyk"]),
    # a legal case is two people's names: replaced as one, deliberately ("v." is a particle)
    ("See Jordan v. Brown (1999).", ["Jordan v. Brown"]),
    # a name in a Python string with a prefix; not after other letters and an apostrophe
    (
        "u'Alice Smith', f'Jean Paul Sartre', rb'Will Smith', xl'Alice Smith",
        ["Alice Smith", "Jean Paul Sartre", "Will Smith"],
    ),
    # French and Italian elided articles and words before a name: the name, not the article
    # (the whole name: "l'Jean Paul Sartre" once left "l'Jean" in clear text)
    ("l'Jean Paul Sartre", ["Jean Paul Sartre"]),
    ("Le livre d'Alice Martin est sur la table.", ["Alice Martin"]),
    (
        "C'est l'idée de Jean Paul Sartre et l'œuvre d'Albert Camus.",
        ["Jean Paul Sartre", "Albert Camus"],
    ),
    ("Je pense qu'Émile Zola avait raison.", ["Émile Zola"]),
    ("La maison d'Honoré de Balzac est à Paris.", ["Honoré de Balzac"]),
    (
        "Lorsqu'Isabelle Martin est arrivée, puisqu'Olivier Dubois l'a dit.",
        ["Isabelle Martin", "Olivier Dubois"],
    ),
    ("D'Alice Martin, je n'ai rien reçu. Qu'Alice Martin vienne !", ["Alice Martin"] * 2),
    (
        "J’ai lu le livre d’Antoine Dupont et l’avis de Claire Dubois.",
        ["Antoine Dupont", "Claire Dubois"],
    ),
    ("Le opere d'Alessandro Manzoni e dell'Umberto Eco.", ["Alessandro Manzoni", "Umberto Eco"]),
    # elided particles that are part of a surname, and Irish ones, glued or not
    (
        "Ho parlato con Giovanni Dell'Acqua e Luca Dall'Olio.",
        ["Giovanni Dell'Acqua", "Luca Dall'Olio"],
    ),
    ("Mario D'Angelo e Gabriele D'Annunzio.", ["Mario D'Angelo", "Gabriele D'Annunzio"]),
    (
        "Conan O'Brien met Mary McAleese and Sean Mac Diarmada.",
        ["Conan O'Brien", "Mary McAleese", "Sean Mac Diarmada"],
    ),
    ("Eoin Ó Broin and Mary Ní Dhomhnaill wrote it.", ["Eoin Ó Broin", "Mary Ní Dhomhnaill"]),
    ("Thanks to Patrick O'Neill and Siobhan McCarthy.", ["Patrick O'Neill", "Siobhan McCarthy"]),
    # a word with O' or Mc right before a name goes with it (it left "O'Jean" in clear text)
    ("Ask O'Jean Paul Sartre or McJean Paul Sartre.", ["O'Jean Paul Sartre", "McJean Paul Sartre"]),
    # ... and the same words in prose and code that hold no name
    ("l'eau, d'accord, dell'anno, qu'il, jusqu'ici, lorsqu'on, nell'ambito, aujourd'hui Jean", []),
    ("C'est l'Histoire de France, l'Europe et l'Amérique du Nord.", []),
    ("L'Académie française, l'Institut Pasteur, L'Oréal Paris, D'Artagnan and l'Alice", []),
    ("the d'Alembert operator and l'Hôpital's rule", []),
    ("Côte d'Ivoire, Valle d'Aosta, Reggio nell'Emilia, Sant'Angelo", []),
    ("Dell'Orto carburettors and the Dall'Ara stadium", []),
    ("O'Reilly Media, McDonald's, MacBook Pro, McAfee Antivirus, Mac Catalyst", []),
    ("the McKinsey Global Institute and the MacArthur Foundation; McDonald Max Heap", []),
    ("Don't Repeat Yourself, Isn't It, Won't Fix, Can't Stop, I'd Rather Not", []),
    ("s = d['key']; print(f'{l!r}'); x = all('Return Value')", []),
]


@pytest.mark.parametrize(("text", "names"), CASES)
def test_name_detector_hits_and_misses(text, names):
    step = PiiStep(email=False, phone=False, ip=False, card=False, names=True)
    expected = text
    for name in names:
        expected = expected.replace(name, "<NAME>", 1)
    assert step.anonymize(text) == expected
    assert step.counts == ({"name": len(names)} if names else {})


def test_an_everyday_given_name_and_a_known_surname_stay_a_name_before_another_word():
    """A match such as "Mark Hammond Windows" reads as a two-word surname; its last word decided
    alone, and the whole match, "Mark Hammond" too, was left as text."""
    step = PiiStep(email=False, phone=False, ip=False, card=False, names=True)
    out = step.anonymize("Author: Mark Hammond Windows extensions")
    assert "Mark" not in out and "Hammond" not in out and step.counts == {"name": 1}


def test_pii_step_replaces_names_only_when_asked_and_counts_them():
    text = "I am Alice Smith (alice.smith@example.com); Will Return; Dan Brown's patch."
    off = PiiStep()
    assert off.anonymize(text) == "I am Alice Smith (<EMAIL>); Will Return; Dan Brown's patch."
    assert off.counts == {"email": 1}
    on = PiiStep(names=True)
    doc = Document("d", text)
    assert on(doc) is None
    assert doc.text == "I am <NAME> (<EMAIL>); Will Return; <NAME>'s patch."
    assert on.counts == {"email": 1, "name": 2}
    assert PiiConfig().names is False  # off by default: the quickstart docs credit authors


def test_trie_regex_matches_exactly_its_words():
    words = ["Ann", "Anna", "Anne", "Al", "Alice", "Bob", "B", "O-b"]
    pattern = re.compile(f"(?:{trie_regex(words)})")
    assert all(pattern.fullmatch(w) for w in words)
    assert not any(pattern.fullmatch(w) for w in ["An", "Annb", "Alic", "Bo", "O-", ""])
    assert re.compile(trie_regex([])).search("anything") is None


def test_lexicon_is_attributed_and_splits_ambiguous_given_names():
    data = json.loads(LEXICON.read_text(encoding="utf-8"))
    assert data["source"].startswith("faker ") and "MIT" in data["source"] + data["license"]
    assert "Daniele Faraglia" in data["license"]
    lex = lexicon()
    assert len(lex["given"]) > 10_000 and len(lex["surnames"]) > 10_000
    assert {"Alice", "Sjoerd", "Gerhard"} <= lex["given"] - lex["common_given"]
    assert {"Will", "May", "Mark", "Bob"} <= lex["given"] & lex["common_given"]
    assert {"Smith", "Brown", "Nowak", "Müller", "García", "Nguyen", "Okafor"} <= lex["surnames"]
    assert "Kowalczyk" not in lex["surnames"]  # yet "Mr. Kowalczyk" is found: surname-like
    word = re.compile(_WORD)  # the detector can match (nearly) every name the lexicon holds
    unmatched = [w for w in lex["given"] | lex["surnames"] if not word.fullmatch(w)]
    assert len(unmatched) < 20 and all("'" in w or "-" in w for w in unmatched)  # "Ng'ang'a"


def test_data_stage_counts_names_in_stats(tmp_path):
    rows = [
        {"text": "User: I am Alice Smith (+1 555-123-4567). What does os.path.join do?"},
        {"text": "User: hi\nAssistant: Hello! Will Return the value of Mark."},
        {"text": "Regards,\nCarol White"},
    ]
    src = tmp_path / "dialogues.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    off = {"language": {"enabled": False}, "dedup": {"exact": False, "fuzzy": False}}
    quality = {k: {"enabled": False} for k in ("gopher_quality", "gopher_repetition", "c4")}
    out = prepare(
        {
            "source": [str(src)],
            "out": str(tmp_path / "data"),
            "workers": 1,
            "split": {"train": 1.0, "val": 0.0, "test": 0.0},
            "quality": {**quality, "fineweb": {"enabled": False}},
            "pii": {"names": True},
            **off,
        }
    )
    assert json.loads((out / "stats.json").read_text())["pii"] == {"phone": 1, "name": 2}
    texts = sorted(r["text"] for r in read_jsonl(out / "train.jsonl.zst"))
    assert texts == [
        "Regards,\n<NAME>",
        "User: I am <NAME> (<PHONE>). What does os.path.join do?",
        "User: hi\nAssistant: Hello! Will Return the value of Mark.",
    ]


def test_pii_without_names_never_compiles_the_lexicons():
    name_patterns.cache_clear()
    step = PiiStep()
    assert step.anonymize("Alice Smith, alice@example.com") == "Alice Smith, <EMAIL>"
    assert name_patterns.cache_info().currsize == 0  # the quickstart pays nothing for names
    assert PiiStep(names=True).anonymize("Alice Smith") == "<NAME>"
    assert name_patterns.cache_info().currsize == 1


def test_removed_stdlib_modules_stay_heading_words_on_a_python_without_them(monkeypatch):
    """distutils left the stdlib in 3.12: the detector must not read "Distutils" as a surname
    there, or its output would depend on the interpreter."""
    import sys

    without = frozenset(m for m in sys.stdlib_module_names if m != "distutils")
    monkeypatch.setattr(sys, "stdlib_module_names", without)
    name_patterns.cache_clear()
    try:
        step = PiiStep(email=False, phone=False, ip=False, card=False, names=True)
        assert step.anonymize("By Greg Ward Distutils") == "By <NAME> Distutils"
    finally:
        monkeypatch.undo()
        name_patterns.cache_clear()
