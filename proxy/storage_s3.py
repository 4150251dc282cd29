"""The S3 backend: what replicas share, in one bucket (s3_bucket.py) and nothing else.

Keys, under storage.s3.prefix:
    blobs/<sha256>                        a private file's bytes (If-None-Match: *)
    indexes/<index>/projects/<name>.json  a project's record, as the local index.json
                                          (replaced with If-Match: <etag>)
    indexes/<index>/names/<name>          present while the name is private (names())
    changes/<ms>-<random>/<index>/<name>  the change feed every replica polls
    artifacts/<sha256>                    verified upstream files, shared
    probe/<random>                        the start-up probe's scratch key
An upload stores its blobs first, then commits the record in one conditional
write: a replica killed in between leaves an unreferenced blob (swept after
BLOB_GRACE), never a listed file that is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from packaging.utils import NormalizedName

from .errors import ServiceUnavailable
from .generation import Generation
from .model import ProjectPage, is_sha256
from .s3_bucket import Bucket
from .storage import Decide, LocalFile, Record, RedirectFile, StoredFile, StreamedFile, T

log = logging.getLogger("indexguard.storage")

# A record commit (re-read and re-decide on every lost race) gives up after this.
COMMIT_DEADLINE = 60.0
# An unreferenced blob younger than this is never swept: far longer than any
# commit takes after its blobs are stored (COMMIT_DEADLINE), and an upload that
# reuses an older blob rewrites it first (see put_blob), making it young again.
BLOB_GRACE = 3600.0
# How often each replica polls the change feed, and how far back each poll
# looks (replicas' clocks may disagree by this much).
FEED_INTERVAL = 1.0
FEED_WINDOW_MS = 10_000
# Change-feed entries older than this are deleted by the sweep.
FEED_KEEP = 3600.0
# One round trip to the store on a request's path: bounded, then a 503.
ASK_TIMEOUT = 5.0
# How long a replica trusts "not private" without asking the bucket again
# (the feed tells it sooner when the name is committed elsewhere).
ABSENCE_TTL = FEED_INTERVAL
# How long a replica serves a private page it read without revalidating it
# (a 304 is one small round trip): bounds staleness when a feed entry was lost
# to a crash between a commit and its announcement.
PAGE_TTL = 10.0
# The sweep of unreferenced blobs and old feed entries, per replica.
SWEEP_INTERVAL = 6 * 3600.0
# A swept blob waits this long in trash/ before it is gone for good.
TRASH_KEEP = 24 * 3600.0


class ChangeFeed:
    """Which records changed, for every replica: one small object per change,
    listed every FEED_INTERVAL. version() moves on each change seen."""

    def __init__(self, bucket: Bucket, host: Generation | None = None) -> None:
        """host: the counter the worker processes of this host share (their
        siblings' commits are then seen at once, not at the next poll)."""
        self.bucket = bucket
        self._host = host
        self._version = 0
        self._seen: set[str] = set()
        self._last_ms = int(time.time() * 1000)
        self._task: asyncio.Task[None] | None = None
        self.polls_ok = True

    def version(self) -> int:
        # Even: a remote change is never "under way" for a reader (the host
        # counter's own parity lands in the high bits).
        host = self._host.read() if self._host is not None else 0
        return (host << 40) + self._version * 2

    def moved(self) -> None:
        self._version += 1

    async def announce(self, index: str, name: str) -> None:
        """After a commit: tell the other replicas (this one forgets at once, its
        sibling workers as soon as the host counter moves)."""
        self.moved()
        if self._host is not None:
            await asyncio.to_thread(self._host.bump)
        key = self.bucket.key(
            "changes", f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}", index, name)
        self._seen.add(key)
        try:
            await self.bucket.put(key, b"")
        except ServiceUnavailable as exc:
            # The commit stands; the others learn it when they next ask
            # (store.absence_ttl bounds how long a "not private" is trusted).
            log.warning("change feed entry not written", extra={"reason": exc.reason})

    async def poll(self) -> int:
        """One look at the feed; returns how many new changes it saw."""
        started = int(time.time() * 1000)
        after = self.bucket.key("changes", f"{max(self._last_ms - FEED_WINDOW_MS, 0):013d}")
        fresh = 0
        keep: set[str] = set()
        async for item in self.bucket.list(self.bucket.key("changes", ""), after):
            keep.add(item.key)
            if item.key not in self._seen:
                fresh += 1
        self._seen = keep | {k for k in self._seen if k > after}
        self._last_ms = started
        if fresh:
            self.moved()
        return fresh

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FEED_INTERVAL)
            try:
                await self.poll()
                if not self.polls_ok:
                    log.info("change feed readable again")
                self.polls_ok = True
            except ServiceUnavailable as exc:
                if self.polls_ok:
                    log.warning("change feed unreadable", extra={"reason": exc.reason})
                self.polls_ok = False
                self.moved()  # trust nothing remembered while blind

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# Opens a blob from this host's read-through tier, fetching it from the bucket
# into the tier first (cache.ArtifactCache.open_cached): None when not there.
OpenLocal = Callable[[str], Awaitable[LocalFile | None]]


