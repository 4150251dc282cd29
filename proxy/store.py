"""The private store: published files, their metadata, and reserved names.

Layout under <data_dir>/private/<normalized name>/:
    index.json        the project's files (the source of truth; replaced atomically),
                      and "used": every file key (dists.file_key) ever stored with its
                      sha256, so a file name never comes back with other bytes
    files/<filename>  and files/<filename>.metadata (PEP 658)
    .lock             flock target: serializes writers across worker processes
    released.json     after an admin released the name: the "used" record alone
A project directory with an index.json is private, even with no files left: a
deleted name is not handed back to upstream until an admin releases it.
Writes happen in worker threads, each inside Generation.writing(); reads trust
what they learned from the disk (is a name private, its parsed index.json) until
the shared generation moves, so a warm read makes no system call at all.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal

import orjson
from packaging.utils import NormalizedName

from .dists import file_key, guess_version
from .errors import BadRequest, FileExists, NotFound
from .fsutil import commit, commit_new, fsync_dir, safe_join, sweep_temp, write_atomic
from .generation import Generation
from .model import FileEntry, ProjectPage

AddOutcome = Literal["stored", "duplicate"]
# file key -> sha256 of the bytes first stored under it
Used = dict[str, str]
_INDEX = "index.json"
# What a released name leaves behind: the files it used, and their sha256.
_RELEASED = "released.json"
_GENERATION = ".generation"
# Names whose private-or-not answer is remembered between store changes.
_KNOWN_NAMES = 100_000


class PrivateStore:
    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        # name -> ((mtime_ns, size), page, generation it was last checked at):
        # parsed index.json, trusted without a stat while the generation stays.
        self._pages: dict[str, tuple[tuple[int, int], ProjectPage, int]] = {}
        self._names: tuple[int, list[NormalizedName]] | None = None
        self._gen: Generation | None = None
        # What the disk said, valid while the generation stays at _seen.
        self._seen = -1
        self._private: dict[str, bool] = {}

    def open(self) -> int:
        """Create directories; sweep temp files and unlisted files left by a crash.

        Blocking; returns how many files were removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._gen = Generation(self.root / _GENERATION)
        removed = sweep_temp(self.root) + sweep_temp(self.tmp_dir)
        for name in self._scan_names():
            removed += self._sweep_orphans(name)
        return removed

    def _sweep_orphans(self, name: NormalizedName) -> int:
        """Files committed by an upload that died before its index commit."""
        removed = 0
        with self._locked(self._project_dir(name)):
            page = self._read_index(name)
            listed = {f.filename for f in page.files} if page is not None else set()
            listed |= {f + ".metadata" for f in listed}
            for entry in os.scandir(self._project_dir(name) / "files"):
                if entry.name not in listed:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # --- reads -------------------------------------------------------------------

    def _project_dir(self, name: NormalizedName) -> Path:
        return safe_join(self.root, name)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def _at_rest(self) -> bool:
        """Whether what this process remembers still holds. Forgets it otherwise.

        False also while a write is under way anywhere (odd generation): then
        every read goes to the disk and nothing is remembered.
        """
        gen = self._gen.read() if self._gen is not None else 1
        if gen != self._seen:
            self._private.clear()
            self._seen = gen
        return gen % 2 == 0

    def _has_index(self, name: NormalizedName) -> bool:
        """The disk's answer, for the writers (worker threads): what this process
        remembers belongs to the event loop's thread alone."""
        return os.path.exists(self.root / name / _INDEX)

    def is_private(self, name: NormalizedName) -> bool:
        """True when the name has, or ever had, private files. On the loop only."""
        at_rest = self._at_rest()
        known = self._private.get(name)
        if known is not None:
            return known
        # Read after the generation: a change that lands in between moves the
        # generation past _seen, and the next call forgets this answer.
        private = self._has_index(name)
        if at_rest:
            if len(self._private) >= _KNOWN_NAMES:
                self._private.clear()
            self._private[name] = private
        return private

    async def page(self, name: NormalizedName) -> ProjectPage | None:
        at_rest = self._at_rest()
        gen = self._seen  # read before the stat
        cached = self._pages.get(name)
        if at_rest and cached is not None and cached[2] == gen:
            return cached[1]
        index = self.root / name / _INDEX
        try:
            st = os.stat(index)
        except (FileNotFoundError, NotADirectoryError):
            self._pages.pop(name, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        if cached is not None and cached[0] == key:
            page = cached[1]
        else:
            read = await asyncio.to_thread(self._read_index, name)
            if read is None:
                return None
            page = read
        # Checked at gen only if no write happened between the stat and now.
        unchanged = at_rest and self._gen is not None and self._gen.read() == gen
        self._pages[name] = (key, page, gen if unchanged else -1)
        return page

    def _read_index(self, name: NormalizedName) -> ProjectPage | None:
        return self._read_record(name)[0]

    def _read_record(self, name: NormalizedName) -> tuple[ProjectPage | None, Used]:
        """The page and the used-file record (absent before this record existed)."""
        try:
            data = orjson.loads((self.root / name / _INDEX).read_bytes())
        except FileNotFoundError:
            # Released, or never private: only the record of used files, if any.
            try:
                data = orjson.loads((self.root / name / _RELEASED).read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                return None, {}
            raw = data.get("used") if isinstance(data, dict) else None
            return None, (
                {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
                if isinstance(raw, dict) else {}
            )
        raw = data.get("used")
        used = (
            {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(raw, dict) else {}
        )
        return ProjectPage.from_json(data), used

    async def names(self) -> list[NormalizedName]:
        """Every private (or reserved-by-history) project name, sorted."""
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

    # --- writes --------------------------------------------------------------------

    async def add(
        self, name: NormalizedName, entry: FileEntry, content: Path, metadata: bytes | None
    ) -> AddOutcome:
        """Commit an uploaded file (content is a fsynced temp file, consumed here).

        Filenames are compared by dists.file_key (normalized name, version and
        tags): the same key with identical sha256 -> "duplicate" (a no-op, PyPI's
        contract). Raises FileExists when the key is, or ever was, taken by
        different bytes; a deleted file may come back only with its own bytes.
        """
        return await asyncio.to_thread(self._add, name, entry, content, metadata)

    def _add(
        self, name: NormalizedName, entry: FileEntry, content: Path, metadata: bytes | None
    ) -> AddOutcome:
        pdir = self._project_dir(name)
        try:
            with self._locked(pdir):
                known, used = self._read_record(name)
                page = known or ProjectPage(name=name, files=())
                key = file_key(entry.filename)
                if self._is_duplicate(page, used, key, entry):
                    return "duplicate"
                used = {**used, key: used.get(key) or entry.sha256 or ""}
                final = self.file_path(name, entry.filename)
                meta_path = final.with_name(final.name + ".metadata")
                try:
                    if metadata is not None:
                        write_atomic(meta_path, metadata, self.tmp_dir)
                    if not commit_new(content, final):
                        # A file with no index entry is a leftover of a crash between
                        # the file commit and the index commit: the index is the truth.
                        commit(content, final)
                    self._write_index(
                        replace(page, files=(*page.files, entry), versions=()), used
                    )
                except BaseException:
                    # Not listed, so not visible: remove it rather than leave an
                    # orphan (the name was checked free above, under the lock).
                    final.unlink(missing_ok=True)
                    meta_path.unlink(missing_ok=True)
                    raise
                if known is None:
                    # names() trusts the root's mtime; the directory may have been
                    # created before this index existed, so mark the root changed.
                    os.utime(self.root)
                return "stored"
        finally:
            content.unlink(missing_ok=True)

    @staticmethod
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

    def _write_index(self, page: ProjectPage, used: Used) -> None:
        """Page and used-file record in one atomic write: neither is ever ahead."""
        pdir = self._project_dir(page.name)
        versions: dict[str, None] = {}
        for f in page.files:
            v = guess_version(f.filename, page.name)
            if v is not None:
                versions[v] = None
        page = replace(page, versions=tuple(versions))
        data = {**page.to_json(), "used": used}
        write_atomic(pdir / _INDEX, orjson.dumps(data), self.tmp_dir)

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

    async def set_yanked(self, name: NormalizedName, version: str, yanked: bool | str) -> int:
        """Yank or unyank every file of a release (PEP 592). Returns files changed.

        Raises NotFound when the release has no files here.
        """
        return await asyncio.to_thread(self._set_yanked, name, version, yanked)

    def _set_yanked(self, name: NormalizedName, version: str, yanked: bool | str) -> int:
        if not self._has_index(name):
            raise NotFound(f"No private project {name}")
        with self._locked(self._project_dir(name)):
            known, used = self._read_record(name)
            page = known or ProjectPage(name=name, files=())
            hits = [f for f in page.files if guess_version(f.filename, name) == version]
            if not hits:
                raise NotFound(f"No files for {name} {version}")
            files = tuple(
                f.with_yank(yanked) if f in hits else f for f in page.files
            )
            self._write_index(replace(page, files=files), used)
            return len(hits)

    async def delete(self, name: NormalizedName, filename: str) -> None:
        """Remove one file; the name stays private. Raises NotFound."""
        await asyncio.to_thread(self._delete, name, filename)

    def _delete(self, name: NormalizedName, filename: str) -> None:
        if not self._has_index(name):
            raise NotFound(f"No private project {name}")
        with self._locked(self._project_dir(name)):
            known, used = self._read_record(name)
            page = known or ProjectPage(name=name, files=())
            gone = page.file(filename)
            if gone is None:
                raise NotFound(f"No file {filename} in {name}")
            # Remembered even when stored before the record existed: the name
            # stays bound to these bytes after the file is gone.
            key = file_key(filename)
            used = {**used, key: used.get(key) or gone.sha256 or ""}
            # Index first: once it is committed the file is gone for readers.
            self._write_index(
                replace(page, files=tuple(f for f in page.files if f.filename != filename)),
                used,
            )
            path = self.file_path(name, filename)
            path.with_name(path.name + ".metadata").unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    async def release(self, name: NormalizedName) -> None:
        """Hand a name with no files back to the guard's other rules.

        Raises NotFound for a name that is not private, BadRequest if files remain.
        """
        await asyncio.to_thread(self._release, name)

    def _release(self, name: NormalizedName) -> None:
        pdir = self._project_dir(name)
        if not self._has_index(name):
            raise NotFound(f"No private project {name}")
        with self._locked(pdir):
            page = self._read_index(name)
            if page is not None and page.files:
                raise BadRequest(
                    f"{name} still has {len(page.files)} file(s); delete them before releasing"
                )
            _known, used = self._read_record(name)
            # The name goes back to the guard's other rules, but a file name once
            # used keeps its bytes: should the name be published here again, its
            # old files cannot come back different (the record outlives the index).
            write_atomic(pdir / _RELEASED, orjson.dumps({"used": used}), self.tmp_dir)
            (pdir / _INDEX).unlink(missing_ok=True)
            fsync_dir(pdir)
        os.utime(self.root)  # names() trusts the root's mtime
