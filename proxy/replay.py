"""ID tokens already exchanged (their jti), one record for all workers.

Workers are processes sharing data_dir, so the record is a small SQLite file
there, as for failed logins. A row lives until its token expires; only tokens
whose signature verified reach it. Blocking: call off the loop.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expires ON seen(expires);
"""
_PRUNE_EVERY = 256


def replay_key(issuer: str, jti: str) -> str:
    return hashlib.sha256(f"{issuer}\0{jti}".encode()).hexdigest()


class ReplayGuard:
    """claim(issuer, jti, expires): True the first time, False for a replay."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._claimed = 0

    def open(self) -> None:
        db = sqlite3.connect(self._path, timeout=5.0, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # Unlike the login count, losing a row would let a replay through.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def claim(self, issuer: str, jti: str, expires: float, now: float | None = None) -> bool:
        """Record the token; False when it was recorded before and has not expired.

        Raises sqlite3.Error (the caller refuses: fail closed).
        """
        now = time.time() if now is None else now
        with self._lock:
            db = self._db
            if db is None:
                raise sqlite3.OperationalError("replay record is closed")
            self._claimed += 1
            if self._claimed % _PRUNE_EVERY == 0:
                db.execute("DELETE FROM seen WHERE expires < ?", (now,))
            # One statement: two workers claiming the same jti at once, one wins.
            # An expired row is taken over (its token can no longer verify anyway).
            cur = db.execute(
                "INSERT INTO seen(key, expires) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE "
                "SET expires = excluded.expires WHERE seen.expires < ?3",
                (replay_key(issuer, jti), expires, now),
            )
            return cur.rowcount == 1
