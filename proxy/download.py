"""One upstream file transfer, shared by every client waiting for it.

Readers take the newest bytes from memory the moment they arrive and older
ones from the growing temp file; the last byte is held back until the hash is
checked, so a tampered file never reaches a client whole. When the
cache disk fails mid-transfer (full, most likely), the file is still served but
not cached: what reached the temp file stays readable there, and the rest
passes through a small in-memory window that moves at the pace of the slowest
reader (see SPILL_BYTES), so memory stays bounded for any file size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import ProxyError, UpstreamUnavailable

log = logging.getLogger("indexguard.cache")

# A reader's read from the temp file, held in memory until its client took
# it. 1 MiB sent a lone 20 MiB cold file ~15% sooner (fewer thread hops), but
# a 100-client burst on one cold file then peaked ~100 MiB higher
# (tests/faults/test_load.py: 258 vs 160 MiB).
CHUNK = 256 * 1024
# The most a reader takes from the file in one sendfile: it moves on (and lets
# a spilling writer move on) at least this often.
SPAN = 8 * 2**20
# Per transfer: the most recent bytes kept in memory for readers at the head.
RECENT_BYTES = 2 * 2**20
# Once the cache disk fails, a transfer keeps at most this much of the file in
# memory for its readers and waits for the slowest one before reading more from
# upstream. Per transfer; transfers are capped by the upstream connection limit.
SPILL_BYTES = 4 * 2**20
# How long a spilling transfer waits for a reader that stopped reading before it
# drops that reader (its client sees a cut connection) so the others go on.
LAGGARD_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Bytes a reader takes straight from the transfer's file (by sendfile)."""

    file: IO[bytes]
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


def _slice(chunks: deque[tuple[int, bytes]], pos: int, limit: int) -> bytes | None:
    """The bytes from pos (up to limit, at most one chunk's worth) if held in chunks."""
    for offset, data in chunks:
        if offset <= pos < offset + len(data):
            if pos == offset and limit >= offset + len(data):
                return data  # the whole chunk: no copy
            return data[pos - offset : min(len(data), limit - offset)]
    return None


class _Reader:
    """One client's position in a Download."""

    __slots__ = ("dropped", "opened", "pos")

    def __init__(self) -> None:
        self.pos = 0
        self.dropped = False
        self.opened = False


