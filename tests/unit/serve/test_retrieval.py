import json
import multiprocessing
import sqlite3
import sys
import time

import pytest

from lmforge.errors import InputError
from lmforge.serve.retrieval import KnowledgeBase, Passage, augment_messages, chunk_words, fts_query
from lmforge.serve.retrieval_spec import RetrievalSpec, passages_source

DOCS = {
    "cooking.md": "# Bread\nKnead the dough for ten minutes, let it rise, then bake the loaf "
    "at 220 degrees until the crust is brown.",
    "python/json.txt": "json.dumps serializes a Python object to a JSON formatted string; "
    "json.loads parses a JSON document back into Python objects.",
    "space.txt": "The Moon orbits the Earth every 27 days; its gravity drives the tides.",
    "faq.jsonl": json.dumps({"text": "Refunds are issued within 14 days of a returned order."})
    + "\n\n"
    + json.dumps({"text": "Shipping to Canada takes five business days."})
    + "\n",
}


def write_docs(root, docs=DOCS):
    for rel, text in docs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture
def kb(tmp_path):
    write_docs(tmp_path / "docs")
    kb = KnowledgeBase.build(tmp_path / "docs", tmp_path / "kb.db")
    yield kb
    kb.close()


def test_chunks_have_the_requested_size_overlap_and_offsets():
    text = " ".join(f"w{i}" for i in range(10))
    chunks = list(chunk_words(text, passage_words=4, overlap=1))
    assert [c[1] for c in chunks] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert all(text[off : off + len(t)] == t for off, t in chunks)
    assert list(chunk_words("a  b", 4, 1)) == [(0, "a  b")]  # spacing kept
    assert list(chunk_words("   ", 4, 1)) == []


def test_bm25_ranks_the_relevant_document_first(kb):
    assert kb.last_build["added"] == ["cooking.md", "faq.jsonl", "python/json.txt", "space.txt"]
    hits = kb.search("how do I parse a JSON string in Python?", k=3)
    assert hits[0].source == "python/json.txt"
    assert all(isinstance(h, Passage) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].score > 0
    # porter stemming: "baking loaves" finds "bake the loaf"
    assert kb.search("baking bread", k=1)[0].source == "cooking.md"
    # JSONL records are sources of their own, by line
    assert kb.search("refund for a returned order", k=1)[0].source == "faq.jsonl:1"
    assert kb.search("shipping to canada", k=1)[0].source == "faq.jsonl:3"
    assert kb.search("quantum chromodynamics") == []


@pytest.mark.parametrize(
    "query",
    ['"unbalanced', "moon AND", "NOT tides", "text:moon", "moo*", "^moon", "(moon", "a:b:c", "---"],
)
def test_fts_syntax_in_queries_does_not_crash(kb, query):
    hits = kb.search(query, k=2)
    if "moon" in query.lower() or "tides" in query.lower():
        assert hits and hits[0].source == "space.txt"
    assert fts_query('say "hi" OR NOT x') == '"say" OR "hi" OR "not" OR "x"'
    assert fts_query("how is it") == '"how" OR "is" OR "it"'  # only stopwords: kept
    assert fts_query("?!") is None


def test_rebuild_touches_only_the_changed_file(tmp_path, kb):
    docs = tmp_path / "docs"
    before = {r[0]: r[1] for r in kb._conn().execute("SELECT rowid, source FROM passages")}
    (docs / "space.txt").write_text("Mars has two moons, Phobos and Deimos.")
    (docs / "cooking.md").unlink()
    (docs / "new.txt").write_text("Volcanoes erupt molten rock called lava.")
    kb2 = KnowledgeBase.build(docs, tmp_path / "kb.db")
    assert kb2.last_build == {
        "added": ["new.txt"],
        "updated": ["space.txt"],
        "removed": ["cooking.md"],
        "unchanged": ["faq.jsonl", "python/json.txt"],
    }
    after = {r[0]: r[1] for r in kb2._conn().execute("SELECT rowid, source FROM passages")}
    kept = {rowid: src for rowid, src in before.items() if src not in ("space.txt", "cooking.md")}
    assert kept.items() <= after.items()  # untouched files keep their rows (same rowids)
    assert kb2.search("Phobos", k=1)[0].source == "space.txt"
    assert kb2.search("tides") == [] and kb2.search("knead dough") == []
    # a third build with nothing changed re-reads nothing
    assert KnowledgeBase.build(docs, tmp_path / "kb.db").last_build["unchanged"] == sorted(
        ["faq.jsonl", "new.txt", "python/json.txt", "space.txt"]
    )
    # changing the chunking re-indexes everything
    kb4 = KnowledgeBase.build(docs, tmp_path / "kb.db", passage_words=50, overlap=5)
    assert len(kb4.last_build["added"]) == 4
    kb2.close()
    kb4.close()


