"""The private store: one private index's policy over its storage backend.

Published files, their metadata and reserved names; PyPI's duplicate contract
(dists.file_key: the same key with identical bytes is a no-op, other bytes a
FileExists, also after a delete or a release); yank, delete, release. Where
records and files live is the backend's (storage.ProjectRecords: local disk or
a bucket). Reads trust what they learned (is a name private, its page) until
the backend's change feed moves, so a warm read makes no system call at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from packaging.utils import NormalizedName

from .dists import file_key, guess_version
from .errors import BadRequest, FileExists, NotFound, ServiceUnavailable
from .model import FileEntry, ProjectPage
from .storage import Change, NewFile, ProjectRecords, Record, RedirectFile, StoredFile, Used

log = logging.getLogger("indexguard.store")

AddOutcome = Literal["stored", "duplicate"]
# Names whose private-or-not answer is remembered between store changes.
_KNOWN_NAMES = 100_000


class PrivateStore:
    def __init__(
        self, records: ProjectRecords, tmp_dir: Path, *, absence_ttl: float,
        page_ttl: float = float("inf"),
    ) -> None:
        """absence_ttl: how long "not private" is trusted without asking the backend
        again while its feed stays (inf: the feed is exact, as on one host);
        page_ttl: the same for a page (a feed entry lost in a crash is then
        made up for after this long)."""
        self.records = records
        self.tmp_dir = tmp_dir
        self._absence_ttl = absence_ttl
        self._page_ttl = page_ttl
        # name -> (page, feed version it was read at, time.monotonic() it holds until)
        self._pages: dict[str, tuple[ProjectPage, int, float]] = {}
        # What the backend said of each name: (private?, the feed version it
        # was said at, time.monotonic() until which a False holds). Trusted
        # while the version stays; the last answer of a remote backend stays
        # the answer until check() gives a newer one (never a guess of "not
        # private" because the feed moved between a check and its use).
        self._seen = -1
        self._private: dict[str, tuple[bool, int, float]] = {}
        # Remote backends: one question per name in flight, whoever asks.
        self._checks: dict[str, asyncio.Future[bool]] = {}

    # --- reads -------------------------------------------------------------------

    def _at_rest(self) -> bool:
        """Whether what this process remembers may hold: the version it was
        remembered at is the current one. False while a write is under way
        (odd version): then every read goes to the backend."""
        self._seen = self.records.version()
        return self._seen % 2 == 0

    def _remember(self, name: NormalizedName, private: bool, version: int) -> None:
        if len(self._private) >= _KNOWN_NAMES:
            self._private.clear()
        self._private[name] = (private, version, time.monotonic() + self._absence_ttl)

    def _remembered(self, name: NormalizedName) -> bool | None:
        """The answer remembered at the current version (and, for "not private",
        within absence_ttl); None: ask the backend."""
        known = self._private.get(name)
        if known is None or known[1] != self._seen:
            return None
        if not known[0] and time.monotonic() >= known[2]:
            return None
        return known[0]

    def needs_check(self, name: NormalizedName) -> bool:
        """True when is_private(name) cannot answer without a round trip to the
        backend: call check(name) first. Never for the local backend."""
        if not self.records.remote:
            return False
        self._at_rest()
        return self._remembered(name) is None

    def must_wait(self, name: NormalizedName) -> bool:
        """needs_check() for the read path: a name asked about before is
        answered with its last answer while a check runs behind (one per name),
        so a warm page never waits for the bucket. What that answer may still
        allow is bounded: no request naming the project leaves for upstream
        without a check of its own (reader.py), and the feed or absence_ttl
        start the check within about a second. Writers and the admin API use
        private(), which always waits."""
        if not self.needs_check(name):
            return False
        if name in self._private:
            if name not in self._checks:
                self._start_check(name).add_done_callback(_consume)
            return False
        return True

    async def check(self, name: NormalizedName) -> bool:
        """Ask the backend whether the name is private now, and remember it;
        joins a check of the name already under way. Raises ServiceUnavailable
        (the store cannot say)."""
        flight = self._checks.get(name) or self._start_check(name)
        return await asyncio.shield(flight)

    def _start_check(self, name: NormalizedName) -> asyncio.Future[bool]:
        flight = asyncio.ensure_future(self._check(name))
        self._checks[name] = flight
        flight.add_done_callback(lambda _f: self._checks.pop(name, None))
        return flight

    async def _check(self, name: NormalizedName) -> bool:
        at_rest = self._at_rest()
        version = self._seen
        record = await self.records.learn(name)
        private = record is not None and record.page is not None
        # Remembered as of the version read before asking: if the feed moved
        # meanwhile, the next request asks again (is_private() still answers
        # with this, the newest answer there is).
        self._remember(name, private, version if at_rest else -1)
        if private and at_rest and self.records.version() == version:
            assert record is not None and record.page is not None
            self._pages[name] = (record.page, version, time.monotonic() + self._page_ttl)
        return private

    def is_private(self, name: NormalizedName) -> bool:
        """True when the name has, or ever had, private files (and was not
        released). On the loop only; with a remote backend, after check()."""
        at_rest = self._at_rest()
        known = self._remembered(name)
        if known is not None:
            return known
        peek = self.records.peek_private(name)
        if peek is None:
            # Remote: the last answer check() got (a moment ago, in the usual
            # request), else "not private" for callers that never checked.
            last = self._private.get(name)
            return last[0] if last is not None else False
        # Read after the version: a change that lands in between moves it past
        # the version remembered, and the next call asks again.
        if at_rest:
            self._remember(name, peek, self._seen)
        return peek

    async def private(self, name: NormalizedName) -> bool:
        """is_private(), asking a remote backend first when it must."""
        if self.needs_check(name):
            return await self.check(name)
        return self.is_private(name)

    async def page(self, name: NormalizedName, fresh: bool = False) -> ProjectPage | None:
        """The name's page; fresh: as the backend has it now, whatever this
        process remembers (a file another replica committed a moment ago)."""
        at_rest = self._at_rest()
        version = self._seen  # read before the backend
        cached = self._pages.get(name)
        if not fresh and at_rest and cached is not None and cached[1] == version and (
                self._page_ttl == float("inf") or time.monotonic() < cached[2]):
            return cached[0]
        record = await self.records.read(name)
        if record is None or record.page is None:
            self._pages.pop(name, None)
            return None
        # Kept for this version only if no write happened meanwhile.
        unchanged = at_rest and self.records.version() == version
        self._pages[name] = (record.page, version if unchanged else -1,
                             time.monotonic() + self._page_ttl)
        return record.page

    async def names(self) -> list[NormalizedName]:
        """Every private (or reserved-by-history) project name, sorted."""
        return await self.records.names()

    async def open_file(
        self, name: NormalizedName, filename: str, sha256: str | None, redirect: bool = False,
    ) -> StoredFile | RedirectFile | None:
        """A listed file, opened (None: deleted since its page was read); with
        redirect, maybe a presigned URL instead (storage.s3.redirect_ttl)."""
        return await self.records.open_file(name, filename, sha256, redirect)

    # --- writes --------------------------------------------------------------------

    async def add(
        self, name: NormalizedName, entry: FileEntry, content: Path, metadata: bytes | None,
    ) -> AddOutcome:
        """Commit an uploaded file (content is a fsynced temp file, consumed here).

        Filenames are compared by dists.file_key (normalized name, version and
        tags): the same key with identical sha256 -> "duplicate" (a no-op, PyPI's
        contract). Raises FileExists when the key is, or ever was, taken by
        different bytes; a deleted file may come back only with its own bytes.
        """
        added = [NewFile(entry.filename, entry.sha256 or "", content)]
        if metadata is not None:
            meta_sha = (entry.metadata_hashes or {}).get("sha256")
            added.append(NewFile(entry.filename + ".metadata",
                                 meta_sha or hashlib.sha256(metadata).hexdigest(), metadata))

        def decide(record: Record | None) -> Change[AddOutcome]:
            page = (record.page if record else None) or ProjectPage(name=name, files=())
            used = record.used if record else {}
            key = file_key(entry.filename)
            if _is_duplicate(page, used, key, entry):
                return Change(None, "duplicate")
            used = {**used, key: used.get(key) or entry.sha256 or ""}
            files = (*page.files, entry)
            return Change(Record(_with_versions(page, files), used), "stored", tuple(added))

        try:
            outcome = await self.records.commit(name, decide)
        finally:
            content.unlink(missing_ok=True)
        if self.records.remote:
            # This replica's readers know at once (the others from the feed).
            self._remember(name, True, self.records.version())
        return outcome

    async def _existing(self, name: NormalizedName) -> None:
        """Raises NotFound for a name that is not private (before any lock or write)."""
        if not await self.private(name):
            raise NotFound(f"No private project {name}")

    async def set_yanked(self, name: NormalizedName, version: str, yanked: bool | str) -> int:
        """Yank or unyank every file of a release (PEP 592). Returns files changed.

        Raises NotFound when the release has no files here.
        """
        await self._existing(name)

        def decide(record: Record | None) -> Change[int]:
            page = _page_or_missing(name, record)
            hits = [f for f in page.files if guess_version(f.filename, name) == version]
            if not hits:
                raise NotFound(f"No files for {name} {version}")
            files = tuple(f.with_yank(yanked) if f in hits else f for f in page.files)
            assert record is not None
            return Change(Record(_with_versions(page, files), record.used), len(hits))

        return await self.records.commit(name, decide)

    async def delete(self, name: NormalizedName, filename: str) -> None:
        """Remove one file; the name stays private. Raises NotFound."""
        await self._existing(name)

        def decide(record: Record | None) -> Change[None]:
            page = _page_or_missing(name, record)
            gone = page.file(filename)
            if gone is None:
                raise NotFound(f"No file {filename} in {name}")
            assert record is not None
            # Remembered even when stored before the record existed: the name
            # stays bound to these bytes after the file is gone.
            key = file_key(filename)
            used = {**record.used, key: record.used.get(key) or gone.sha256 or ""}
            files = tuple(f for f in page.files if f.filename != filename)
            # The record first: once it is committed the file is gone for readers.
            return Change(Record(_with_versions(page, files), used), None,
                          removed=(filename + ".metadata", filename))

        await self.records.commit(name, decide)

    async def release(self, name: NormalizedName) -> None:
        """Hand a name with no files back to the guard's other rules.

        Raises NotFound for a name that is not private, BadRequest if files remain.
        """
        await self._existing(name)

        def decide(record: Record | None) -> Change[None]:
            page = _page_or_missing(name, record)
            if page.files:
                raise BadRequest(
                    f"{name} still has {len(page.files)} file(s); delete them before releasing"
                )
            assert record is not None
            # The name goes back to the guard's other rules, but a file name once
            # used keeps its bytes: should the name be published here again, its
            # old files cannot come back different (the record outlives the page).
            return Change(Record(None, record.used), None)

        await self.records.commit(name, decide)


def _page_or_missing(name: NormalizedName, record: Record | None) -> ProjectPage:
    if record is None or record.page is None:
        raise NotFound(f"No private project {name}")
    return record.page


def _with_versions(page: ProjectPage, files: tuple[FileEntry, ...]) -> ProjectPage:
    versions: dict[str, None] = {}
    for f in files:
        v = guess_version(f.filename, page.name)
        if v is not None:
            versions[v] = None
    return replace(page, files=files, versions=tuple(versions))


def _is_duplicate(page: ProjectPage, used: Used, key: str, entry: FileEntry) -> bool:
    """True for the same bytes under the same key (a no-op).

    Raises FileExists for other bytes under a key listed now or used before.
    """
    for f in page.files:
        if file_key(f.filename) != key:
            continue
        if f.sha256 == entry.sha256:
            return True
        raise FileExists(
            f"File already exists: {entry.filename} is the same file as {f.filename} "
            "to installers, uploaded before with different contents; bump the version "
            "instead"
        )
    if used.get(key, entry.sha256) != entry.sha256:
        raise FileExists(
            f"File already exists: {entry.filename} was published before (and since "
            "deleted) with different contents; a file name never comes back with other "
            "bytes: bump the version instead"
        )
    return False


def _consume(flight: asyncio.Future[bool]) -> None:
    """A check nobody waits for: a store that cannot answer now is asked again
    by the next request (its last answer stands meanwhile)."""
    if flight.cancelled():
        return
    exc = flight.exception()
    if exc is not None and not isinstance(exc, ServiceUnavailable):
        log.error("background store check failed", exc_info=exc)
