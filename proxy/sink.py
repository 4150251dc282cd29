"""The temp-file side of one upstream transfer: hash every byte, write it off the loop.

Owns the temp file's descriptor and the transfer's hasher; knows nothing of the
network, of verification or of the cache. Readers may take bytes from memory as
soon as they arrive; from the file only once they are in the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from typing import IO

from .download import Download
from .fsutil import Hasher, fsync_file, write_and_hash

# While one batch is written in a thread, the next gathers from the network; a
# full batch waits for the write before it (backpressure). One thread hop per
# batch instead of per network chunk: each hop can wait for the GIL while the
# loop is busy serving readers, and those waits, not the disk, made cold
# transfers slow.
BATCH = 2**20


class _WriteFailed(Exception):
    def __init__(self, done: int, error: OSError) -> None:
        super().__init__(error)
        self.done = done  # chunks of the batch written and hashed before the error
        self.error = error


def _write_batch(fh: IO[bytes], chunks: list[bytes], hasher: Hasher) -> int:
    for done, chunk in enumerate(chunks):
        try:
            write_and_hash(fh, chunk, hasher)
        except OSError as exc:
            raise _WriteFailed(done, exc) from exc
    return len(chunks)


class Sink:
    """Feeds a Download: its temp file while the disk takes it, then its memory window.

    on_disk_failure is awaited once, when the file cannot take more; the
    download's on_disk is then set by the sink and every later byte is spilled.
    """

    def __init__(
        self, dl: Download, fh: IO[bytes] | None,
        on_disk_failure: Callable[[OSError], Awaitable[None]],
    ) -> None:
        self._dl = dl
        self._fh = fh
        self._on_disk_failure = on_disk_failure
        self._hasher = hashlib.sha256()
        # Bytes in the file or the spill, in order: where the next chunk goes.
        self._placed = 0
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._job: asyncio.Future[int] | None = None
        self._job_chunks: list[bytes] = []

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    async def feed(self, chunk: bytes) -> None:
        """Take the next chunk from upstream. Raises UpstreamUnavailable when spilling
        and no reader is left (see Download.make_room)."""
        if self._fh is None:
            self._spill([chunk])
            self._dl.written += len(chunk)
            self._dl.notify()
            await self._dl.make_room()
            return
        # Readers have it now; the hash and the file catch up in a thread.
        self._dl.receive(chunk)
        self._dl.notify()
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._job is None or self._job.done() or self._batch_bytes >= BATCH:
            await self._settle()
            self._start()
        if self._fh is None:
            await self._dl.make_room()

    async def finish(self) -> None:
        """Every byte fed is now written (or spilled) and hashed."""
        await self._settle()
        self._start()
        await self._settle()

    async def fsync_close(self) -> None:
        """Make the written bytes durable and close the file. Raises OSError."""
        fh, self._fh = self._fh, None
        if fh is not None:
            await asyncio.to_thread(_fsync_close, fh)

    async def abandon(self) -> None:
        """Close the file without syncing; safe to call at any point, even when cancelled."""
        if self._job is not None:
            # The thread may still be writing: closing under it could hit a reused fd.
            await asyncio.wait([self._job])
            if not self._job.cancelled():
                self._job.exception()  # seen here; the transfer has failed anyway
        fh, self._fh = self._fh, None
        if fh is not None:
            await asyncio.to_thread(_close_quietly, fh)

    def _start(self) -> None:
        if self._fh is None or not self._batch:
            return
        chunks, self._batch, self._batch_bytes = self._batch, [], 0
        self._job_chunks = chunks
        self._job = asyncio.ensure_future(
            asyncio.to_thread(_write_batch, self._fh, chunks, self._hasher)
        )

    async def _settle(self) -> None:
        job = self._job
        if job is None:
            return
        try:
            # Shielded: a cancelled transfer must not close the file under the
            # thread still writing it (abandon waits for the thread instead).
            done = await asyncio.shield(job)
        except _WriteFailed as exc:
            self._job = None
            self._advance(self._job_chunks[: exc.done])
            fh, self._fh = self._fh, None
            if fh is not None:
                await asyncio.to_thread(_close_quietly, fh)
            self._dl.on_disk = self._placed
            await self._on_disk_failure(exc.error)
            rest, self._batch, self._batch_bytes = self._job_chunks[exc.done :] + self._batch, [], 0
            self._job_chunks = []
            self._spill(rest)
            return
        self._job = None
        self._advance(self._job_chunks[:done])
        self._job_chunks = []

    def _advance(self, chunks: list[bytes]) -> None:
        if chunks:
            self._placed += sum(len(c) for c in chunks)
            self._dl.filed(self._placed)

    def _spill(self, chunks: list[bytes]) -> None:
        """Hash and keep in memory chunks the file did not take (readers may have
        some of them already, from the memory window)."""
        for chunk in chunks:
            # Hashing a chunk takes well under a millisecond (and releases the
            # GIL): not worth a thread hop.
            self._hasher.update(chunk)
            self._dl.spill(self._placed, chunk)
            self._placed += len(chunk)


def _close_quietly(fh: IO[bytes]) -> None:
    # A failed flush on a full disk: the file is abandoned anyway.
    with contextlib.suppress(OSError):
        fh.close()


def _fsync_close(fh: IO[bytes]) -> None:
    try:
        fsync_file(fh)
    finally:
        fh.close()
