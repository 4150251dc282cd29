"""Cross-process locks, one per sha256: one-byte ranges of a single lock file.

POSIX record locks, because the kernel drops them when their process dies (even
by SIGKILL), so a crashed owner never leaves a lock behind, and one file holds
them all, so nothing piles up per hash. They never wait and never touch the disk.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


def _offset(sha256: str) -> int:
    # 60 bits of the hash: a collision would only make two files share a lock.
    return int(sha256[:15], 16)


class HashLocks:
    """This process's side of the lock file.

    Record locks do not conflict within one process, so this object remembers
    which it holds and refuses to take one twice. Closing any descriptor of the
    file would drop every lock this process holds on it: this object keeps the
    only one, from open() to close().
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._held: set[str] = set()

    def open(self) -> None:
        """Blocking (it opens a file): call at start."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        self._held.clear()
        if fd is not None:
            os.close(fd)

    def _fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError("HashLocks used before open()")
        return self._fd

    def acquire(self, sha256: str) -> bool:
        """Take the hash's lock without waiting. False when any holder, this
        process included, has it."""
        if sha256 in self._held:
            return False
        try:
            fcntl.lockf(self._fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(sha256))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        self._held.add(sha256)
        return True

    def release(self, sha256: str) -> None:
        if sha256 in self._held:
            self._held.discard(sha256)
            fcntl.lockf(self._fileno(), fcntl.LOCK_UN, 1, _offset(sha256))

    def is_free(self, sha256: str) -> bool:
        """Whether nobody holds the hash's lock right now (taken and dropped at once)."""
        if not self.acquire(sha256):
            return False
        self.release(sha256)
        return True
