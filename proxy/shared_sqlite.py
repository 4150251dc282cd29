"""A small SQLite file that the worker processes of one host share.

The failed-login count (login_limit.py) and the exchanged ID tokens
(replay.py) each keep one connection, used from executor threads under a lock;
WAL lets the other workers read and write the same file meanwhile.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal


def connect(path: Path, schema: str, synchronous: Literal["OFF", "NORMAL"]) -> sqlite3.Connection:
    """Open (creating it and its schema) with WAL. Blocking; raises sqlite3.Error.

    synchronous: OFF where losing the last rows to a power cut is harmless,
    NORMAL where a lost row would let something through."""
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.executescript(schema)
    except sqlite3.Error:
        db.close()
        raise
    return db
