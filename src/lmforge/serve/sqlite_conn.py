"""One SQLite connection per thread, opened with the same pragmas, closable all at once.

sqlite3 connections must not be used by two threads at a time; the server answers requests on
several threads, so each store (feedback, knowledge base) keeps one connection per thread. A
file that is not a database becomes an InputError naming it; a database another connection has
locked is waited for (up to the busy timeout), also where SQLite itself would not wait.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lmforge.errors import InputError


class ThreadConnections:
    """`get()` returns this thread's connection to `path` (autocommit, sqlite3.Row rows)."""

    def __init__(
        self,
        path: Path,
        pragmas: Sequence[str] = (),
        *,
        what: str,
        busy_timeout_ms: int = 10_000,
        read_only: bool = False,
    ):
        self.path = Path(path)
        self.what = what  # "a feedback store", "a knowledge base": for error messages
        self.busy_timeout_ms = busy_timeout_ms
        self.read_only = read_only  # opened mode=ro: never takes a write lock, never creates
        self.pragmas = [f"busy_timeout = {int(busy_timeout_ms)}", *pragmas]
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []

    def get(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit: each statement outside an explicit BEGIN is its own transaction
            try:
                conn = sqlite3.connect(
                    self.path.resolve().as_uri() + "?mode=ro" if self.read_only else self.path,
                    timeout=self.busy_timeout_ms / 1000,
                    isolation_level=None,
                    check_same_thread=False,  # its own thread uses it; close() may run elsewhere
                    uri=self.read_only,
                )
            except sqlite3.OperationalError as err:  # read-only and missing: nothing to create
                raise InputError(f"{self.path}: cannot open {self.what} ({err})") from None
            conn.row_factory = sqlite3.Row
            try:
                for pragma in self.pragmas:
                    self._set(conn, pragma)
            except sqlite3.DatabaseError as err:
                conn.close()
                if _busy(err):
                    raise InputError(
                        f"{self.path}: {self.what} stayed locked for {self.busy_timeout_ms} ms "
                        f"({err}); is another process holding it?"
                    ) from None
                raise InputError(f"{self.path} is not {self.what} ({err})") from None
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _set(self, conn: sqlite3.Connection, pragma: str) -> None:
        """One pragma, retried while the database is busy, up to the busy timeout.

        SQLite skips the busy handler where waiting could deadlock: two connections that both
        hold a read lock and want the write lock, as when several processes open a new database
        at once and each switches it to WAL (journal_mode needs the exclusive lock). One of them
        gets "database is locked" at once; it lets go of its read lock here and tries again."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        pause = 0.001
        while True:
            try:
                conn.execute(f"PRAGMA {pragma}")
                return
            except sqlite3.OperationalError as err:
                if not _busy(err) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    def __len__(self) -> int:
        return len(self._all)

    def close(self) -> None:
        """Closes every thread's connection (once no thread uses them any more)."""
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def _busy(err: sqlite3.DatabaseError) -> bool:
    """Whether SQLite gave up on a lock (SQLITE_BUSY / SQLITE_LOCKED), not a bad file."""
    return "database is locked" in str(err) or "database table is locked" in str(err)
