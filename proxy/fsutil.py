"""Atomic file commits and path safety. Blocking functions: call them off the loop.

A commit is temp file in the same directory tree -> fsync -> rename -> fsync of
the directory, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path
from typing import IO, Protocol

from .errors import InsufficientStorage, NotFound

TMP_PREFIX = ".tmp-"


def safe_join(root: Path, *parts: str) -> Path:
    """root/parts, refusing anything that would leave root. Raises NotFound."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise NotFound("Not found")
    path = root.joinpath(*parts)
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root):
        raise NotFound("Not found")
    return path


def temp_path(tmp_dir: Path, hint: str = "") -> Path:
    # The writer's pid is in the name so that a worker starting up sweeps only
    # the leftovers of dead processes, never a live sibling's upload.
    return tmp_dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{hint}"


def _writer_alive(name: str) -> bool:
    pid_text = name[len(TMP_PREFIX):].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():  # sweeping happens before this process writes any
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def write_and_hash(fh: IO[bytes], chunk: bytes, *hashers: Hasher) -> None:
    """Write all of chunk (an unbuffered file may take part of it) and hash it."""
    view = memoryview(chunk)
    while view:
        written = fh.write(view)
        view = view[written:]
    for hasher in hashers:
        hasher.update(chunk)


def fsync_file(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_sized(path: Path) -> tuple[IO[bytes], int]:
    """A file opened for reading (unbuffered, for sendfile) and its size."""
    fh = open(path, "rb", buffering=0)  # noqa: SIM115 - the reader closes it
    try:
        return fh, os.fstat(fh.fileno()).st_size
    except OSError:
        fh.close()
        raise


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written, fsynced temp file visible under its final name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def commit_new(tmp: Path, final: Path) -> bool:
    """Like commit, but never replaces: False when final already exists.

    os.link fails with EEXIST atomically, so two racing writers cannot both win.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, final)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return True


def write_atomic(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write bytes to final atomically. Raises InsufficientStorage when the disk is full."""
    tmp = temp_path(tmp_dir or final.parent, ".part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise_if_full(exc)
        raise


def raise_if_full(exc: OSError) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise InsufficientStorage("Insufficient storage on the proxy: disk full") from exc


def sweep_temp(root: Path, older_than: float = 0.0) -> int:
    """Remove temp files below root left by processes that are gone. Returns the count."""
    removed = 0
    cutoff = time.time() - older_than
    if not root.exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(TMP_PREFIX) and not _writer_alive(name):
                path = Path(dirpath, name)
                try:
                    if path.stat().st_mtime <= cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed
