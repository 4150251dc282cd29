"""The local backend of a private index: records and files under one directory.

Layout under <root>/<normalized name>/:
    index.json        the project's files (the source of truth; replaced atomically),
                      and "used": every file key (dists.file_key) ever stored with its
                      sha256, so a file name never comes back with other bytes
    files/<filename>  and files/<filename>.metadata (PEP 658)
    .lock             flock target: serializes writers across worker processes
    released.json     after an admin released the name: the "used" record alone
A project directory with an index.json is private, even with no files left.
Writers run in worker threads, each under the project's flock and inside
Generation.writing() (the change feed, shared by the workers of one host).
Start-up reads no project: what a crash left in one (a file committed by an
upload that died before its index commit, a temp file) is swept under the
project's lock on this process's first write to it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from packaging.utils import NormalizedName

from .fsutil import (
    commit,
    commit_new,
    fsync_dir,
    open_sized,
    safe_join,
    sweep_temp,
    write_atomic,
)
from .generation import Generation
from .model import ProjectPage
from .storage import Decide, LocalFile, Record, StoredFile, T, Used

_INDEX = "index.json"
# What a released name leaves behind: the files it used, and their sha256.
_RELEASED = "released.json"
_GENERATION = ".generation"


class LocalRecords:
    """storage.ProjectRecords over a directory (see the module docstring)."""

    remote = False

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self._gen: Generation | None = None
        # name -> ((mtime_ns, size) of index.json, record): parsed once per change.
        self._parsed: dict[str, tuple[tuple[int, int], Record]] = {}
        self._names: tuple[int, list[NormalizedName]] | None = None
        # Projects this process swept (or created) since it started.
        self._swept: set[str] = set()

    def open(self) -> int:
        """Create directories; sweep temp files in tmp/. Reads no project.

        Blocking; returns how many files were removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._gen = Generation(self.root / _GENERATION)
        return sweep_temp(self.tmp_dir)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    # --- reads -------------------------------------------------------------------

    def version(self) -> int:
        return self._gen.read() if self._gen is not None else 0

    def _project_dir(self, name: NormalizedName) -> Path:
        return safe_join(self.root, name)

    def peek_private(self, name: NormalizedName) -> bool:
        # A stat on the loop: what the store remembers saves it on a warm path.
        return os.path.exists(self.root / name / _INDEX)

    async def learn(self, name: NormalizedName) -> Record | None:
        return await self.read(name)

    async def read(self, name: NormalizedName) -> Record | None:
        index = self.root / name / _INDEX
        try:
            st = os.stat(index)
        except (FileNotFoundError, NotADirectoryError):
            self._parsed.pop(name, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        record = await asyncio.to_thread(self._read_record, name)
        if record.page is None:  # released between the stat and the read
            return None
        self._parsed[name] = (key, record)
        return record

    def _read_record(self, name: NormalizedName) -> Record:
        """The record as on disk; page None for a released (or never private) name."""
        try:
            data = orjson.loads((self.root / name / _INDEX).read_bytes())
        except FileNotFoundError:
            try:
                data = orjson.loads((self.root / name / _RELEASED).read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                return Record(None, {})
            return Record(None, _used(data))
        return Record(ProjectPage.from_json(data), _used(data))

    async def names(self) -> list[NormalizedName]:
        try:
            mtime = os.stat(self.root).st_mtime_ns
        except FileNotFoundError:
            return []
        if self._names is not None and self._names[0] == mtime:
            return self._names[1]
        names = await asyncio.to_thread(self._scan_names)
        self._names = (mtime, names)
        return names

    def _scan_names(self) -> list[NormalizedName]:
        return sorted(
            NormalizedName(e.name) for e in os.scandir(self.root)
            if e.is_dir() and (Path(e.path) / _INDEX).exists()
        )

    def file_path(self, name: NormalizedName, filename: str) -> Path:
        return safe_join(self._project_dir(name), "files", filename)

    async def open_file(
        self, name: NormalizedName, filename: str, sha256: str | None, redirect: bool = False,
    ) -> StoredFile | None:
        try:
            fh, size = await asyncio.to_thread(open_sized, self.file_path(name, filename))
        except FileNotFoundError:  # deleted since the page was read
            return None
        return LocalFile(fh, size, "private", sha256)

    # --- writes ------------------------------------------------------------------

    async def commit(self, name: NormalizedName, decide: Decide[T]) -> T:
        return await asyncio.to_thread(self._commit, name, decide)

    def _commit(self, name: NormalizedName, decide: Decide[T]) -> T:
        pdir = self._project_dir(name)
        with self._locked(pdir):
            if name not in self._swept:
                self._sweep(name)
                self._swept.add(name)
            before = self._read_record(name)
            change = decide(before if before.page is not None or before.used else None)
            if change.record is None:
                return change.result
            written: list[Path] = []
            try:
                for new in change.added:
                    path = self.file_path(name, new.filename)
                    written.append(path)
                    if isinstance(new.content, bytes):
                        write_atomic(path, new.content, self.tmp_dir)
                    elif not commit_new(new.content, path):
                        # A file with no index entry is a leftover of a crash between
                        # the file commit and the index commit: the index is the truth.
                        commit(new.content, path)
                self._write(pdir, change.record)
            except BaseException:
                # Not listed, so not visible: remove them rather than leave orphans
                # (decide checked the names free, under the lock).
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            for filename in change.removed:
                self.file_path(name, filename).unlink(missing_ok=True)
        if (before.page is None) != (change.record.page is None):
            # names() trusts the root's mtime; the directory may have been
            # created before this index existed, so mark the root changed.
            os.utime(self.root)
        return change.result

    def _write(self, pdir: Path, record: Record) -> None:
        """Page and used-file record in one atomic write: neither is ever ahead."""
        if record.page is None:
            # The record outlives the index: should the name be published here
            # again, its old files cannot come back with other bytes.
            write_atomic(pdir / _RELEASED, orjson.dumps({"used": record.used}), self.tmp_dir)
            (pdir / _INDEX).unlink(missing_ok=True)
            fsync_dir(pdir)
            return
        data = {**record.page.to_json(), "used": record.used}
        write_atomic(pdir / _INDEX, orjson.dumps(data), self.tmp_dir)

    def _sweep(self, name: NormalizedName) -> int:
        """What a crash left in the project: temp files, and files committed by an
        upload that died before its index commit. Under the project's lock."""
        pdir = self._project_dir(name)
        removed = sweep_temp(pdir)
        page = self._read_record(name).page
        listed = {f.filename for f in page.files} if page is not None else set()
        listed |= {f + ".metadata" for f in listed}
        with os.scandir(pdir / "files") as entries:
            for entry in entries:
                if entry.name not in listed:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    @contextmanager
    def _locked(self, pdir: Path) -> Iterator[None]:
        created = not pdir.exists()
        (pdir / "files").mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(self.root)
        with open(pdir / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                if self._gen is None:
                    yield
                else:
                    with self._gen.writing():
                        yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _used(data: object) -> Used:
    raw = data.get("used") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}

