"""Knowledge base: documents chunked into passages, indexed in SQLite FTS5, ranked by BM25.

`KnowledgeBase.build(docs_dir, db_path)` reads .txt/.md/.html/.jsonl files (through the data
package's readers; HTML through its trafilatura extraction), cuts each document into passages of
about `passage_words` words overlapping by `overlap` words, and stores them with their source
(path relative to docs_dir, `path:line` for a JSONL record) and character offset in the document
text. A rebuild re-indexes only files whose content hash changed, and drops removed files.

Queries are people's text: FTS5 query syntax in them (quotes, AND/OR/NOT, `col:`, `*`, `^`) must
not be interpreted, so each word is quoted and the words are OR-ed; BM25 then ranks passages that
share more (and rarer) words higher. The PII placeholders the data stage (and the serving safety
filter's redaction) put in text, `<EMAIL>`, `<NAME>`..., are not the user's words: they are left
out of the query, or "I am <NAME>" would search for "name". Training (RetrievalSpec.search) and
serving search through this one query. Which passages it finds is not part of a model's
retrieval.json (which pins the layout; the documents can change too), so dropping placeholders
bumped no format: a model trained before scores the same on sources built either way (measured
in the dialogue-assistant recipe's header).

A retrieval-augmented seq2seq model reads the passages in its source text, laid out as
serve.retrieval_spec says (its retrieval.json).
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from lmforge.errors import InputError
from lmforge.serve.sqlite_conn import ThreadConnections

__all__ = ["KnowledgeBase", "Passage", "augment_messages", "chunk_words", "fts_query"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUFFIXES = (".txt", ".md", ".html", ".htm", ".jsonl")
MAX_QUERY_TERMS = 64
# Dropped from queries (unless nothing else is left): they match most passages, so OR-ing them in
# adds little to BM25 but makes a query scan most of the index (measured: 3.6x slower). "am" too:
# a word of self-introductions ("I am <NAME>"), not of questions, that finds "9 am" in a shop's FAQ.
# "s" too: what "<NAME>'s" leaves once the placeholder is dropped, and any "shop's" in the index.
STOPWORDS = frozenset(
    "a am an and are as at be by can do does for from how i in is it of on or s the to was what "
    "when where which who why with you".split()
)
WORD = re.compile(r"\S+")
TERM = re.compile(r"\w+", re.UNICODE)
CITE_INSTRUCTION = (
    "Answer using the numbered passages below when they are relevant, and cite them as [1], [2]. "
    "If they do not contain the answer, say so."
)


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: where it comes from, its text, and its BM25 score (higher =
    more relevant)."""

    source: str
    text: str
    score: float
    offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "text": self.text, "score": self.score}


def chunk_words(text: str, passage_words: int, overlap: int) -> Iterator[tuple[int, str]]:
    """(character offset, passage text): windows of passage_words words, each starting
    passage_words - overlap words after the previous one; the original spacing is kept."""
    spans = [m.span() for m in WORD.finditer(text)]
    step = passage_words - overlap
    for first in range(0, max(len(spans) - overlap, 1), step):
        window = spans[first : first + passage_words]
        if not window:
            break
        yield window[0][0], text[window[0][0] : window[-1][1]]


@functools.cache
def _placeholders() -> re.Pattern[str]:
    """data.pii's placeholders (imported on first use: lmforge.data is slow to import)."""
    from lmforge.data.pii import PLACEHOLDERS

    return re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))


def fts_query(text: str) -> str | None:
    """The user's words as a safe FTS5 query ("w1" OR "w2" ...), or None when it has no words;
    PII placeholders are not words of the user's (module docstring)."""
    text = _placeholders().sub(" ", text)
    words = list(dict.fromkeys(t.lower() for t in TERM.findall(text)))
    terms = ([w for w in words if w not in STOPWORDS] or words)[:MAX_QUERY_TERMS]
    return " OR ".join(f'"{t}"' for t in terms) if terms else None