def test_html_is_indexed_by_its_main_text(tmp_path):
    pytest.importorskip("trafilatura")
    docs = tmp_path / "docs"
    docs.mkdir()
    body = "<p>" + "The lighthouse keeper climbs one hundred steps every evening. " * 3 + "</p>"
    (docs / "page.html").write_text(
        f"<html><head><title>t</title><script>var secretToken = 1;</script></head>"
        f"<body><nav>Home</nav><article>{body}</article></body></html>"
    )
    kb = KnowledgeBase.build(docs, tmp_path / "kb.db")
    hit = kb.search("lighthouse keeper", k=1)[0]
    assert hit.source == "page.html" and "<p>" not in hit.text
    assert kb.search("secretToken") == []


def test_open_and_errors(tmp_path, kb):
    again = KnowledgeBase.open(tmp_path / "kb.db")
    assert again.search("moon tides")[0].source == "space.txt"
    with pytest.raises(InputError, match="does not exist"):
        KnowledgeBase.open(tmp_path / "nope.db")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no"):
        KnowledgeBase.build(empty, tmp_path / "e.db")
    with pytest.raises(InputError, match="overlap"):
        KnowledgeBase.build(tmp_path / "docs", tmp_path / "x.db", passage_words=10, overlap=10)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(InputError, match="not a knowledge base"):
        KnowledgeBase.open(other)


def test_augment_messages_numbers_passages_and_keeps_the_input():
    msgs = [{"role": "user", "content": "When do refunds arrive?"}]
    passages = [Passage("faq.jsonl:1", "Refunds within 14 days.", 2.5)]
    out = augment_messages(msgs, passages)
    assert out[0]["role"] == "system" and out[1:] == msgs
    assert "[1] (faq.jsonl:1)\nRefunds within 14 days." in out[0]["content"]
    assert "cite" in out[0]["content"]
    assert len(msgs) == 1
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    out = augment_messages(with_system, passages)
    assert len(out) == 2 and out[0]["content"].startswith("Be brief.\n\n")
    assert with_system[0]["content"] == "Be brief."
    assert augment_messages(msgs, []) == msgs


def test_kb_augments_with_its_own_search_results(kb):
    msgs = [{"role": "user", "content": "what drives the tides?"}]
    out = kb.augment_messages(msgs, kb.search(msgs[-1]["content"], k=1))
    assert "[1] (space.txt)\nThe Moon orbits" in out[0]["content"] and out[1:] == msgs


def test_search_from_many_threads(kb):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        tops = list(pool.map(lambda q: kb.search(q, k=1)[0].source, ["json loads", "moon"] * 20))
    assert tops == ["python/json.txt", "space.txt"] * 20


def test_a_sqlite_without_fts5_is_a_clear_error():
    from lmforge.serve.retrieval import require_fts5

    class NoFts5:
        def execute(self, sql, *args):
            raise sqlite3.OperationalError("no such module: fts5")

    with pytest.raises(InputError, match=r"lacks the FTS5 extension .*no such module: fts5"):
        require_fts5(NoFts5())


def _build_at(docs, db, start: float) -> int | str:
    """One process's build of `db`, started at `start` (time.time()) with the others."""
    time.sleep(max(0.0, start - time.time()))
    try:
        kb = KnowledgeBase.build(docs, db)
    except Exception as err:  # reported, not raised: the test shows every process's outcome
        return repr(err)
    added = len(kb.last_build["added"])
    kb.close()
    return added


def test_concurrent_builds_of_one_index_wait_for_each_other(tmp_path):
    """Processes building one new index at once: each waits for the others' locks, also while
    switching the new file to WAL, where SQLite answers "database is locked" at once instead of
    waiting (it did under load: two connections with a read lock that both want the write
    lock), so exactly one indexes the documents and the others find nothing left to do."""
    write_docs(tmp_path / "docs")
    processes, rounds = 6, 10
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(processes) as pool:
        for i in range(rounds):  # a new database each round: the race is in creating it
            db, start = tmp_path / f"kb{i}.db", time.time() + 0.05
            reports = pool.starmap(_build_at, [(tmp_path / "docs", db, start)] * processes)
            assert sorted(reports, key=str) == [0] * (processes - 1) + [4], (i, reports)
            assert KnowledgeBase.open(db).passage_count() == 5


