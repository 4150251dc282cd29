"""Upstream project pages on disk (diskcache): process-safe, so workers share it.

A page or a remembered 404 per name; a full or broken disk costs the entry,
never the answer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import diskcache
import orjson

from .model import ProjectPage

log = logging.getLogger("indexguard.cache")

PAGE_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True, slots=True)
class CachedPage:
    """An upstream answer as remembered: a page, or page=None for a 404."""

    page: ProjectPage | None
    fetched_at: float
    etag: str | None = None
    last_modified: str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "page": self.page.to_json() if self.page is not None else None,
            "fetched_at": self.fetched_at, "etag": self.etag,
            "last_modified": self.last_modified,
        })

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedPage:
        data = orjson.loads(raw)
        page = ProjectPage.from_json(data["page"]) if data["page"] is not None else None
        return cls(page, float(data["fetched_at"]), data.get("etag"), data.get("last_modified"))


class PageCache:
    """Upstream pages on disk; diskcache is process-safe, so workers share it."""

    def __init__(self, directory: Path) -> None:
        self._cache = diskcache.Cache(
            str(directory), size_limit=PAGE_CACHE_BYTES,
            eviction_policy="least-recently-stored",
        )

    async def get(self, name: str) -> CachedPage | None:
        try:
            raw = await asyncio.to_thread(self._cache.get, name)
        except (OSError, sqlite3.Error) as exc:
            # An unreadable cache is a miss: the page is fetched again.
            log.warning("page cache read failed", extra={"project": name, "error": str(exc)})
            return None
        if not isinstance(raw, bytes):
            return None
        try:
            return CachedPage.from_bytes(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    async def put(self, name: str, entry: CachedPage) -> None:
        try:
            await asyncio.to_thread(self._cache.set, name, entry.to_bytes())
        except (OSError, sqlite3.Error) as exc:
            # A full disk costs the cache entry, never the answer. SQLite reports
            # it as sqlite3.OperationalError ("database or disk is full").
            log.warning("page cache write failed", extra={"project": name, "error": str(exc)})

    def names(self) -> list[str]:
        return sorted(str(k) for k in self._cache.iterkeys())

    def close(self) -> None:
        self._cache.close()