class Download:
    """One upstream file transfer into a temp file, shared by every waiting client."""

    def __init__(self, sha256: str, tmp: Path, size_hint: int | None) -> None:
        self.sha256 = sha256
        self.tmp = tmp
        self.total = size_hint
        # The most bytes this transfer may take (None: no limit of its own).
        self.limit: int | None = None
        # Bytes readers may have: received, and in memory, the file or the spill.
        self.written = 0
        # Of those, the bytes in the temp file's kernel buffers, where a reader
        # behind the memory window reads them (at most written).
        self.in_file = 0
        self.finished = False
        self.error: ProxyError | None = None
        self.final: Path | None = None
        # (st_dev, st_ino) of the temp file, once known: readers open only that one.
        self.ident: tuple[int, int] | None = None
        self.started = asyncio.Event()
        self._changed = asyncio.Event()
        # None while every byte goes to the temp file. Once the disk fails: how
        # many bytes made it there; the rest is in _spill, (offset, bytes) oldest
        # first, and the file will not be cached.
        self.on_disk: int | None = None
        self._spill: deque[tuple[int, bytes]] = deque()
        self._spill_bytes = 0
        # The newest bytes, (offset, bytes) oldest first: at least RECENT_BYTES,
        # and every byte not yet in the file. A reader keeping up with the
        # transfer (the usual one) takes them from here as they arrive, neither
        # waiting for the thread that hashes and writes them nor reading them
        # back from the file through a thread hop per read.
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_bytes = 0
        self._readers: set[_Reader] = set()
        self._progress = asyncio.Event()

    def notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    @property
    def joinable(self) -> bool:
        """False once bytes a new reader would need are gone (spilled, then dropped)."""
        if self.on_disk is None:
            return True
        first = self._spill[0][0] if self._spill else self.written
        return first == self.on_disk

    async def _open(self) -> IO[bytes]:
        # The final name is set before the rename, so one of these three finds
        # the file on one side of it or the other. Each name is read when it is
        # tried (the writer may rename while a try is in a thread), and a round
        # that missed while the names moved is tried again.
        names: tuple[Path | None, Path] | None = None
        while names != (self.final, self.tmp):
            names = (self.final, self.tmp)
            for attempt in range(3):
                path = self.tmp if attempt == 1 else self.final
                if path is None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    fh = await asyncio.to_thread(open, path, "rb", buffering=0)
                    if path == self.final or self._is_ours(fh):
                        return fh
                    await asyncio.to_thread(fh.close)
        raise self.error or UpstreamUnavailable("Upstream download vanished")

    def _is_ours(self, fh: IO[bytes]) -> bool:
        # Another transfer may have taken over the temp name (a new owner after
        # this one let go); its unverified bytes must not pass for ours. The
        # final name is always safe: only verified bytes ever get it.
        if self.ident is None:
            return True
        st = os.fstat(fh.fileno())
        return (st.st_dev, st.st_ino) == self.ident

    def receive(self, chunk: bytes) -> None:
        """A chunk from upstream, readable now, at offset `written`."""
        self._recent.append((self.written, chunk))
        self._recent_bytes += len(chunk)
        self.written += len(chunk)
        self._forget()

    def filed(self, size: int) -> None:
        """The temp file now holds the first size bytes."""
        self.in_file = size
        self._forget()

    def _forget(self) -> None:
        # Only bytes a reader can find elsewhere (the file, or the spill once
        # the disk failed) leave memory.
        recent = self._recent
        while self._recent_bytes > RECENT_BYTES and len(recent) > 1:
            offset, data = recent[0]
            if self.on_disk is None and offset + len(data) > self.in_file:
                return
            recent.popleft()
            self._recent_bytes -= len(data)

    async def verified(self) -> int:
        """Until every byte has arrived and matched the sha256: the file's size.
        Raises the transfer's error."""
        while True:
            changed = self._changed
            if self.finished:
                break
            await changed.wait()
        if self.error is not None:
            raise self.error
        return self.written

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """While inside, an uncommitted temp file is not removed (wait_for_openers
        waits for this holder as for a reader yet to open it); holds no bytes."""
        holder = _Reader()
        holder.pos = sys.maxsize  # never the reader a spilling writer waits for
        self._readers.add(holder)
        try:
            yield
        finally:
            self._readers.discard(holder)
            self._progress.set()

    def have_file(self, size: int) -> None:
        """Every byte up to size is readable from the file (another worker's, or committed)."""
        self.written = self.in_file = size

    async def chunks(
        self, start: int = 0, stop: int | None = None, *, spans: bool = False,
    ) -> AsyncGenerator[bytes | FileSpan, None]:
        """The file's bytes from offset start (up to stop) as they arrive.

        With spans, bytes a reader must take from the file come as FileSpans
        for the consumer to sendfile; else they are read here. Raises the
        download's error, if any.
        """
        # Registered before the first await: the writer never drops spilled
        # bytes that a client which has already joined still needs.
        reader = _Reader()
        reader.pos = start
        self._readers.add(reader)
        fh: IO[bytes] | None = None
        try:
            await self.started.wait()
            if self.error is not None:
                raise self.error
            while True:
                changed = self._changed
                if self.error is not None:
                    raise self.error
                if reader.dropped:
                    raise UpstreamUnavailable(
                        "Client too slow for an uncached transfer (the proxy's disk is full)"
                    )
                # Hold the last byte back until the hash is verified.
                limit = self.written if self.finished else self.written - 1
                if stop is not None:
                    limit = min(limit, stop)
                if reader.pos < limit:
                    data: bytes | FileSpan | None = _slice(self._recent, reader.pos, limit)
                    if data is None and self.on_disk is not None and reader.pos >= self.on_disk:
                        data = _slice(self._spill, reader.pos, limit)
                        if data is None:
                            raise UpstreamUnavailable("Uncached transfer moved on without us")
                    if data is None:
                        # Not in memory, so in the file: memory lets go of no
                        # byte the file does not hold (see _forget).
                        if fh is None:
                            fh = await self._open()
                            reader.opened = True
                            self._progress.set()
                        count = min(limit, self.in_file) - reader.pos
                        if spans:
                            data = FileSpan(fh, reader.pos, min(count, SPAN))
                        else:
                            data = await asyncio.to_thread(
                                os.pread, fh.fileno(), min(count, CHUNK), reader.pos
                            )
                            if not data:
                                raise UpstreamUnavailable("Upstream download was cut short")
                    reader.pos += len(data)
                    self._progress.set()
                    yield data
                    continue
                if self.finished or (stop is not None and reader.pos >= stop):
                    return
                await changed.wait()
        finally:
            self._readers.discard(reader)
            self._progress.set()
            if fh is not None:
                await asyncio.to_thread(fh.close)

    async def wait_for_openers(self, timeout: float) -> None:
        """Until every reader that will read the temp file has opened it (or left).

        Called before an uncommitted temp file is removed: a reader's own
        descriptor keeps the bytes readable after the unlink, a name does not.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.on_disk != 0 and any(not r.opened for r in self._readers):
            self._progress.clear()
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=min(left, 1.0))

    def spill(self, offset: int, chunk: bytes) -> None:
        """Keep a chunk in memory for the readers (the disk has failed)."""
        self._spill.append((offset, chunk))
        self._spill_bytes += len(chunk)

    def _trim(self) -> None:
        """Forget spilled bytes every reader has passed, while over SPILL_BYTES."""
        low = min((r.pos for r in self._readers), default=None)
        while self._spill and self._spill_bytes > SPILL_BYTES:
            offset, data = self._spill[0]
            if low is not None and offset + len(data) > low:
                return
            self._spill.popleft()
            self._spill_bytes -= len(data)

    async def make_room(self) -> None:
        """Writer side while spilling: wait until the window has room again.

        A reader stuck at the window's start for LAGGARD_GRACE is dropped.
        Raises UpstreamUnavailable when nobody is left to read the rest.
        """
        loop = asyncio.get_running_loop()
        low_seen, since = -1, loop.time()
        while True:
            self._trim()
            if not self._readers and not self.joinable:
                raise UpstreamUnavailable("Uncached transfer abandoned by every client")
            if self._spill_bytes <= SPILL_BYTES or not self._readers:
                return
            low = min(r.pos for r in self._readers)
            if low != low_seen:
                low_seen, since = low, loop.time()
            elif loop.time() - since >= LAGGARD_GRACE:
                for r in [r for r in self._readers if r.pos == low]:
                    r.dropped = True
                    self._readers.discard(r)
                log.warning("dropped a stalled reader of an uncached transfer",
                            extra={"sha256": self.sha256})
                self.notify()
                continue
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=1.0)