def test_a_database_locked_past_the_busy_timeout_is_named_as_locked_not_as_no_database(tmp_path):
    from lmforge.serve.sqlite_conn import ThreadConnections

    db = tmp_path / "kb.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # no WAL yet: switching to it needs this lock
    conns = ThreadConnections(db, ["journal_mode = WAL"], what="a knowledge base",
                              busy_timeout_ms=100)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"kb.db: a knowledge base stayed locked for 100 ms"):
        conns.get()
    assert time.monotonic() - t0 >= 0.1
    holder.execute("COMMIT")
    assert conns.get().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conns.close()
    holder.close()


def words(text: str) -> int:  # a token counter for the layout tests: one token per word
    return len(text.split())


def test_passages_source_keeps_the_user_turn_and_fits_passages_to_the_budget():
    question = "how do I join paths"  # 5 tokens
    long = " ".join(f"w{i}" for i in range(40))
    short = "os.path.join(a, *p) joins"
    src = passages_source(question, [long, short, long], words, 26)
    assert src.startswith(question + "\n[1] w0 w1 ")
    # each passage (with its marker) may use an equal share of what is free; the short one
    # leaves its rest to the last, which fills the budget
    first, second, third = src.split("\n")[1:]
    assert words(first) == (26 - 5) // 3 and second == f"[2] {short}"
    assert words(src) == 26 and words(third) == 26 - 5 - 7 - 4
    assert passages_source(question, [long], words, 100) == f"{question}\n[1] {long}"
    # no room: the passages go, never the user turn, which stays whole even past the budget
    assert passages_source(question, [long, short], words, 5) == question
    assert passages_source(question, [short], words, 3) == question
    # [1]'s share (5 + 3 // 2 = 6 tokens) has no room for a word: [2] goes too, though its
    # share (5 + 3 = 8) would fit "[2] os.path.join(a, *p)"
    assert passages_source(question, [long, "os.path.join(a, *p)"], words, 8) == question
    assert passages_source(question, [], words, 50) == question


def test_a_score_floor_is_written_as_a_format_older_readers_refuse(tmp_path):
    """An lmforge from before the floor reads format 1 only: a floored spec must not look like
    one, or that lmforge would serve the model without its floor. Without a floor the file stays
    format 1 (older readers serve it right); this one reads both, and refuses a future format."""
    plain = RetrievalSpec(passages=2, source_tokens=30)
    floored = RetrievalSpec(passages=2, source_tokens=30, min_score=8.5)
    for spec, fmt in ((plain, 1), (floored, 2)):
        spec.save(tmp_path)
        raw = json.loads((tmp_path / "retrieval.json").read_text())
        assert raw == {"passages": 2, "source_tokens": 30, "min_score": spec.min_score,
                       "format": fmt}  # fmt: skip
        assert RetrievalSpec.load(tmp_path) == spec
    # written by lmforge between the floor and this format: format 1 with a floor, still honoured
    (tmp_path / "retrieval.json").write_text(json.dumps({**raw, "format": 1}))
    assert RetrievalSpec.load(tmp_path) == floored
    (tmp_path / "retrieval.json").write_text(json.dumps({**raw, "format": 3}))
    with pytest.raises(InputError) as err:
        RetrievalSpec.load(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'retrieval.json'}: the model was trained on knowledge-base source format 3; "
        "this lmforge reads formats 1 and 2 (2: with a BM25 score floor): upgrade lmforge, or "
        "retrain the model (stage dialogue with retrieval) with this version"
    )