class S3Records:
    """storage.ProjectRecords of one index in the bucket (see the module docstring)."""

    remote = True

    def __init__(self, bucket: Bucket, index: str, feed: ChangeFeed, open_local: OpenLocal,
                 shared: SharedArtifacts | None = None) -> None:
        self.bucket = bucket
        self._shared = shared
        self.index = index
        self.feed = feed
        self._open_local = open_local
        # name -> (etag, record): revalidated with If-None-Match after the feed moved.
        self._records: dict[str, tuple[str, Record]] = {}
        self._names: tuple[int, list[NormalizedName]] | None = None

    def _record_key(self, name: str) -> str:
        return self.bucket.key("indexes", self.index, "projects", f"{name}.json")

    def _name_key(self, name: str) -> str:
        return self.bucket.key("indexes", self.index, "names", name)

    def version(self) -> int:
        return self.feed.version()

    def peek_private(self, name: NormalizedName) -> bool | None:
        return None

    async def _fetch(self, name: NormalizedName) -> tuple[str, Record] | None:
        known = self._records.get(name)
        got = await self.bucket.get(self._record_key(name), known[0] if known else None)
        if got is None:
            self._records.pop(name, None)
            return None
        if isinstance(got, str):
            assert known is not None
            return known
        body, etag = got
        record = _parse(body)
        if len(self._records) >= 100_000:
            self._records.clear()
        self._records[name] = (etag, record)
        return etag, record

    async def learn(self, name: NormalizedName) -> Record | None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                found = await self._fetch(name)
        except TimeoutError:
            raise ServiceUnavailable(
                "Storage did not answer in time whether the name is private; try again"
            ) from None
        return found[1] if found is not None else None

    async def read(self, name: NormalizedName) -> Record | None:
        return await self.learn(name)

    async def names(self) -> list[NormalizedName]:
        version = self.feed.version()
        if self._names is not None and self._names[0] == version:
            return self._names[1]
        prefix = self.bucket.key("indexes", self.index, "names", "")
        names = sorted([NormalizedName(item.key[len(prefix):])
                        async for item in self.bucket.list(prefix)])
        self._names = (version, names)
        return names

    async def open_file(
        self, name: NormalizedName, filename: str, sha256: str | None, redirect: bool = False,
    ) -> StoredFile | RedirectFile | None:
        if sha256 is None or not is_sha256(sha256):
            return None
        if redirect and self._shared is not None:
            url = await self._shared.presign("blobs", sha256)
            if url is not None:
                return RedirectFile(url, None, "private", sha256)
        local = await self._open_local(sha256)
        if local is not None:
            return local
        # Not in the local tier (larger than it): streamed from the bucket.
        key = self.bucket.key("blobs", sha256)
        head = await self.bucket.head(key)
        if head is None:
            # Listed, yet swept (see sweep()): back from the trash, then as usual.
            if not await restore(self.bucket, sha256):
                return None
            local = await self._open_local(sha256)
            if local is not None:
                return local
            head = await self.bucket.head(key)
            if head is None:
                return None
        return StreamedFile(head.size, "private", sha256, self.bucket.ranged(key))

    async def commit(self, name: NormalizedName, decide: Decide[T]) -> T:
        deadline = time.monotonic() + COMMIT_DEADLINE
        stored: set[str] = set()
        while time.monotonic() < deadline:
            found = await self._fetch(name)
            change = decide(found[1] if found is not None else None)
            if change.record is None:
                return change.result
            for new in change.added:
                if not is_sha256(new.sha256):  # a hash names a key: checked first
                    raise ServiceUnavailable("A file to store has no valid sha256")
                if new.sha256 not in stored:
                    await put_blob(self.bucket, new.sha256, new.content)
                    stored.add(new.sha256)
            private = change.record.page is not None
            if private and (found is None or found[1].page is None):
                # Before the record: a crash in between lists a name that is not
                # private (names() only; the guard reads the record).
                await self.bucket.put(self._name_key(name), b"")
            body = _dump(change.record)
            if found is None:
                etag = await self.bucket.put(self._record_key(name), body, if_none_match=True)
            else:
                etag = await self.bucket.put(self._record_key(name), body, if_match=found[0])
            if etag is None:
                # Lost a race: another replica committed first. Re-read, re-decide
                # (same bytes: a no-op; other bytes: FileExists).
                await asyncio.sleep(random.uniform(0.0, 0.05))
                continue
            self._records[name] = (etag, change.record)
            if not private:
                await self.bucket.delete(self._name_key(name))
            for new in change.added:
                # A sweep that raced this commit (it lists blobs before it reads
                # the records) may have taken a reused blob: put it back.
                if await self.bucket.head(self.bucket.key("blobs", new.sha256)) is None:
                    await put_blob(self.bucket, new.sha256, new.content)
            await self.feed.announce(self.index, name)
            return change.result
        raise ServiceUnavailable(
            f"Storage busy: {name} changed on every try for {COMMIT_DEADLINE:.0f}s; try again")


