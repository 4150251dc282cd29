"""Upstream caches on disk: project pages (diskcache) and artifacts (content-addressed).

Artifacts live at files/<sha256[:2]>/<sha256>: the name is the verified hash, so
a file is committed only after its bytes match the upstream page, and nothing
unverified can ever be served from here. One download per hash at a time
(single flight); readers tail the growing temp file, and the last byte is held
back until the hash is checked, so a tampered file never reaches a client whole.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiofiles
import aiohttp
import diskcache
import orjson

from .errors import ProxyError, UpstreamUnavailable
from .fsutil import commit, temp_path
from .metrics import Metrics
from .model import ProjectPage

log = logging.getLogger("indexguard.cache")

CHUNK = 256 * 1024
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
        raw = await asyncio.to_thread(self._cache.get, name)
        if not isinstance(raw, bytes):
            return None
        try:
            return CachedPage.from_bytes(raw)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    async def put(self, name: str, entry: CachedPage) -> None:
        try:
            await asyncio.to_thread(self._cache.set, name, entry.to_bytes())
        except OSError as exc:
            # A full disk costs the cache entry, never the answer.
            log.warning("page cache write failed", extra={"project": name, "error": str(exc)})

    def names(self) -> list[str]:
        return sorted(str(k) for k in self._cache.iterkeys())

    def close(self) -> None:
        self._cache.close()


class Download:
    """One upstream file transfer into a temp file, shared by every waiting client."""

    def __init__(self, sha256: str, tmp: Path, size_hint: int | None) -> None:
        self.sha256 = sha256
        self.tmp = tmp
        self.total = size_hint
        self.written = 0
        self.finished = False
        self.error: ProxyError | None = None
        self.final: Path | None = None
        self.started = asyncio.Event()
        self._changed = asyncio.Event()

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _open(self) -> Any:
        for path in (self.final, self.tmp, self.final):
            if path is None:
                continue
            try:
                return await aiofiles.open(path, "rb")
            except FileNotFoundError:
                continue
        raise self.error or UpstreamUnavailable("Upstream download vanished")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive. Raises the download's error, if any."""
        await self.started.wait()
        if self.error is not None:
            raise self.error
        fh = await self._open()
        try:
            pos = 0
            while True:
                changed = self._changed
                if self.error is not None:
                    raise self.error
                # Hold the last byte back until the hash is verified.
                limit = self.written if self.finished else self.written - 1
                if pos < limit:
                    data = await fh.read(min(CHUNK, limit - pos))
                    if not data:
                        raise UpstreamUnavailable("Upstream download was cut short")
                    pos += len(data)
                    yield data
                    continue
                if self.finished:
                    return
                await changed.wait()
        finally:
            await fh.close()


class ArtifactCache:
    def __init__(
        self, root: Path, tmp_dir: Path, max_bytes: int, metrics: Metrics,
    ) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        """Scan the cache (oldest first) to seed the LRU. Blocking: call at start."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in os.scandir(self.root):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if entry.is_file() and not entry.name.startswith("."):
                        st = entry.stat()
                        found.append((st.st_mtime, entry.name, st.st_size))
        for _mtime, sha, size in sorted(found):
            self._lru[sha] = size
            self._bytes += size
        self._publish()

    def _publish(self) -> None:
        self._metrics.cache_bytes.set(self._bytes)
        self._metrics.cache_entries.set(len(self._lru))

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def lookup(self, sha256: str) -> Path | None:
        """The committed file for a hash, or None. Marks it recently used."""
        path = self.path_for(sha256)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            if sha256 in self._lru:
                self._bytes -= self._lru.pop(sha256)
                self._publish()
            return None
        if sha256 in self._lru:
            self._lru.move_to_end(sha256)
        else:  # committed by another worker process
            self._lru[sha256] = size
            self._bytes += size
            self._publish()
        return path

    def inflight(self, sha256: str) -> Download | None:
        return self._inflight.get(sha256)

    def download(
        self, sha256: str, url: str, size_hint: int | None,
        opener: Callable[[str], Any],
    ) -> Download:
        """Start (or join) the single download of url, expected to hash to sha256."""
        current = self._inflight.get(sha256)
        if current is not None:
            return current
        dl = Download(sha256, temp_path(self.tmp_dir, ".part"), size_hint)
        self._inflight[sha256] = dl
        task = asyncio.create_task(self._run(dl, url, opener))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def _run(self, dl: Download, url: str, opener: Callable[[str], Any]) -> None:
        fh: IO[bytes] | None = None
        committed = False
        try:
            # Unbuffered: readers tail this file through their own descriptors,
            # so every byte counted in dl.written must already be in the kernel.
            fh = await asyncio.to_thread(open, dl.tmp, "wb", 0)
            hasher = hashlib.sha256()
            async with opener(url) as resp:
                if resp.content_length is not None:
                    dl.total = resp.content_length
                dl.started.set()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await asyncio.to_thread(_write_and_hash, fh, hasher, chunk)
                    dl.written += len(chunk)
                    dl.notify()
            await asyncio.to_thread(_fsync_close, fh)
            fh = None
            if dl.total is not None and dl.written != dl.total:
                raise UpstreamUnavailable(
                    f"Upstream sent {dl.written} bytes, expected {dl.total}"
                )
            if hasher.hexdigest() != dl.sha256:
                self._metrics.hash_mismatches.inc()
                log.error("hash mismatch", extra={"url": url, "expected": dl.sha256,
                                                  "got": hasher.hexdigest()})
                raise UpstreamUnavailable(
                    "Upstream file does not match the sha256 its page declared; refused"
                )
            final = self.path_for(dl.sha256)
            await asyncio.to_thread(commit, dl.tmp, final)
            committed = True
            dl.final = final
            self._admit(dl.sha256, dl.written)
        except ProxyError as exc:
            dl.error = exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            dl.error = UpstreamUnavailable(f"Upstream file transfer failed: {type(exc).__name__}")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and dl.written:
                log.warning("cache disk full; file not cached", extra={"url": url})
            dl.error = UpstreamUnavailable(f"Caching the upstream file failed: {exc.strerror}")
        finally:
            if fh is not None:
                await asyncio.to_thread(fh.close)
            dl.finished = True
            dl.started.set()
            dl.notify()
            self._inflight.pop(dl.sha256, None)
            if not committed:
                await asyncio.to_thread(dl.tmp.unlink, True)

    def _admit(self, sha256: str, size: int) -> None:
        if sha256 not in self._lru:
            self._bytes += size
        self._lru[sha256] = size
        self._lru.move_to_end(sha256)
        victims: list[Path] = []
        while self._bytes > self.max_bytes and len(self._lru) > 1:
            old, old_size = self._lru.popitem(last=False)
            self._bytes -= old_size
            victims.append(self.path_for(old))
            self._metrics.cache_evictions.inc()
        self._publish()
        if victims:
            # Readers that already opened a victim keep their descriptor (POSIX).
            task = asyncio.create_task(asyncio.to_thread(_unlink_all, victims))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Let running downloads finish (graceful shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _write_and_hash(fh: IO[bytes], hasher: Any, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        written = fh.write(view)
        view = view[written:]
    hasher.update(chunk)


def _fsync_close(fh: IO[bytes]) -> None:
    try:
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)

