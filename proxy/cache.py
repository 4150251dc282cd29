"""The artifact cache: upstream files on disk, content-addressed and verified.

Artifacts live at files/<sha256[:2]>/<sha256>: the name is the verified hash, so
a file is committed only after its bytes match the upstream page, and nothing
unverified can ever be served from here. One download per hash at a time,
across worker processes too: the worker holding the hash's lock (hashlock.py)
fetches into tmp/<sha256>.part, the others follow that file (follow.py) until it
is committed. Least recently used files are evicted.

Bounded in bytes: a transfer takes at most its own limit (the cache size, or
less), and the transfers in flight at most the cache size between them, page
size given or not. A reader gets a cached file opened (open_cached): eviction
cannot take it away from a reader that found it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

from .config import redact_url
from .download import CHUNK, Download
from .errors import InsufficientStorage, NotFound, ProxyError, UpstreamUnavailable
from .follow import follow
from .fsutil import commit, open_sized, temp_path
from .hashlock import HashLocks
from .metrics import Metrics
from .model import is_sha256
from .sink import Sink
from .storage import SharedFiles

log = logging.getLogger("indexguard.cache")

# How long a served-but-uncached temp file waits for its late readers to open it.
OPENER_GRACE = 10.0
PART_SUFFIX = ".part"


class ArtifactCache:
    def __init__(
        self, root: Path, tmp_dir: Path, max_bytes: int, metrics: Metrics,
        shared: SharedFiles | None = None, gauges: bool = True,
    ) -> None:
        self.root = root
        # Whether this cache is the one the cache_bytes/cache_entries gauges describe.
        self._gauges = gauges
        # Replicas' shared tier (storage_s3): asked on a local miss, fed after
        # each verified commit. None on one host.
        self.shared = shared
        self._pulls: dict[str, asyncio.Future[bool]] = {}
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Beside the cache, not in tmp/: tmp/ holds only what a crash leaves
        # behind, and is empty while nothing is being written.
        self._locks = HashLocks(root.parent / "downloads.lock")
        self._lock_holders: dict[str, Download] = {}
        # Set when this process's transfer of a hash lets go of the hash's lock.
        self._let_go_events: dict[str, asyncio.Event] = {}
        # Evicted files whose unlink has not run yet: not found by readers, and
        # not fetched again until the unlink is done (it would take the new file).
        self._evicting: dict[str, asyncio.Task[None]] = {}
        # Bytes this process's transfers may have in tmp/ (their size, or what
        # arrived so far when none was given), at most max_bytes in total.
        self._held: dict[Download, int] = {}
        self._held_bytes = 0

    def open(self) -> None:
        """Create the directories, take the lock file, remove partial downloads
        nobody owns any more (tmp/ holds only transfers). Blocking: call at start.
        The cached files are not read: scan() seeds the LRU in the background."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._locks.open()
        self._sweep_parts()

    async def scan(self) -> None:
        """Seed the LRU from the disk (oldest first); in the background, so that a large cache never
        delays the first answer. Files met meanwhile are already counted; the
        cache may stay over max_bytes until the scan is done, then evicts."""
        found = await asyncio.to_thread(_scan, self.root)
        older = OrderedDict((sha, size) for _mtime, sha, size in sorted(found)
                            if sha not in self._lru and sha not in self._evicting)
        self._bytes += sum(older.values())
        # Found before the scan: used since start, so more recent than the rest.
        older.update(self._lru)
        self._lru = older
        self._evict()

    def close(self) -> None:
        """Drop this process's hash locks (its downloads must be over)."""
        self._locks.close()

    def _sweep_parts(self) -> None:
        # Left by an owner that died. Only under the hash's lock: a sibling
        # worker that is already serving may own one. (An owner also replaces
        # any leftover when it starts; this keeps them from lingering.)
        removed = 0
        with os.scandir(self.tmp_dir) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            sha = name.removesuffix(PART_SUFFIX)
            if sha != name and is_sha256(sha) and self._locks.acquire(sha):
                try:
                    (self.tmp_dir / name).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                finally:
                    self._locks.release(sha)
        if removed:
            log.info("removed partial downloads left by a crash", extra={"count": removed})

    async def _pull(self, sha256: str, kind: str) -> bool:
        """The file from the shared tier into this host's, once per hash at a time."""
        assert self.shared is not None
        flight = self._pulls.get(sha256)
        if flight is None:
            flight = asyncio.ensure_future(self._pull_once(sha256, kind))
            self._pulls[sha256] = flight
            flight.add_done_callback(lambda _f: self._pulls.pop(sha256, None))
        return await asyncio.shield(flight)

    async def _pull_once(self, sha256: str, kind: str) -> bool:
        assert self.shared is not None
        tmp = temp_path(self.tmp_dir, ".pull")
        try:
            size = await self.shared.fetch(kind, sha256, tmp, self.max_bytes)
            if size is None:
                return False
            self._evict(room=size)
            await asyncio.to_thread(commit, tmp, self.path_for(sha256))
            self._admit(sha256, size)
            return True
        except ProxyError as exc:
            log.warning("shared tier unavailable", extra={"reason": exc.reason})
            return False
        finally:
            await asyncio.to_thread(tmp.unlink, True)

    async def _share(self, sha256: str, path: Path) -> None:
        assert self.shared is not None
        try:
            await self.shared.store("artifacts", sha256, path)
        except FileNotFoundError:
            pass  # evicted already; another replica may share it
        except ProxyError as exc:
            log.warning("verified file not shared", extra={"sha256": sha256,
                                                            "reason": exc.reason})

    def _publish(self) -> None:
        if not self._gauges:
            return
        self._metrics.cache_bytes.set(self._bytes)
        self._metrics.cache_entries.set(len(self._lru))

    def path_for(self, sha256: str) -> Path:
        """Raises NotFound unless sha256 is 64 lowercase hex digits.

        The parser checks every digest already; this is the last line, as a
        page cached by an older version may hold any string for a hash, and
        a path built from one could name any file (served, then evicted).
        """
        if not is_sha256(sha256):
            raise NotFound("No valid sha256 for this file; the proxy serves verified files only")
        return self.root / sha256[:2] / sha256

    async def open_cached(
        self, sha256: str, kind: str = "artifacts",
    ) -> tuple[IO[bytes], int] | None:
        """The committed file for a hash, open, and its size; None if not cached
        here nor in the shared tier (`kind` names its part there). Marks it
        recently used. Raises NotFound for a sha256 that is not 64 lowercase
        hex digits.

        Opened, not named: once a reader has it, an eviction (of this process
        or another worker's) unlinking the name cannot turn it into a 404.
        """
        path = self.path_for(sha256)
        if sha256 in self._evicting:
            return None
        try:
            fh, size = await asyncio.to_thread(open_sized, path)
        except FileNotFoundError:
            if sha256 in self._lru:
                self._bytes -= self._lru.pop(sha256)
                self._publish()
            if self.shared is None or not await self._pull(sha256, kind):
                return None
            try:
                fh, size = await asyncio.to_thread(open_sized, path)
            except FileNotFoundError:  # evicted at once: the cache is tiny
                return None
        if sha256 in self._lru:
            self._lru.move_to_end(sha256)
        elif sha256 not in self._evicting:  # committed by another worker process
            self._lru[sha256] = size
            self._bytes += size
            self._publish()
        return fh, size

    def inflight(self, sha256: str) -> Download | None:
        return self._inflight.get(sha256)

    def download(
        self, sha256: str, url: str, size_hint: int | None,
        opener: Callable[[str], Any], limit: int | None = None,
    ) -> Download:
        """Start (or join) the single download of url, expected to hash to sha256,
        of at most limit bytes (default and ceiling: max_bytes).

        Raises NotFound for a sha256 that could not name a file (see path_for)."""
        self.path_for(sha256)  # names the temp file too: checked before either exists
        current = self._inflight.get(sha256)
        if current is not None and current.joinable:
            return current
        # No transfer, or one that can no longer serve a newcomer from its first
        # byte (the disk failed and its memory window has moved on): a new one,
        # which fetches the file, or follows the worker that already does.
        dl = Download(sha256, self.tmp_dir / f"{sha256}{PART_SUFFIX}", size_hint)
        dl.limit = self.max_bytes if limit is None else min(limit, self.max_bytes)
        self._inflight[sha256] = dl
        task = asyncio.create_task(
            self._start(dl, url, opener, self._let_go_events.get(sha256))
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def _start(
        self, dl: Download, url: str, opener: Callable[[str], Any],
        previous: asyncio.Event | None,
    ) -> None:
        if previous is not None:
            # This process's earlier transfer of the hash (failed, or waiting for
            # late readers) still holds the lock: following ourselves would only
            # inherit its end. Fetch once it has let go.
            await previous.wait()
        if self._locks.acquire(dl.sha256):
            self._lock_holders[dl.sha256] = dl
            self._let_go_events[dl.sha256] = asyncio.Event()
            await self._run(dl, url, opener)
        else:
            dl.final = self.path_for(dl.sha256)
            await self._follow(dl, url)

    def _release(self, dl: Download) -> None:
        if self._lock_holders.get(dl.sha256) is dl:
            del self._lock_holders[dl.sha256]
            self._locks.release(dl.sha256)
            event = self._let_go_events.pop(dl.sha256, None)
            if event is not None:
                event.set()

    async def _follow(self, dl: Download, url: str) -> None:
        done = False
        try:
            await follow(dl, self.path_for(dl.sha256), lambda: self._locks.is_free(dl.sha256))
            done = True
        except ProxyError as exc:
            dl.error = exc
        except OSError as exc:
            dl.error = UpstreamUnavailable(f"Following a transfer failed: {exc.strerror}")
        finally:
            if not done and dl.error is None:
                dl.error = UpstreamUnavailable("Upstream file transfer interrupted")
            if dl.error is not None:
                log.warning("upstream file transfer failed", extra={
                    "url": redact_url(url), "reason": dl.error.reason, "received": dl.written,
                    "follower": True})
            dl.finished = True
            dl.started.set()
            dl.notify()
            if self._inflight.get(dl.sha256) is dl:
                del self._inflight[dl.sha256]

    async def _run(self, dl: Download, url: str, opener: Callable[[str], Any]) -> None:
        sink: Sink | None = None
        verified = committed = False
        try:
            unlinking = self._evicting.get(dl.sha256)
            if unlinking is not None:
                # Fetched again right after its eviction: the pending unlink
                # would take the new file with it.
                await asyncio.wait([unlinking])
            _check_size(dl, dl.total)
            final = self.path_for(dl.sha256)
            size = await asyncio.to_thread(_size_of, final)
            if size is not None:
                # Committed by another worker between our lookup and our lock.
                dl.final = final
                dl.have_file(size)
                verified = committed = True
                self._admit(dl.sha256, size)
                return
            self._hold(dl, dl.total or 0)
            sink = Sink(dl, await self._create_temp(dl, url),
                        lambda exc: self._disk_failed(dl, url, exc))
            async with opener(url) as resp:
                length = resp.content_length
                if length is not None and dl.total is not None and length != dl.total:
                    raise UpstreamUnavailable(
                        f"Upstream announced {length} bytes; its page says {dl.total}"
                    )
                if length is not None:
                    _check_size(dl, length)
                    self._hold(dl, length)
                    dl.total = length
                dl.started.set()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if dl.total is not None and dl.written + len(chunk) > dl.total:
                        raise UpstreamUnavailable(
                            f"Upstream sent more than the {dl.total} bytes expected"
                        )
                    if dl.total is None:
                        # No size from the page or the headers: bounded as it grows.
                        _check_size(dl, dl.written + len(chunk))
                        self._hold(dl, dl.written + len(chunk))
                    await sink.feed(chunk)
            await sink.finish()
            if dl.total is not None and dl.written != dl.total:
                raise UpstreamUnavailable(
                    f"Upstream sent {dl.written} bytes, expected {dl.total}"
                )
            if sink.hexdigest() != dl.sha256:
                self._metrics.hash_mismatches.inc()
                log.error("hash mismatch", extra={"url": redact_url(url), "expected": dl.sha256,
                                                  "got": sink.hexdigest()})
                raise UpstreamUnavailable(
                    "Upstream file does not match the sha256 its page declared; refused"
                )
            verified = True
            if dl.on_disk is None:
                # Room first, so the cache is within bounds by the time a client
                # has the whole file, as it was when commit came first.
                self._evict(room=dl.written)
                # Its bytes now count as the cache's (the rename takes no room),
                # so the next transfer need not wait for this one's fsync.
                self._held_bytes -= self._held.pop(dl, 0)
            # Readers need the bytes verified, not durable: every byte is in the
            # kernel already (the file is unbuffered), so the last one goes out
            # now and the fsync and rename follow while clients finish reading.
            dl.finished = True
            dl.notify()
            if dl.on_disk is None and await self._fsync(sink, url):
                committed = await self._commit(dl, url)
        except ProxyError as exc:
            dl.error = exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            dl.error = UpstreamUnavailable(f"Upstream file transfer failed: {type(exc).__name__}")
        except OSError as exc:
            dl.error = UpstreamUnavailable(f"Cache disk failed during the transfer: {exc.strerror}")
        finally:
            if sink is not None:
                await sink.abandon()
            if not verified and dl.error is None:
                # Cancelled (shutdown): readers must not take what arrived for the whole file.
                dl.error = UpstreamUnavailable("Upstream file transfer interrupted")
            if dl.error is not None:
                log.warning("upstream file transfer failed", extra={
                    "url": redact_url(url), "reason": dl.error.reason, "received": dl.written})
            dl.finished = True
            dl.started.set()
            dl.notify()
            if self._inflight.get(dl.sha256) is dl:
                del self._inflight[dl.sha256]
            try:
                if not committed:
                    if dl.error is None:
                        await dl.wait_for_openers(OPENER_GRACE)
                    await asyncio.to_thread(dl.tmp.unlink, True)
            finally:
                self._held_bytes -= self._held.pop(dl, 0)
                # Last: followers take "lock free, no final file" as failure, and
                # a new owner replaces the temp name, so both must be settled.
                self._release(dl)

    def _hold(self, dl: Download, size: int) -> None:
        """Count up to size bytes of tmp/ for dl. Raises InsufficientStorage when
        the transfers in flight would hold more than max_bytes between them."""
        more = size - self._held.get(dl, 0)
        if more <= 0:
            return
        if self._held_bytes + more > self.max_bytes:
            raise InsufficientStorage(
                f"Transfers in flight hold {self._held_bytes} bytes; this file would take "
                f"them over cache.max_bytes ({self.max_bytes}); try again later"
            )
        self._held[dl] = size
        self._held_bytes += more

    async def _create_temp(self, dl: Download, url: str) -> IO[bytes] | None:
        try:
            fh, dl.ident = await asyncio.to_thread(_fresh_temp, dl.tmp)
        except OSError as exc:
            dl.on_disk = 0
            await self._disk_failed(dl, url, exc)
            return None
        return fh

    async def _fsync(self, sink: Sink, url: str) -> bool:
        try:
            await sink.fsync_close()
        except OSError as exc:
            # The bytes are in the page cache, where readers read them; they
            # just cannot be trusted to be on disk: serve, not cache.
            log.warning("cache disk failed; file served but not cached",
                        extra={"url": redact_url(url), "error": exc.strerror})
            return False
        return True

    async def _disk_failed(self, dl: Download, url: str, exc: OSError) -> None:
        """The temp file cannot take more: the sink streams from memory; do not cache."""
        level = logging.WARNING if exc.errno in (errno.ENOSPC, errno.EDQUOT) else logging.ERROR
        log.log(level, "cache disk failed; file served but not cached",
                extra={"url": redact_url(url), "error": exc.strerror, "on_disk": dl.on_disk})
        await self._let_go(dl)

    async def _let_go(self, dl: Download) -> None:
        """Give up the shared temp name and the lock: a transfer that cannot
        reach the disk cannot feed other workers. Their clients get an error at
        once and retry (when the disk has room again, one of them fetches it)."""
        private = temp_path(self.tmp_dir, PART_SUFFIX)
        if dl.on_disk:
            # What reached the disk stays readable for this worker's readers.
            try:
                await asyncio.to_thread(os.link, dl.tmp, private)
            except OSError:
                return  # keep name and lock to the end: followers wait, then fail
        # The new name first: a reader that misses the old one then finds it
        # has moved and tries again (Download._open).
        shared, dl.tmp = dl.tmp, private
        try:
            await asyncio.to_thread(shared.unlink, True)
        except OSError:
            return  # as above; the next owner replaces the name
        self._release(dl)

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
                        extra={"url": redact_url(url), "error": exc.strerror})
            return False
        self._admit(dl.sha256, dl.written)
        if self.shared is not None:
            task = asyncio.create_task(self._share(dl.sha256, dl.final))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    def _admit(self, sha256: str, size: int) -> None:
        if sha256 not in self._lru:
            self._bytes += size
        self._lru[sha256] = size
        self._lru.move_to_end(sha256)
        self._evict()

    def _evict(self, room: int = 0) -> None:
        """Drop least recently used files until room more bytes fit; the newest stays."""
        victims: list[str] = []
        while self._bytes + room > self.max_bytes and len(self._lru) > (0 if room else 1):
            old, old_size = self._lru.popitem(last=False)
            self._bytes -= old_size
            victims.append(old)
            self._metrics.cache_evictions.inc()
        self._publish()
        if victims:
            # Readers that already opened a victim keep their descriptor (POSIX).
            task = asyncio.create_task(
                asyncio.to_thread(_unlink_all, [self.path_for(v) for v in victims])
            )
            for victim in victims:
                self._evicting[victim] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda done: self._unlinked(victims, done))

    def _unlinked(self, victims: list[str], task: asyncio.Task[None]) -> None:
        for victim in victims:
            if self._evicting.get(victim) is task:
                del self._evicting[victim]

    async def drain(self, timeout: float) -> bool:
        """Let running downloads finish (graceful shutdown); False if some did not."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(list(self._tasks), timeout=max(timeout, 0.0))
        return not pending


def _check_size(dl: Download, size: int | None) -> None:
    """Raises UpstreamUnavailable for a file over its transfer's limit."""
    if size is not None and dl.limit is not None and size > dl.limit:
        raise UpstreamUnavailable(
            f"Upstream file is over the {dl.limit} bytes the proxy takes for it; refused"
        )


def _scan(root: Path) -> list[tuple[float, str, int]]:
    found: list[tuple[float, str, int]] = []
    for sub in os.scandir(root):
        if sub.is_dir():
            for entry in os.scandir(sub.path):
                # Only hash names: path_for refuses anything else.
                if entry.is_file() and is_sha256(entry.name):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue  # evicted meanwhile
                    found.append((st.st_mtime, entry.name, st.st_size))
    return found


def _size_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _fresh_temp(path: Path) -> tuple[IO[bytes], tuple[int, int]]:
    # Called under the hash's lock: a file under this name is a dead owner's
    # leftover, and a follower may have it open. Unlinked, not truncated, so
    # what that follower reads never changes under it; a new inode, which
    # followers and readers tell apart by (st_dev, st_ino).
    path.unlink(missing_ok=True)
    # Unbuffered: readers tail this file through their own descriptors, so
    # every byte counted in dl.in_file must already be in the kernel.
    fh = open(path, "xb", buffering=0)  # noqa: SIM115 - the sink closes it
    try:
        st = os.fstat(fh.fileno())
    except OSError:
        fh.close()
        raise
    return fh, (st.st_dev, st.st_ino)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)

