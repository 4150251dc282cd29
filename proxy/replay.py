"""ID tokens already exchanged (their jti), one record for all workers, and
with replicas on S3 one record for all replicas.

Workers are processes sharing data_dir, so the record is a small SQLite file
there, as for failed logins. A row lives until its token expires; only tokens
whose signature verified reach it. Blocking: call off the loop. Replicas on
other hosts share only the bucket: there, SharedReplay creates one empty
object per exchanged token with If-None-Match: *, so exactly one replica wins.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .shared_sqlite import connect

if TYPE_CHECKING:
    from .s3_bucket import Bucket

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expires ON seen(expires);
"""
_PRUNE_EVERY = 256
# Expired markers are listed and deleted by at most this many at a time.
_PRUNE_BATCH = 1000


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
        # Unlike the login count, losing a row would let a replay through.
        self._db = connect(self._path, _SCHEMA, "NORMAL")

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


class SharedReplay:
    """The exchanged tokens of every replica, in the bucket.

    One empty object per token, oidc-jti/<expiry>-<sha256(issuer, jti)>, created
    only if absent: a replay on any replica finds it there (412) and is refused.
    The expiry first in the key makes the expired ones a sorted prefix, pruned
    every _PRUNE_EVERY claims by the replica that makes the claim.
    """

    def __init__(self, bucket: Bucket) -> None:
        self._bucket = bucket
        self._claimed = 0

    async def claim(self, issuer: str, jti: str, expires: float) -> bool:
        """True the first time on any replica. Raises ServiceUnavailable."""
        self._claimed += 1
        if self._claimed % _PRUNE_EVERY == 0:
            await self.prune(time.time())
        key = self._bucket.key("oidc-jti", f"{int(expires):012d}-{replay_key(issuer, jti)}")
        return await self._bucket.put(key, b"", if_none_match=True) is not None

    async def prune(self, now: float) -> int:
        """Delete the markers of tokens expired before now; how many went."""
        removed = 0
        prefix = self._bucket.key("oidc-jti", "")
        async for item in self._bucket.list(prefix):
            stamp = item.key[len(prefix):].split("-", 1)[0]
            if not stamp.isdigit() or int(stamp) >= now or removed >= _PRUNE_BATCH:
                break
            await self._bucket.delete(item.key)
            removed += 1
        return removed
