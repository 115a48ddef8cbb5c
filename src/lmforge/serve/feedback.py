"""The feedback store: every served response, and the ratings and side-by-side choices people give.

One SQLite file in WAL mode (readers never block the writer; a committed row survives the process
being killed), a busy timeout instead of "database is locked" errors when several threads or
worker processes write, and one connection per thread (sqlite3 connections must not be shared
across threads). The schema is versioned in the `meta` table so a later lmforge can migrate it
and an older one refuses a newer file instead of misreading it.

Ratings are thumbs (-1 / +1) or stars (1..5); both are kept as given and compared on one scale,
`stars` (thumbs down = 1, thumbs up = 5), which is what the export's --min-rating means.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import InputError
from lmforge.serve.sqlite_conn import ThreadConnections

__all__ = ["SCHEMA_VERSION", "FeedbackStore"]

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    messages TEXT,              -- JSON chat messages the prompt was rendered from, or NULL
    text TEXT NOT NULL,
    params TEXT NOT NULL,       -- JSON sampling parameters
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    response_id TEXT NOT NULL REFERENCES responses(id),
    rating INTEGER NOT NULL,
    scale TEXT NOT NULL CHECK (scale IN ('thumbs', 'stars')),
    stars REAL NOT NULL,        -- the rating on the 1..5 scale
    comment TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS ratings_response ON ratings(response_id);
CREATE TABLE IF NOT EXISTS choices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chosen_id TEXT NOT NULL REFERENCES responses(id),
    rejected_id TEXT NOT NULL REFERENCES responses(id),
    prompt TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""
Scale = Literal["thumbs", "stars"]


def _to_json(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=list, ensure_ascii=False)


def _stars(rating: int, scale: Scale | None) -> tuple[Scale, float]:
    """(scale, rating on 1..5). Without a scale, -1 and 1 are thumbs and 2..5 are stars."""
    if isinstance(rating, bool) or not isinstance(rating, int):
        raise InputError(f"rating must be an integer (-1 or 1, or 1..5 stars), got {rating!r}")
    if scale is None:
        scale = "thumbs" if rating in (-1, 1) else "stars"
    if scale == "thumbs" and rating in (-1, 1):
        return scale, 5.0 if rating == 1 else 1.0
    if scale == "stars" and 1 <= rating <= 5:
        return scale, float(rating)
    raise InputError(f"rating {rating} is not valid on the {scale} scale: use -1 or 1, or 1..5")


class FeedbackStore:
    """Thread-safe access to one feedback database (created on first use).

    read_only=True opens an existing store for reading (the export): no schema writes, no write
    lock, so it never waits on (or delays) a server that is writing; writes then fail.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout_ms: int = 10_000,
        read_only: bool = False,
    ):
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        pragmas = ["query_only = ON"]
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pragmas = ["journal_mode = WAL", f"synchronous = {synchronous}", "foreign_keys = ON"]
        self._connections = ThreadConnections(
            self.path,
            pragmas,
            what="a feedback store",
            busy_timeout_ms=busy_timeout_ms,
            read_only=read_only,
        )
        if not read_only:
            self._init_schema()
        self._check_version()

    def _conn(self) -> sqlite3.Connection:
        return self._connections.get()

    def _write(self, sql: str, args: Sequence[Any]) -> int:
        conn = self._conn()
        try:
            cur = conn.execute(sql, args)
        except sqlite3.IntegrityError as err:
            raise InputError(f"{self.path}: {err}") from None
        return int(cur.lastrowid or 0)

    def _init_schema(self) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA.split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    conn.execute(statement)
        except sqlite3.DatabaseError as err:
            conn.execute("ROLLBACK")
            raise InputError(f"{self.path} is not a feedback store ({err})") from None
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        conn.execute("COMMIT")

    def _check_version(self) -> None:
        try:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'")
            version = row.fetchone()
        except sqlite3.DatabaseError as err:
            raise InputError(f"{self.path} is not a feedback store ({err})") from None
        if version is None:
            raise InputError(f"{self.path} is not a feedback store (no schema_version)")
        if int(version[0]) > SCHEMA_VERSION:
            raise InputError(
                f"{self.path} has feedback schema version {version[0]}, newer than this lmforge "
                f"reads ({SCHEMA_VERSION}); upgrade lmforge"
            )

    def close(self) -> None:
        """Closes every thread's connection (call once no thread uses the store any more)."""
        self._connections.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writes

    def record_response(
        self,
        response_id: str,
        model: str,
        prompt: str,
        messages: list[Mapping[str, Any]] | None,
        text: str,
        params: Any = None,
    ) -> None:
        """Stores one served response (one row per choice) so it can be rated later."""
        self._write(
            "INSERT INTO responses (id, model, prompt, messages, text, params) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                response_id,
                model,
                prompt,
                None if messages is None else _to_json(list(messages)),
                text,
                _to_json(params if params is not None else {}),
            ),
        )

    def _require(self, *response_ids: str) -> None:
        conn = self._conn()
        for rid in response_ids:
            if conn.execute("SELECT 1 FROM responses WHERE id = ?", (rid,)).fetchone() is None:
                raise InputError(f"unknown response id {rid!r} (not in {self.path})")

    def add_rating(
        self, response_id: str, rating: int, comment: str | None = None, scale: Scale | None = None
    ) -> int:
        """Rates a response: thumbs (-1 / 1) or stars (1..5; pass scale="stars" for 1 star).
        Returns the rating's id."""
        scale, stars = _stars(rating, scale)
        self._require(response_id)
        return self._write(
            "INSERT INTO ratings (response_id, rating, scale, stars, comment) VALUES (?,?,?,?,?)",
            (response_id, rating, scale, stars, comment),
        )

    def add_choice(self, chosen_id: str, rejected_id: str, prompt: str | None = None) -> int:
        """Records a side-by-side choice: chosen_id was preferred over rejected_id."""
        if chosen_id == rejected_id:
            raise InputError(f"chosen and rejected are the same response {chosen_id!r}")
        self._require(chosen_id, rejected_id)
        return self._write(
            "INSERT INTO choices (chosen_id, rejected_id, prompt) VALUES (?, ?, ?)",
            (chosen_id, rejected_id, prompt),
        )

    # ---------------------------------------------------------------- reads

    def counts(self) -> dict[str, int]:
        conn = self._conn()
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("responses", "ratings", "choices")
        }

    def response(self, response_id: str) -> dict[str, Any]:
        row = self._conn().execute("SELECT * FROM responses WHERE id = ?", (response_id,))
        found = row.fetchone()
        if found is None:
            raise InputError(f"unknown response id {response_id!r} (not in {self.path})")
        return _response_dict(found)

    def iter_rated(self, min_stars: float | None = None) -> Iterator[dict[str, Any]]:
        """Rated responses with their mean rating (`stars`, 1..5) and rating count, oldest first;
        only those whose mean is at least min_stars when given."""
        sql = (
            "SELECT r.*, AVG(g.stars) AS stars, COUNT(g.id) AS n_ratings FROM responses r "
            "JOIN ratings g ON g.response_id = r.id GROUP BY r.id"
        )
        args: tuple[Any, ...] = ()
        if min_stars is not None:
            sql += " HAVING AVG(g.stars) >= ?"
            args = (min_stars,)
        for row in self._conn().execute(sql + " ORDER BY MIN(g.id)", args):
            yield _response_dict(row) | {"stars": row["stars"], "n_ratings": row["n_ratings"]}

    def iter_choices(self) -> Iterator[dict[str, Any]]:
        """Side-by-side choices, oldest first: the chosen and rejected responses in full (one
        query, both responses joined in)."""
        both = ", ".join(f"{a}.{col} AS {a}_{col}" for a in ("a", "b") for col in RESPONSE_COLUMNS)
        sql = (
            f"SELECT c.id, c.prompt, c.created_at, {both} FROM choices c "
            "JOIN responses a ON a.id = c.chosen_id JOIN responses b ON b.id = c.rejected_id "
            "ORDER BY c.id"
        )
        for row in self._conn().execute(sql):
            yield {
                "id": row["id"],
                "prompt": row["prompt"],
                "created_at": row["created_at"],
                "chosen": _response_dict(row, "a_"),
                "rejected": _response_dict(row, "b_"),
            }


RESPONSE_COLUMNS = ("id", "model", "prompt", "messages", "text", "params", "created_at")


def _response_dict(row: sqlite3.Row, prefix: str = "") -> dict[str, Any]:
    """A responses row (its columns under prefix, as iter_choices' join names them) as a dict."""
    out = {col: row[prefix + col] for col in RESPONSE_COLUMNS}
    out["messages"] = None if out["messages"] is None else json.loads(out["messages"])
    out["params"] = json.loads(out["params"])
    return out