def require_fts5(conn: sqlite3.Connection) -> None:
    """A clear error when this Python's SQLite was built without FTS5."""
    try:
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp._fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp._fts5_probe")
    except sqlite3.OperationalError as err:
        raise InputError(
            f"this Python's SQLite {sqlite3.sqlite_version} lacks the FTS5 extension ({err}), "
            "which the knowledge base needs; use a Python whose sqlite3 has FTS5 (python.org and "
            "most distribution builds do)"
        ) from None


def _documents(path: Path, rel: str) -> Iterator[tuple[str, str]]:
    """(source, text) of every document in one file, via the data package's readers."""
    from lmforge.data.document import Reject
    from lmforge.data.readers import read_jsonl, read_text_file

    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        from lmforge.data.web import extract_html, read_html_file

        items = read_html_file(path, rel)
    elif suffix == ".jsonl":
        items = read_jsonl(path, rel)
    else:
        items = read_text_file(path, rel)
    for item in items:
        if isinstance(item, Reject):
            log.warning("knowledge base: skipping %s: %s", item.where, item.detail)
            continue
        text = item.text
        if suffix in (".html", ".htm"):
            try:
                text = extract_html(text)
            except ImportError as err:
                raise ImportError(
                    f"indexing HTML ({path}) needs trafilatura: pip install 'lmforge[web]'"
                ) from err
            if text is None:
                log.warning("knowledge base: skipping %s: no main text in the page", path)
                continue
        source = rel
        if suffix == ".jsonl":  # the reader's id is "<path>:<line>" unless the record has one
            prefix = f"{path}:"
            source = f"{rel}:{item.id[len(prefix) :]}" if item.id.startswith(prefix) else item.id
        yield source, text


