"""Following another worker's transfer of a file: tail its temp file until it commits.

The owner (the process holding the hash's lock, see hashlock.py) writes
tmp/<sha256>.part and renames it to the final name once verified, before it
lets go of the lock. A follower only watches the file system and the lock; it
never writes, and a transfer it cannot vouch for ends in an error (the
clients retry, and by then the file is cached or has a new owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .download import Download
from .errors import UpstreamUnavailable

# How often a follower looks; a stat or two per look.
POLL = 0.02
# How long the lock may be held with no growth before a follower gives up. The
# owner's own read timeout (upstream.timeout, 30 s by default) and its wait for
# late readers (10 s) normally end a stuck transfer well before this: this is
# the backstop for an owner that hangs.
STALL = 90.0


@dataclass(slots=True)
class _Look:
    part: os.stat_result | None  # the temp name
    final: os.stat_result | None  # the final name, looked at after the temp name
    size: int | None  # of the file we track (through our descriptor)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _look(part: Path, final: Path, fd: int | None) -> _Look:
    # Temp name first: a rename between the two stats then shows as "final
    # exists", never as "both gone".
    found_part = _stat(part)
    found_final = _stat(final)
    return _Look(found_part, found_final, None if fd is None else os.fstat(fd).st_size)


def _open(path: Path) -> tuple[int, tuple[int, int], int] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    st = os.fstat(fd)
    return fd, (st.st_dev, st.st_ino), st.st_size


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Tail:
    """The temp file a follower tracks.

    Trusted once seen growing: only a live owner writes, so a file left by a
    dead one (about to be replaced by its new owner) never passes for the
    transfer. Our descriptor keeps the inode number from being reused.
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.size = 0
        self.trusted = False

    def is_commit(self, final: os.stat_result) -> bool:
        """Whether the final file is the one we tracked (or we promised nothing yet)."""
        return not self.trusted or _ident(final) == self.ident

    async def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)


async def follow(
    dl: Download, final: Path, lock_free: Callable[[], bool], stall: float = STALL,
) -> None:
    """Feed dl from another process's transfer until its file is committed.

    Returns with dl holding the committed size (the caller marks dl
    finished). Raises UpstreamUnavailable when the owner fails, dies, stalls,
    or a different transfer was committed than the one followed.
    """
    loop = asyncio.get_running_loop()
    tail = _Tail()
    last_growth = loop.time()
    try:
        while True:
            seen = await asyncio.to_thread(_look, dl.tmp, final, tail.fd)
            if seen.final is not None:
                _committed(dl, tail, seen.final)
                return
            if tail.fd is not None and (seen.part is None or _ident(seen.part) != tail.ident):
                if tail.trusted:
                    raise UpstreamUnavailable("The transfer in another worker was abandoned")
                await tail.close()
            if tail.fd is None:
                if seen.part is not None:
                    opened = await asyncio.to_thread(_open, dl.tmp)
                    if opened is not None:
                        tail.fd, tail.ident, tail.size = opened
            elif seen.size is not None and seen.size > tail.size:
                if not tail.trusted:
                    tail.trusted = True
                    dl.ident = tail.ident
                    dl.started.set()
                tail.size = seen.size
                dl.have_file(seen.size)
                dl.notify()
                last_growth = loop.time()
            if lock_free():
                # The owner commits before it lets go: with the lock free, the
                # final name is there now or never will be from this transfer.
                after = await asyncio.to_thread(_stat, final)
                if after is None:
                    raise UpstreamUnavailable("The transfer in another worker failed")
                _committed(dl, tail, after)
                return
            if loop.time() - last_growth > stall:
                raise UpstreamUnavailable("The transfer in another worker stalled")
            await asyncio.sleep(POLL)
    finally:
        with contextlib.suppress(OSError):
            await tail.close()


def _committed(dl: Download, tail: _Tail, final: os.stat_result) -> None:
    if not tail.is_commit(final):
        # Our readers may hold bytes of a transfer that was not the verified one.
        raise UpstreamUnavailable("Another transfer of this file was committed")
    dl.have_file(final.st_size)
