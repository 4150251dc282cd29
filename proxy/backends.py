"""The storage backend a config names, opened: the private stores, the artifact
cache over it, and (S3) the bucket's background work: the change feed, sweeps.

create_app() opens it before the server listens and closes it last.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import ArtifactCache
from .config import Config
from .fsutil import sweep_temp
from .generation import Generation
from .metrics import Metrics
from .registry import LEGACY_INDEX
from .storage import LocalFile
from .storage_local import LocalRecords
from .store import PrivateStore

if TYPE_CHECKING:
    from .s3_bucket import Bucket
    from .storage_s3 import ChangeFeed


def store_root(data: Path, index: str) -> Path:
    """Where an index's files live: the first version's private/ for `default`
    (a config without `indexes` keeps its store), indexes/<name>/ otherwise."""
    return data / "private" if index == LEGACY_INDEX else data / "indexes" / index


class Storage:
    """What create_app opened for storage.backend: the private stores and the
    artifact cache over it, and the background work of a shared bucket."""

    def __init__(self, artifacts: ArtifactCache, stores: dict[str, PrivateStore], swept: int,
                 ) -> None:
        self.artifacts = artifacts
        self.stores = stores
        self.swept = swept
        self.local: list[LocalRecords] = []
        self.bucket: Bucket | None = None
        self.feed: ChangeFeed | None = None
        self.host: Generation | None = None
        # S3: this host's tier of private files (apart from the artifacts).
        self.blobs: ArtifactCache | None = None
        self._sweeps: asyncio.Task[None] | None = None
        self._scan: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.blobs is not None:
            self._scan = asyncio.create_task(self.blobs.scan())
        if self.feed is not None and self.bucket is not None:
            self.feed.start()
            from .storage_s3 import run_sweeps  # loaded with the bucket (open_storage)

            self._sweeps = asyncio.create_task(run_sweeps(self.bucket, list(self.stores)))

    async def stop(self) -> None:
        if self._scan is not None:
            self._scan.cancel()
        if self._sweeps is not None:
            self._sweeps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeps
        if self.feed is not None:
            await self.feed.stop()

    async def close(self) -> None:
        if self.blobs is not None:
            self.blobs.close()
        for records in self.local:
            records.close()
        if self.bucket is not None:
            await self.bucket.close()
        if self.host is not None:
            self.host.close()


async def open_storage(config: Config, metrics: Metrics) -> Storage:
    """The stores and the artifact cache of storage.backend. Raises StoreRefused
    (S3: unreachable, or a store that ignores conditional writes)."""
    data = config.data_dir
    names = [spec.name for spec in config.registry.indexes]
    if config.storage.backend != "s3":
        artifacts = ArtifactCache(data / "cache" / "files", data / "tmp",
                                  config.cache.max_bytes, metrics)
        await asyncio.to_thread(artifacts.open)
        local = [LocalRecords(store_root(data, name), data / "tmp") for name in names]
        swept = 0
        for records in local:
            swept += await asyncio.to_thread(records.open)
        stores = {name: PrivateStore(records, data / "tmp", absence_ttl=float("inf"))
                  for name, records in zip(names, local, strict=True)}
        storage = Storage(artifacts, stores, swept)
        storage.local = local
        return storage
    # Imported for S3 only: botocore costs every process about 25 MiB and 150 ms
    # at start, and the embedded local default never needs it.
    from .s3_bucket import Bucket, probe
    from .storage_s3 import ABSENCE_TTL, PAGE_TTL, ChangeFeed, S3Records, SharedArtifacts

    bucket = Bucket(config.storage.s3)
    await bucket.open()
    try:
        await probe(bucket)
    except BaseException:
        await bucket.close()
        raise
    shared = SharedArtifacts(bucket, config.storage.s3.redirect_ttl)
    artifacts = ArtifactCache(data / "cache" / "files", data / "tmp", config.cache.max_bytes,
                              metrics, shared)
    await asyncio.to_thread(artifacts.open)
    swept = await asyncio.to_thread(sweep_temp, data / "tmp")
    host = await asyncio.to_thread(Generation, data / "s3.generation")
    feed = ChangeFeed(bucket, host)

    # Private files get a tier of their own, never the upstream artifacts': an
    # upstream page may name any sha256 (a private file's is in lockfiles), and
    # must never get private bytes from the tier it is served from.
    blobs = ArtifactCache(data / "blobs" / "files", data / "tmp" / "blobs",
                          config.cache.max_bytes, metrics, shared, gauges=False)
    await asyncio.to_thread(blobs.open)

    async def open_blob(sha256: str) -> LocalFile | None:
        opened = await blobs.open_cached(sha256, "blobs")
        return None if opened is None else LocalFile(opened[0], opened[1], "private", sha256)

    stores = {name: PrivateStore(S3Records(bucket, name, feed, open_blob, shared), data / "tmp",
                                 absence_ttl=ABSENCE_TTL, page_ttl=PAGE_TTL) for name in names}
    storage = Storage(artifacts, stores, swept)
    storage.bucket, storage.feed, storage.host = bucket, feed, host
    storage.blobs = blobs
    return storage