class KnowledgeBase:
    """An FTS5 index of passages; search() is safe to call from many threads."""

    def __init__(self, db_path: Path | str):
        self.db_path = Path(db_path)
        # Searches never wait (WAL readers see the last commit); a build waits for another
        # process's build of the same index (another server on the same documents) instead of
        # failing with "database is locked", then finds nothing left to do.
        self._connections = ThreadConnections(
            self.db_path, ["journal_mode = WAL"], what="a knowledge base", busy_timeout_ms=600_000
        )
        self.last_build: dict[str, list[str]] = {}

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    # ---------------------------------------------------------------- building

    @classmethod
    def open(cls, db_path: Path | str) -> KnowledgeBase:
        """Opens a built knowledge base (InputError when there is none at db_path)."""
        db_path = Path(db_path)
        if not db_path.is_file():
            raise InputError(
                f"knowledge base {db_path} does not exist; build it with "
                "KnowledgeBase.build(DOCS_DIR, DB) (lmforge serve --kb DIR builds it)"
            )
        kb = cls(db_path)
        conn = kb._conn()
        require_fts5(conn)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError:
            row = None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise InputError(f"{db_path} is not a knowledge base of this lmforge; rebuild it")
        return kb

    @classmethod
    def build(
        cls,
        docs_dir: Path | str,
        db_path: Path | str,
        *,
        passage_words: int = 120,
        overlap: int = 30,
    ) -> KnowledgeBase:
        """Indexes docs_dir into db_path, re-reading only files whose content changed since the
        last build (all of them when the chunking settings changed). `last_build` says which
        files were added, updated, removed and unchanged."""
        docs_dir = Path(docs_dir)
        if not docs_dir.is_dir():
            raise InputError(f"knowledge base documents {docs_dir} is not a directory")
        if not 0 <= overlap < passage_words:
            raise InputError(
                f"passage_words={passage_words}, overlap={overlap}: need 0 <= overlap < words"
            )
        db_path = Path(db_path)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        kb = cls(db_path)
        conn = kb._conn()
        require_fts5(conn)
        settings = f"{passage_words}/{overlap}"
        files = {
            p.relative_to(docs_dir).as_posix(): p
            for p in sorted(docs_dir.rglob("*"))
            if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")
        }
        if not files:
            raise InputError(f"{docs_dir} holds no {', '.join(SUFFIXES)} files to index")
        conn.execute("BEGIN IMMEDIATE")
        try:
            kb._create_schema(conn, settings)
            known = dict(conn.execute("SELECT path, hash FROM files").fetchall())
            report: dict[str, list[str]] = {"added": [], "updated": [], "removed": []}
            report["unchanged"] = []
            for rel in sorted(set(known) - set(files)):
                kb._drop_file(conn, rel)
                report["removed"].append(rel)
            for rel, path in files.items():
                digest = xxhash.xxh3_128(path.read_bytes()).hexdigest()
                if known.get(rel) == digest:
                    report["unchanged"].append(rel)
                    continue
                if rel in known:
                    kb._drop_file(conn, rel)
                n = kb._index_file(conn, path, rel, passage_words, overlap)
                conn.execute("INSERT INTO files VALUES (?, ?, ?)", (rel, digest, n))
                report["updated" if rel in known else "added"].append(rel)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        kb.last_build = report
        log.info(
            "knowledge base %s: %d passages; %s",
            db_path,
            kb.passage_count(),
            ", ".join(f"{len(v)} {k}" for k, v in report.items()),
        )
        return kb

    def _create_schema(self, conn: sqlite3.Connection, settings: str) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if rows and (
            rows.get("schema_version") != str(SCHEMA_VERSION) or rows.get("chunking") != settings
        ):
            conn.execute("DROP TABLE IF EXISTS files")
            conn.execute("DROP TABLE IF EXISTS passages")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, hash TEXT, passages INT)"
        )
        conn.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS passages USING fts5("
            "text, source UNINDEXED, offset UNINDEXED, tokenize = 'porter unicode61')"
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('chunking', ?)", (settings,))

    def _drop_file(self, conn: sqlite3.Connection, rel: str) -> None:
        # a JSONL file's records are "<rel>:<line>": match both forms
        conn.execute(
            "DELETE FROM passages WHERE source = ? OR substr(source, 1, ?) = ?",
            (rel, len(rel) + 1, f"{rel}:"),
        )
        conn.execute("DELETE FROM files WHERE path = ?", (rel,))

    def _index_file(
        self, conn: sqlite3.Connection, path: Path, rel: str, passage_words: int, overlap: int
    ) -> int:
        rows = [
            (text, source, offset)
            for source, doc in _documents(path, rel)
            for offset, text in chunk_words(doc, passage_words, overlap)
        ]
        conn.executemany("INSERT INTO passages (text, source, offset) VALUES (?, ?, ?)", rows)
        return len(rows)

    # ---------------------------------------------------------------- querying

    def passage_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def search(self, query: str, k: int = 3, min_score: float = 0.0) -> list[Passage]:
        """The k passages that best match the query's words (BM25), best first, leaving out
        those scoring below min_score: BM25 ranks whatever shares a word with the query, so
        small talk ("hi, how are you?") gets unrelated passages unless a floor drops them."""
        match = fts_query(query)
        if match is None or k <= 0:
            return []
        rows = self._conn().execute(
            "SELECT source, text, offset, bm25(passages) AS rank FROM passages "
            "WHERE passages MATCH ? ORDER BY rank LIMIT ?",
            (match, k),
        )
        # FTS5's bm25() is negated so that ascending order is best first; report it positive
        found = [Passage(r["source"], r["text"], -r["rank"], r["offset"]) for r in rows]
        return [p for p in found if p.score >= min_score]

    def augment_messages(
        self,
        messages: Sequence[dict[str, Any]],
        passages: Sequence[Passage],
        instruction: str = CITE_INSTRUCTION,
    ) -> list[dict[str, Any]]:
        """The module's augment_messages, reachable from a knowledge base the server holds."""
        return augment_messages(messages, passages, instruction)

    def close(self) -> None:
        self._connections.close()


def augment_messages(
    messages: Sequence[dict[str, Any]],
    passages: Sequence[Passage],
    instruction: str = CITE_INSTRUCTION,
) -> list[dict[str, Any]]:
    """The chat with the passages put in a system message (numbered, with their sources) and
    an instruction to cite them; an existing leading system message keeps its text first.
    The input list is not modified; with no passages it is returned as a copy."""
    out = [dict(m) for m in messages]
    if not passages:
        return out
    numbered = "\n\n".join(f"[{i}] ({p.source})\n{p.text}" for i, p in enumerate(passages, 1))
    block = f"{instruction}\n\n{numbered}"
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out
