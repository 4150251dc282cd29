"""Failed logins per (client, username), one count for all workers.

Workers are separate processes sharing data_dir, so the count lives in a small
SQLite file there: one row per key, a fixed window. Keys are hashed (a
username field sometimes holds a pasted secret). Blocking: call off the loop.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from .shared_sqlite import connect

log = logging.getLogger("indexguard.auth")

# Failed attempts allowed per (client, username) in a window before 429s.
MAX_FAILURES = 20
FAILURE_WINDOW = 60.0
# Rows kept at most; an attacker rotating usernames or addresses cannot grow the file past it.
MAX_KEYS = 100_000
_PRUNE_EVERY = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    since REAL NOT NULL,
    count INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS failures_since ON failures(since);
"""
# One statement, so two workers counting the same key at once both count.
# SET expressions all read the row as it was before the update.
_COUNT = """
INSERT INTO failures(key, since, count) VALUES (?1, ?2, 1)
ON CONFLICT(key) DO UPDATE SET
    count = CASE WHEN since <= ?3 THEN 1 ELSE count + 1 END,
    since = CASE WHEN since <= ?3 THEN excluded.since ELSE since END
RETURNING count
"""


def failure_key(client: str, username: str) -> str:
    return hashlib.sha256(f"{client}\0{username}".encode()).hexdigest()[:32]


class FailureLimit:
    """Counts failures; says when a (client, username) is over MAX_FAILURES in its window."""

    def __init__(self, path: Path, limit: int = MAX_FAILURES,
                 window: float = FAILURE_WINDOW) -> None:
        self._path = path
        self.limit = limit
        self.window = window
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from executor threads
        self._counted = 0

    def open(self) -> None:
        # Losing the last failures to a power cut only forgives them early.
        self._db = connect(self._path, _SCHEMA, "OFF")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def fail(self, client: str, username: str, now: float | None = None) -> bool:
        """Count one failure; True when the key is now over the limit.

        Raises sqlite3.Error (the caller fails open: credentials are still checked).
        """
        now = time.time() if now is None else now
        cutoff = now - self.window
        with self._lock:
            db = self._db
            if db is None:
                return False
            row = db.execute(_COUNT, (failure_key(client, username), now, cutoff)).fetchone()
            self._counted += 1
            if self._counted % _PRUNE_EVERY == 0:
                self._prune(db, cutoff)
        return row is not None and int(row[0]) > self.limit

    @staticmethod
    def _prune(db: sqlite3.Connection, cutoff: float) -> None:
        db.execute("DELETE FROM failures WHERE since <= ?", (cutoff,))
        db.execute(
            "DELETE FROM failures WHERE key IN (SELECT key FROM failures ORDER BY since DESC"
            " LIMIT -1 OFFSET ?)", (MAX_KEYS,),
        )
