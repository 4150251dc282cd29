"""A change counter that every worker process reads without a system call.

The private store bumps it around each write; readers keep what they learned
from the disk (is this name private? its parsed index.json) for as long as the
counter has not moved. The counter is 8 bytes of a file mapped MAP_SHARED, so a
read is a memory load, and a bump by one worker is visible to every other at
once. The profile of a warm page showed a stat of index.json per request (17%
of a request's CPU): this replaces it.

Writers follow a sequence lock: the value is odd while a write is under way
(readers then trust nothing they cache), even when the store is at rest. Writes
are serialized by a flock on the same file, which the kernel releases if a
writer dies; a writer that finds an odd value (a dead predecessor) simply moves
on to the next odd one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SIZE = 8


class Generation:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Blocks really allocated, not a sparse file: a store of a mapped page
            # that the disk has no room for is a SIGBUS, not an error to handle.
            if os.fstat(fd).st_size < _SIZE:
                os.pwrite(fd, bytes(_SIZE), 0)
            os.posix_fallocate(fd, 0, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def read(self) -> int:
        """The current value; odd while some worker is writing."""
        return int.from_bytes(self._map[:_SIZE], "little")

    def _write(self, value: int) -> None:
        self._map[:_SIZE] = value.to_bytes(_SIZE, "little")

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around a change to the store. Blocking: call from a worker thread."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = self.read()
            value += 1 if value % 2 == 0 else 2
            self._write(value)
            try:
                yield
            finally:
                self._write(value + 1)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def bump(self) -> None:
        """Move the counter by one whole write (readers forget what they kept).
        Blocking: call from a worker thread."""
        with self.writing():
            pass

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