def test_retrieval_spec_sources_round_trip_and_version(tmp_path, kb):
    spec = RetrievalSpec(passages=2, source_tokens=30)
    found = spec.search(kb, "How does json.dumps serialize objects?")
    assert len(found) <= 2 and found[0].source == "python/json.txt"
    src = spec.source("How does json.dumps serialize objects?", found, words)
    assert src.startswith("How does json.dumps serialize objects?\n[1] json.dumps serializes")
    assert words(src) <= 30
    assert RetrievalSpec.load(tmp_path) is None  # a model trained without passages
    spec.save(tmp_path)
    assert RetrievalSpec.load(tmp_path) == spec
    (tmp_path / "retrieval.json").write_text(json.dumps({"format": 99, "passages": 2,
                                                         "source_tokens": 30}))  # fmt: skip
    with pytest.raises(InputError, match=r"retrieval.json: .* source format 99.*retrain"):
        RetrievalSpec.load(tmp_path)
    # a spec saved before the score floor existed: its model was trained with no floor
    (tmp_path / "retrieval.json").write_text('{"format": 1, "passages": 2, "source_tokens": 30}')
    assert RetrievalSpec.load(tmp_path) == spec and spec.min_score == 0.0
    floored = RetrievalSpec(passages=2, source_tokens=30, min_score=1e9)
    assert floored.search(kb, "How does json.dumps serialize objects?") == []
    for bad in ('{"format": 1, "passages": 2}', "[1]", '{"format": 1, "passages": "x", '
                '"source_tokens": 3}', "{not json", '{"format": 1, "passages": 2, '
                '"source_tokens": 3, "min_score": "high"}', *(
                '{"format": 1, "passages": 2, "source_tokens": 3, "min_score": ' + v + "}"
                for v in ("NaN", "Infinity", "-1", "null"))):  # fmt: skip
        (tmp_path / "retrieval.json").write_text(bad)
        with pytest.raises(InputError, match=r"retrieval.json is not a retrieval spec.*retrain"):
            RetrievalSpec.load(tmp_path)


def test_pii_placeholders_do_not_steer_retrieval(tmp_path):
    """The data stage's `<EMAIL>`, `<NAME>`... are not the user's words: "I am <NAME>" must not
    find a passage about names, and a query of placeholders alone finds nothing."""
    from lmforge.data.pii import PLACEHOLDERS

    write_docs(tmp_path / "docs", {**DOCS, "contact.txt": "Email us your name, phone number, "
                                   "card number and IP address to open a support ticket."})  # fmt: skip
    kb = KnowledgeBase.build(tmp_path / "docs", tmp_path / "kb.db")
    spec = RetrievalSpec(passages=2, source_tokens=60)
    only = " ".join(PLACEHOLDERS.values())
    for q in ("I am <NAME> (<EMAIL>, <PHONE>). How do I parse a JSON string?", f"{only} greetings"):
        plain = q.replace("<NAME>", "").replace("<EMAIL>", "").replace("<PHONE>", "")
        plain = plain.replace("<CARD_NUMBER>", "").replace("<IP_ADDRESS>", "")
        assert [p.source for p in kb.search(q, k=5)] == [p.source for p in kb.search(plain, k=5)]
        assert spec.search(kb, q) == spec.search(kb, plain)
    assert all(p.source != "contact.txt" for p in kb.search(f"{only} greetings", k=5))
    assert fts_query(only) is None and kb.search(only) == [] and spec.search(kb, only) == []
    assert fts_query("<NAME>'s email") == '"email"'  # the user's own "email" stays
    kb.close()


def test_am_is_not_a_search_word(tmp_path):
    """ "I am <NAME> (<EMAIL>). <question>": after the placeholders only "I am" is left of the
    introduction, and "am" must not pull in a passage that merely contains it."""
    write_docs(tmp_path / "docs", {**DOCS, "hours.txt": "We open at 9 am and close at 5 pm."})
    kb = KnowledgeBase.build(tmp_path / "docs", tmp_path / "kb.db")
    assert fts_query("I am <NAME> (<EMAIL>). When do you open?") == '"open"'
    assert kb.search("I am <NAME>. How tall is the Eiffel tower?", k=5) == []
    assert [p.source for p in kb.search("I am <NAME>. When does the Moon orbit?", k=5)] == [
        "space.txt"
    ]
    assert fts_query("I am") == '"i" OR "am"'  # only stopwords: kept, as for any query
    kb.close()


def test_a_possessive_s_is_not_a_search_word(tmp_path):
    """ "<NAME>'s" leaves a lone "s" once the placeholder is dropped; as a search word it found
    every passage with a possessive ("the shop's")."""
    write_docs(tmp_path / "docs", {**DOCS, "shop.txt": "The shop's doors open at nine."})
    kb = KnowledgeBase.build(tmp_path / "docs", tmp_path / "kb.db")
    assert fts_query("What is <NAME>'s tower height?") == '"tower" OR "height"'
    assert kb.search("What is <NAME>'s tower height?", k=5) == []
    assert [p.source for p in kb.search("When do <NAME>'s doors open?", k=5)] == ["shop.txt"]
    assert fts_query("'s") == '"s"'  # only stopwords: kept, as for any query
    kb.close()
