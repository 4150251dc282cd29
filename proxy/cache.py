"""Upstream caches on disk: project pages (diskcache) and artifacts (content-addressed).

Artifacts live at files/<sha256[:2]>/<sha256>: the name is the verified hash, so
a file is committed only after its bytes match the upstream page, and nothing
unverified can ever be served from here. One download per hash at a time
(single flight); readers tail the growing temp file, and the last byte is held
back until the hash is checked, so a tampered file never reaches a client whole.

When the cache disk fails mid-transfer (full, most likely), the file is still
served but not cached: what reached the temp file stays readable there, and the
rest passes through a small in-memory window that moves at the pace of the
slowest reader (see SPILL_BYTES), so memory stays bounded for any file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
from collections import OrderedDict, deque
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
# Once the cache disk fails, a transfer keeps at most this much of the file in
# memory for its readers and waits for the slowest one before reading more from
# upstream. Per transfer; transfers are capped by the upstream connection limit.
SPILL_BYTES = 4 * 2**20
# How long a spilling transfer waits for a reader that stopped reading before it
# drops that reader (its client sees a cut connection) so the others go on.
LAGGARD_GRACE = 30.0
# How long a served-but-uncached temp file waits for its late readers to open it.
OPENER_GRACE = 10.0


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


class _Reader:
    """One client's position in a Download."""

    __slots__ = ("dropped", "opened", "pos")

    def __init__(self) -> None:
        self.pos = 0
        self.dropped = False
        self.opened = False


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
        # None while every byte goes to the temp file. Once the disk fails: how
        # many bytes made it there; the rest is in _spill, (offset, bytes) oldest
        # first, and the file will not be cached.
        self.on_disk: int | None = None
        self._spill: deque[tuple[int, bytes]] = deque()
        self._spill_bytes = 0
        self._readers: set[_Reader] = set()
        self._progress = asyncio.Event()

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    @property
    def joinable(self) -> bool:
        """False once bytes a new reader would need are gone (spilled, then dropped)."""
        if self.on_disk is None:
            return True
        first = self._spill[0][0] if self._spill else self.written
        return first == self.on_disk

    async def _open(self) -> Any:
        for path in (self.final, self.tmp, self.final):
            if path is None:
                continue
            try:
                return await aiofiles.open(path, "rb")
            except FileNotFoundError:
                continue
        raise self.error or UpstreamUnavailable("Upstream download vanished")

    def _from_spill(self, pos: int, limit: int) -> bytes | None:
        for offset, data in self._spill:
            if offset <= pos < offset + len(data):
                return data[pos - offset : min(len(data), limit - offset)]
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive. Raises the download's error, if any."""
        # Registered before the first await: the writer never drops spilled
        # bytes that a client which has already joined still needs.
        reader = _Reader()
        self._readers.add(reader)
        fh: Any = None
        try:
            await self.started.wait()
            if self.error is not None:
                raise self.error
            while True:
                changed = self._changed
                if self.error is not None:
                    raise self.error
                if reader.dropped:
                    raise UpstreamUnavailable(
                        "Client too slow for an uncached transfer (the proxy's disk is full)"
                    )
                # Hold the last byte back until the hash is verified.
                limit = self.written if self.finished else self.written - 1
                if reader.pos < limit:
                    on_disk = self.on_disk
                    if on_disk is None or reader.pos < on_disk:
                        end = limit if on_disk is None else min(limit, on_disk)
                        if fh is None:
                            fh = await self._open()
                            reader.opened = True
                            self._progress.set()
                        data = await fh.read(min(CHUNK, end - reader.pos))
                        if not data:
                            raise UpstreamUnavailable("Upstream download was cut short")
                    else:
                        spilled = self._from_spill(reader.pos, limit)
                        if spilled is None:
                            raise UpstreamUnavailable("Uncached transfer moved on without us")
                        data = spilled
                    reader.pos += len(data)
                    self._progress.set()
                    yield data
                    continue
                if self.finished:
                    return
                await changed.wait()
        finally:
            self._readers.discard(reader)
            self._progress.set()
            if fh is not None:
                await fh.close()

    async def wait_for_openers(self, timeout: float) -> None:
        """Until every reader that will read the temp file has opened it (or left).

        Called before an uncommitted temp file is removed: a reader's own
        descriptor keeps the bytes readable after the unlink, a name does not.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.on_disk != 0 and any(not r.opened for r in self._readers):
            self._progress.clear()
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=min(left, 1.0))

    def spill(self, chunk: bytes) -> None:
        """Keep a chunk in memory for the readers (the disk has failed)."""
        self._spill.append((self.written, chunk))
        self._spill_bytes += len(chunk)

    def _trim(self) -> None:
        """Forget spilled bytes every reader has passed, while over SPILL_BYTES."""
        low = min((r.pos for r in self._readers), default=None)
        while self._spill and self._spill_bytes > SPILL_BYTES:
            offset, data = self._spill[0]
            if low is not None and offset + len(data) > low:
                return
            self._spill.popleft()
            self._spill_bytes -= len(data)

    async def make_room(self) -> None:
        """Writer side while spilling: wait until the window has room again.

        A reader stuck at the window's start for LAGGARD_GRACE is dropped.
        Raises UpstreamUnavailable when nobody is left to read the rest.
        """
        loop = asyncio.get_running_loop()
        low_seen, since = -1, loop.time()
        while True:
            self._trim()
            if not self._readers and not self.joinable:
                raise UpstreamUnavailable("Uncached transfer abandoned by every client")
            if self._spill_bytes <= SPILL_BYTES or not self._readers:
                return
            low = min(r.pos for r in self._readers)
            if low != low_seen:
                low_seen, since = low, loop.time()
            elif loop.time() - since >= LAGGARD_GRACE:
                for r in [r for r in self._readers if r.pos == low]:
                    r.dropped = True
                    self._readers.discard(r)
                log.warning("dropped a stalled reader of an uncached transfer",
                            extra={"sha256": self.sha256})
                self.notify()
                continue
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=1.0)


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
        if current is not None and current.joinable:
            return current
        # No transfer, or one that can no longer serve a newcomer from its first
        # byte (the disk failed and its memory window has moved on): a new one.
        dl = Download(sha256, temp_path(self.tmp_dir, ".part"), size_hint)
        self._inflight[sha256] = dl
        task = asyncio.create_task(self._run(dl, url, opener))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def _run(self, dl: Download, url: str, opener: Callable[[str], Any]) -> None:
        fh: IO[bytes] | None = None
        verified = committed = False
        cacheable = True
        try:
            hasher = hashlib.sha256()
            try:
                # Unbuffered: readers tail this file through their own descriptors,
                # so every byte counted in dl.written must already be in the kernel.
                fh = await asyncio.to_thread(open, dl.tmp, "wb", 0)
            except OSError as exc:
                self._disk_failed(dl, url, exc)
            async with opener(url) as resp:
                length = resp.content_length
                if length is not None and dl.total is not None and length != dl.total:
                    raise UpstreamUnavailable(
                        f"Upstream announced {length} bytes; its page says {dl.total}"
                    )
                if length is not None:
                    dl.total = length
                dl.started.set()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if dl.total is not None and dl.written + len(chunk) > dl.total:
                        raise UpstreamUnavailable(
                            f"Upstream sent more than the {dl.total} bytes expected"
                        )
                    if fh is not None:
                        try:
                            await asyncio.to_thread(_write_and_hash, fh, hasher, chunk)
                        except OSError as exc:
                            await asyncio.to_thread(_close_quietly, fh)
                            fh = None
                            self._disk_failed(dl, url, exc)
                    if fh is None:
                        # Hashing a chunk takes well under a millisecond (and
                        # releases the GIL): not worth a thread hop.
                        hasher.update(chunk)
                        dl.spill(chunk)
                    dl.written += len(chunk)
                    dl.notify()
                    if fh is None:
                        await dl.make_room()
            if fh is not None:
                try:
                    await asyncio.to_thread(_fsync_close, fh)
                except OSError as exc:
                    # The bytes are in the page cache, where readers read them;
                    # they just cannot be trusted to be on disk: serve, not cache.
                    cacheable = False
                    log.warning("cache disk failed; file served but not cached",
                                extra={"url": url, "error": exc.strerror})
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
            verified = True
            if dl.on_disk is None and cacheable:
                committed = await self._commit(dl, url)
        except ProxyError as exc:
            dl.error = exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            dl.error = UpstreamUnavailable(f"Upstream file transfer failed: {type(exc).__name__}")
        finally:
            if fh is not None:
                await asyncio.to_thread(_close_quietly, fh)
            if not verified and dl.error is None:
                # Cancelled (shutdown): readers must not take what arrived for the whole file.
                dl.error = UpstreamUnavailable("Upstream file transfer interrupted")
            if dl.error is not None:
                log.warning("upstream file transfer failed", extra={
                    "url": url, "reason": dl.error.reason, "received": dl.written})
            dl.finished = True
            dl.started.set()
            dl.notify()
            if self._inflight.get(dl.sha256) is dl:
                del self._inflight[dl.sha256]
            if not committed:
                if dl.error is None:
                    await dl.wait_for_openers(OPENER_GRACE)
                await asyncio.to_thread(dl.tmp.unlink, True)

    def _disk_failed(self, dl: Download, url: str, exc: OSError) -> None:
        """The temp file cannot take more: keep streaming from memory, do not cache."""
        dl.on_disk = dl.written
        level = logging.WARNING if exc.errno in (errno.ENOSPC, errno.EDQUOT) else logging.ERROR
        log.log(level, "cache disk failed; file served but not cached",
                extra={"url": url, "error": exc.strerror, "on_disk": dl.written})

    async def _commit(self, dl: Download, url: str) -> bool:
        # Named before the rename: a reader opening the file meanwhile tries the
        # final name, then the temp name, then the final name again (_open), so
        # it finds the file on one side of the rename or the other.
        dl.final = self.path_for(dl.sha256)
        try:
            await asyncio.to_thread(commit, dl.tmp, dl.final)
        except OSError as exc:
            dl.final = None
            log.warning("cache commit failed; file served but not cached",
                        extra={"url": url, "error": exc.strerror})
            return False
        self._admit(dl.sha256, dl.written)
        return True

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

    async def drain(self, timeout: float) -> bool:
        """Let running downloads finish (graceful shutdown); False if some did not."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(list(self._tasks), timeout=max(timeout, 0.0))
        return not pending


def _write_and_hash(fh: IO[bytes], hasher: Any, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        written = fh.write(view)
        view = view[written:]
    hasher.update(chunk)


def _close_quietly(fh: IO[bytes]) -> None:
    # A failed flush on a full disk: the file is abandoned anyway.
    with contextlib.suppress(OSError):
        fh.close()


def _fsync_close(fh: IO[bytes]) -> None:
    try:
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)