async def put_blob(bucket: Bucket, sha256: str, content: Path | bytes) -> None:
    """Store bytes under their sha256, once (If-None-Match: *). A blob already
    there holds the same bytes; an old one is written again so that its age
    (what the sweep goes by) starts over. Raises ServiceUnavailable."""
    key = bucket.key("blobs", sha256)

    async def put(conditional: bool) -> str | None:
        if isinstance(content, bytes):
            return await bucket.put(key, content, if_none_match=conditional, sha256=sha256)
        fh = await asyncio.to_thread(open, content, "rb")
        try:
            return await bucket.put(key, fh, if_none_match=conditional, sha256=sha256)
        finally:
            await asyncio.to_thread(fh.close)

    if await put(True) is not None:
        return
    head = await bucket.head(key)
    if head is None or head.age > BLOB_GRACE / 4:
        await put(False)


def _parse(body: bytes) -> Record:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ServiceUnavailable("Storage holds a record that does not parse") from None
    raw = data.get("used") if isinstance(data, dict) else None
    used = ({k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(raw, dict) else {})
    if not isinstance(data, dict) or data.get("released"):
        return Record(None, used)
    return Record(ProjectPage.from_json(data), used)


def _dump(record: Record) -> bytes:
    if record.page is None:
        return orjson.dumps({"released": True, "used": record.used})
    return orjson.dumps({**record.page.to_json(), "used": record.used})


class SharedArtifacts:
    """Verified files in the bucket, behind each replica's local tier
    (cache.ArtifactCache): `kind` is "artifacts" (upstream files) or "blobs"."""

    def __init__(self, bucket: Bucket, redirect_ttl: int = 0) -> None:
        self.bucket = bucket
        self.redirect_ttl = redirect_ttl
        # Hashes known to be in the bucket: shared files are never deleted
        # (blobs only once no record lists them, and a listed one is asked for).
        self._present: set[str] = set()

    async def presign(self, kind: str, sha256: str) -> str | None:
        if not self.redirect_ttl or not is_sha256(sha256):
            return None
        key = self.bucket.key(kind, sha256)
        if key not in self._present:
            if await self.bucket.head(key) is None:
                return None
            if len(self._present) >= 100_000:
                self._present.clear()
            self._present.add(key)
        return await self.bucket.presign(key, self.redirect_ttl)

    async def fetch(self, kind: str, sha256: str, dest: Path, limit: int) -> int | None:
        """Into dest, verified: its size; None when absent, too large, or its
        bytes do not hash to sha256 (logged). Raises ServiceUnavailable."""
        got = await self.bucket.download(self.bucket.key(kind, sha256), dest, limit)
        if got is None:
            return None
        size, digest = got
        if digest != sha256:
            log.error("bucket object does not match its sha256; not served",
                      extra={"kind": kind, "expected": sha256, "got": digest})
            return None
        return size

    async def store(self, kind: str, sha256: str, path: Path) -> None:
        """Share a verified file (If-None-Match: *; already there is fine)."""
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            await self.bucket.put(self.bucket.key(kind, sha256), fh, if_none_match=True,
                                  sha256=sha256)
        finally:
            await asyncio.to_thread(fh.close)


async def _listed(bucket: Bucket, indexes: list[str]) -> set[str]:
    """Every sha256 a record lists (files and their metadata)."""
    listed: set[str] = set()
    for index in indexes:
        async for item in bucket.list(bucket.key("indexes", index, "projects", "")):
            got = await bucket.get(item.key)
            if isinstance(got, tuple):
                page = _parse(got[0]).page
                for f in page.files if page is not None else ():
                    for hashes in (f.hashes, f.metadata_hashes):
                        if hashes and "sha256" in hashes:
                            listed.add(hashes["sha256"])
    return listed


async def restore(bucket: Bucket, sha256: str) -> bool:
    """A swept blob back from trash/ (a record lists it after all). True if it was there."""
    trashed = bucket.key("trash", sha256)
    if await bucket.head(trashed) is None:
        return False
    await bucket.copy(trashed, bucket.key("blobs", sha256))
    await bucket.delete(trashed)
    log.warning("blob restored from the sweep's trash", extra={"sha256": sha256})
    return True


async def sweep(bucket: Bucket, indexes: list[str]) -> tuple[int, int]:
    """Move blobs no record lists (older than BLOB_GRACE) to trash/, restore
    trashed blobs a record lists after all, delete trash older than TRASH_KEEP
    and change-feed entries older than FEED_KEEP. Reads every record: a
    background job, never at start. Returns (blobs trashed, feed entries removed).

    Trash, not a delete: an upload that reuses an old blob rewrites it and
    checks it after its commit, but a sweep could still take it in between its
    own last look and its delete; its bytes then wait in trash/ for the next
    sweep (or the first reader, S3Records.open_file) to put them back.
    """
    old = [item async for item in bucket.list(bucket.key("blobs", ""))
           if item.age > BLOB_GRACE]
    trash = [item async for item in bucket.list(bucket.key("trash", ""))]
    listed = await _listed(bucket, indexes) if old or trash else set()
    for item in trash:
        sha = item.key.rsplit("/", 1)[-1]
        if sha in listed:
            await restore(bucket, sha)
        elif item.age > TRASH_KEEP:
            await bucket.delete(item.key)
    removed_blobs = 0
    for item in old:
        sha = item.key.rsplit("/", 1)[-1]
        if sha in listed:
            continue
        again = await bucket.head(item.key)
        if again is not None and again.age > BLOB_GRACE:
            await bucket.copy(item.key, bucket.key("trash", sha))
            await bucket.delete(item.key)
            removed_blobs += 1
    removed_feed = 0
    async for item in bucket.list(bucket.key("changes", "")):
        if item.age > FEED_KEEP:
            await bucket.delete(item.key)
            removed_feed += 1
    return removed_blobs, removed_feed


async def run_sweeps(bucket: Bucket, indexes: list[str]) -> None:
    """sweep() every SWEEP_INTERVAL (first after a random part of it, so that
    replicas started together do not sweep together); never at start."""
    await asyncio.sleep(random.uniform(0.1, 1.0) * SWEEP_INTERVAL)
    while True:
        try:
            blobs, feed = await sweep(bucket, indexes)
            log.info("bucket swept", extra={"blobs": blobs, "feed_entries": feed})
        except ServiceUnavailable as exc:
            log.warning("bucket sweep failed", extra={"reason": exc.reason})
        await asyncio.sleep(SWEEP_INTERVAL)
