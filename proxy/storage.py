"""What the services ask of storage, whatever holds it: stored files handed to
the web layer, private-index records committed by compare-and-swap, a change feed.

Backends: storage_local.py (data_dir; today's layout) and storage_s3.py (a
bucket shared by replicas). No I/O here, and nothing backend-specific.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Generic, Literal, Protocol, TypeVar

from packaging.utils import NormalizedName

from .model import ProjectPage

Source = Literal["private", "cache", "upstream"]
T = TypeVar("T")
# file key (dists.file_key) -> sha256 of the bytes first stored under it
Used = dict[str, str]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A stored file on this host, already open: sent with sendfile. An eviction
    or a delete after this point cannot take it from the reader. Whoever gets
    one closes it."""

    file: IO[bytes]
    size: int
    source: Source
    sha256: str | None


@dataclass(frozen=True, slots=True)
class StreamedFile:
    """A stored file with no copy on this host: its bytes as a ranged stream.

    read(start, stop) yields bytes [start, stop); it raises errors.ProxyError
    subclasses (UpstreamUnavailable when the store fails mid-way)."""

    size: int
    source: Source
    sha256: str | None
    read: Callable[[int, int], AsyncGenerator[bytes, None]]


@dataclass(frozen=True, slots=True)
class RedirectFile:
    """A stored file a client fetches from the store itself: a short-lived
    presigned URL (storage.s3.redirect_ttl). Only for GET; HEAD is answered here."""

    url: str
    size: int | None
    source: Source
    sha256: str


# What the read path hands the web layer for a stored file: never a Path.
StoredFile = LocalFile | StreamedFile


@dataclass(frozen=True, slots=True)
class Record:
    """One project of a private index: its page, and every file key it ever used.

    page None: the name was released (only `used` is kept, so that a file name
    never comes back with other bytes).
    """

    page: ProjectPage | None
    used: Used


@dataclass(frozen=True, slots=True)
class NewFile:
    """A file a commit adds: a fsynced temp file (consumed) or bytes."""

    filename: str
    sha256: str
    content: Path | bytes


@dataclass(frozen=True, slots=True)
class Change(Generic[T]):
    """What a decision over a project's current record wants written.

    record None: nothing to write (result is answered as is). `added` files are
    stored before the record that lists them is committed; `removed` ones (no
    longer listed) are dropped after it, or left for a later sweep.
    """

    record: Record | None
    result: T
    added: tuple[NewFile, ...] = ()
    removed: tuple[str, ...] = ()


# Sees the latest committed record (None: never private here); returns the
# change, or raises an errors.ProxyError to refuse. May run more than once (a
# lost race re-reads and re-decides), so it must not have side effects.
Decide = Callable[[Record | None], Change[T]]


class ProjectRecords(Protocol):
    """The records of one private index and the files they list.

    commit() is the only writer: backends guarantee that decide sees the latest
    committed record and that its change is committed only if nothing else was
    committed to that project in between (local: a lock; S3: If-Match, re-read
    and re-decide on 412). A reader sees a record and its files whole or not at all.
    """

    # True when peek_private() cannot answer (another host may commit): the
    # store asks learn() before trusting "not private".
    remote: bool

    def version(self) -> int:
        """The change feed: moves whenever a record changes anywhere (this process,
        a sibling worker, another replica). Odd while a local write is under way.
        Cheap (no I/O): read on every request."""
        ...

    def peek_private(self, name: NormalizedName) -> bool | None:
        """Whether the name is private now, if the backend can say without
        waiting (a local stat); None: ask learn()."""
        ...

    async def learn(self, name: NormalizedName) -> Record | None:
        """The record as stored now (bounded by the backend's timeout)."""
        ...

    async def read(self, name: NormalizedName) -> Record | None:
        """The record, from what this process keeps if the feed has not moved."""
        ...

    async def commit(self, name: NormalizedName, decide: Decide[T]) -> T:
        """Decide over the current record and commit the change atomically.
        Raises what decide raises, InsufficientStorage, ServiceUnavailable."""
        ...

    async def names(self) -> list[NormalizedName]:
        """Every private name (a released one is not), sorted."""
        ...

    async def open_file(
        self, name: NormalizedName, filename: str, sha256: str | None, redirect: bool = False,
    ) -> StoredFile | RedirectFile | None:
        """A listed file's bytes; None when they are gone (deleted meanwhile).
        redirect: a RedirectFile is welcome (a GET), if the backend gives them."""
        ...


class SharedFiles(Protocol):
    """Verified files shared by replicas, behind each one's local tier.
    kind: "artifacts" (upstream files) or "blobs" (private files)."""

    async def fetch(self, kind: str, sha256: str, dest: Path, limit: int) -> int | None:
        """Into dest (a new file), verified against sha256: its size; None when
        absent, over limit or not matching. Raises ServiceUnavailable."""
        ...

    async def store(self, kind: str, sha256: str, path: Path) -> None:
        """Share a verified file; already there is fine. Raises ServiceUnavailable."""
        ...

    async def presign(self, kind: str, sha256: str) -> str | None:
        """A short-lived URL a client may GET without credentials; None when
        redirects are off or the file is not shared (yet). Raises ServiceUnavailable."""
        ...


class StoreRefused(Exception):
    """The store cannot be used (unreachable, or it ignores conditional writes):
    one line for the operator, and the server does not start."""
