"""The storage contract: the same tests against every backend (storage.ProjectRecords).

Each test gets two "hosts" (`pair`): two PrivateStore objects over one backend,
as two worker processes share a data_dir or two replicas share a bucket. The
S3 backend runs against moto's real S3 server on loopback (tests/support/s3.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import NormalizedName

from proxy import s3_bucket, storage_s3
from proxy.cache import ArtifactCache
from proxy.config import S3
from proxy.errors import BadRequest, FileExists, NotFound, ServiceUnavailable
from proxy.metrics import Metrics
from proxy.model import FileEntry
from proxy.s3_bucket import Bucket, StoreRefused, probe
from proxy.storage import LocalFile, StoredFile, StreamedFile
from proxy.storage_local import LocalRecords
from proxy.storage_s3 import ABSENCE_TTL, ChangeFeed, S3Records, SharedArtifacts
from proxy.store import PrivateStore
from tests.support.s3 import CREDENTIALS, BlindFront, MotoServer

NAME = NormalizedName("acme-tool")


@dataclass
class Host:
    store: PrivateStore
    tmp: Path
    feed: ChangeFeed | None = None

    async def settle(self) -> None:
        """Let the change feed carry other hosts' commits here (S3: one poll)."""
        if self.feed is not None:
            await self.feed.poll()

    def spool(self, data: bytes) -> Path:
        path = self.tmp / f"up-{os.urandom(6).hex()}"
        path.write_bytes(data)
        return path

    async def add(self, filename: str, data: bytes, metadata: bytes | None = None) -> str:
        entry = FileEntry(
            filename=filename, hashes={"sha256": hashlib.sha256(data).hexdigest()},
            size=len(data),
            metadata_hashes=(None if metadata is None
                             else {"sha256": hashlib.sha256(metadata).hexdigest()}),
        )
        return await self.store.add(NAME, entry, self.spool(data), metadata)


async def _read(stored: StoredFile) -> bytes:
    if isinstance(stored, LocalFile):
        try:
            return await asyncio.to_thread(stored.file.read)
        finally:
            stored.file.close()
    assert isinstance(stored, StreamedFile)
    return b"".join([chunk async for chunk in stored.read(0, stored.size)])


@pytest.fixture(params=["local", "s3"])
async def pair(
    request: pytest.FixtureRequest, tmp_path: Path,
) -> AsyncIterator[tuple[Host, Host]]:
    closers: list[Any] = []
    hosts: list[Host] = []
    if request.param == "local":
        for i in range(2):
            tmp = tmp_path / f"tmp{i}"
            records = LocalRecords(tmp_path / "private", tmp)
            await asyncio.to_thread(records.open)
            closers.append(records.close)
            hosts.append(Host(PrivateStore(records, tmp, absence_ttl=float("inf")), tmp))
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket_info = moto.bucket()
        patch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        for key, value in CREDENTIALS.items():
            patch.setenv(key, value)
        for i in range(2):
            tmp = tmp_path / f"tmp{i}"
            tmp.mkdir()
            bucket = Bucket(S3(bucket=bucket_info.name, prefix="t/",
                               endpoint_url=bucket_info.endpoint_url, region="us-east-1"))
            await bucket.open()
            closers.append(bucket.close)
            await probe(bucket)
            cache = ArtifactCache(tmp_path / f"cache{i}", tmp, 2**30,
                                  Metrics(["pypi"], ["default"]), SharedArtifacts(bucket))
            await asyncio.to_thread(cache.open)
            closers.append(cache.close)

            async def open_blob(sha: str, cache: ArtifactCache = cache) -> LocalFile | None:
                opened = await cache.open_cached(sha, "blobs")
                return None if opened is None else LocalFile(*opened, "private", sha)

            feed = ChangeFeed(bucket)
            records = S3Records(bucket, "default", feed, open_blob)
            hosts.append(Host(PrivateStore(records, tmp, absence_ttl=ABSENCE_TTL), tmp, feed))
    try:
        yield hosts[0], hosts[1]
    finally:
        for close in reversed(closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result


async def test_a_commit_is_seen_whole_by_the_other_host(pair: tuple[Host, Host]) -> None:
    a, b = pair
    assert not await b.store.private(NAME)
    wheel, meta = b"wheel bytes " * 1000, b"Metadata-Version: 2.1\nName: acme-tool\n"
    assert await a.add("acme_tool-1.0-py3-none-any.whl", wheel, meta) == "stored"
    await b.settle()
    assert await b.store.private(NAME)
    assert b.store.is_private(NAME)
    page = await b.store.page(NAME)
    assert page is not None and [f.filename for f in page.files] == [
        "acme_tool-1.0-py3-none-any.whl"]
    assert page.versions == ("1.0",)
    entry = page.files[0]
    stored = await b.store.open_file(NAME, entry.filename, entry.sha256)
    assert stored is not None and await _read(stored) == wheel
    meta_sha = (entry.metadata_hashes or {})["sha256"]
    stored = await b.store.open_file(NAME, entry.filename + ".metadata", meta_sha)
    assert stored is not None and await _read(stored) == meta
    assert await b.store.names() == [NAME]


async def test_same_bytes_are_a_no_op_and_other_bytes_are_refused(
    pair: tuple[Host, Host],
) -> None:
    a, b = pair
    assert await a.add("acme_tool-1.0.tar.gz", b"one") == "stored"
    await b.settle()
    assert await b.add("acme_tool-1.0.tar.gz", b"one") == "duplicate"
    with pytest.raises(FileExists):
        await b.add("acme_tool-1.0.tar.gz", b"two")
    # The same file to installers (PyPI's comparison): another sdist of 1.0.
    with pytest.raises(FileExists):
        await b.add("Acme_Tool-1.0.tar.gz", b"three")
    page = await a.store.page(NAME)
    assert page is not None and [f.size for f in page.files] == [3]


async def test_racing_hosts_commit_exactly_one_file(pair: tuple[Host, Host]) -> None:
    """Two hosts, one file name, other bytes: one "stored", one FileExists; 10 rounds."""
    a, b = pair
    for round_ in range(10):
        filename = f"acme_tool-{round_}.0-py3-none-any.whl"
        results = await asyncio.gather(
            a.add(filename, f"a{round_}".encode()), b.add(filename, f"b{round_}".encode()),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["FileExists", "str"], results
        await a.settle()
        await b.settle()
        page = await a.store.page(NAME)
        assert page is not None and len(page.files) == round_ + 1


async def test_a_deleted_file_comes_back_only_with_its_own_bytes(
    pair: tuple[Host, Host],
) -> None:
    a, b = pair
    await a.add("acme_tool-1.0.tar.gz", b"one")
    await b.settle()
    await b.store.delete(NAME, "acme_tool-1.0.tar.gz")
    await a.settle()
    page = await a.store.page(NAME)
    assert page is not None and page.files == ()
    assert await a.store.private(NAME)  # the name stays private until released
    with pytest.raises(FileExists):
        await a.add("acme_tool-1.0.tar.gz", b"other")
    assert await a.add("acme_tool-1.0.tar.gz", b"one") == "stored"


async def test_yank_then_release_hands_the_name_back(pair: tuple[Host, Host]) -> None:
    a, b = pair
    await a.add("acme_tool-1.0.tar.gz", b"one")
    await b.settle()
    assert await b.store.set_yanked(NAME, "1.0", "broken") == 1
    await a.settle()
    page = await a.store.page(NAME)
    assert page is not None and page.files[0].yanked == "broken"
    with pytest.raises(BadRequest):
        await a.store.release(NAME)
    await a.store.delete(NAME, "acme_tool-1.0.tar.gz")
    await a.store.release(NAME)
    await b.settle()
    assert not await b.store.private(NAME)
    assert await b.store.page(NAME) is None
    assert await b.store.names() == []
    with pytest.raises(NotFound):
        await b.store.release(NAME)
    # A file name once used keeps its bytes, even after the release.
    with pytest.raises(FileExists):
        await b.add("acme_tool-1.0.tar.gz", b"other")


async def test_not_private_is_trusted_only_until_the_feed_or_the_ttl_says_otherwise(
    pair: tuple[Host, Host],
) -> None:
    """The guard across hosts: a host that said "not private" learns the commit
    from the feed (or, S3, from asking again once ABSENCE_TTL is over)."""
    a, b = pair
    assert not await b.store.private(NAME)
    await a.add("acme_tool-1.0.tar.gz", b"one")
    if b.feed is None:
        assert await b.store.private(NAME)
        return
    await asyncio.sleep(ABSENCE_TTL + 0.05)  # no poll: the TTL alone
    assert await b.store.private(NAME)


async def test_a_store_that_ignores_conditional_writes_is_refused(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket_info = moto_server.bucket()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with BlindFront(moto_server.endpoint_url) as front:
        bucket = Bucket(S3(bucket=bucket_info.name, endpoint_url=front.endpoint_url,
                           region="us-east-1"))
        await bucket.open()
        try:
            with pytest.raises(StoreRefused, match="ignores conditional writes"):
                await probe(bucket)
        finally:
            await bucket.close()
    assert bucket_info.keys("probe/") == []  # the scratch key is gone


async def test_the_sweep_takes_only_old_unreferenced_blobs(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A blob left by an upload that died before its commit goes to trash/ once
    older than BLOB_GRACE; a listed file's blob stays, and so does a young
    orphan; a listed blob found in trash/ is put back."""
    bucket_info = moto_server.bucket()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = Bucket(S3(bucket=bucket_info.name, endpoint_url=bucket_info.endpoint_url,
                       region="us-east-1"))
    await bucket.open()
    try:
        feed = ChangeFeed(bucket)

        async def no_tier(_sha: str) -> LocalFile | None:
            return None

        host = Host(PrivateStore(S3Records(bucket, "default", feed, no_tier), tmp_path,
                                 absence_ttl=ABSENCE_TTL), tmp_path, feed)
        await host.add("acme_tool-1.0.tar.gz", b"listed")
        orphan = hashlib.sha256(b"orphan").hexdigest()
        bucket_info.client().put_object(Bucket=bucket_info.name, Key=f"blobs/{orphan}",
                                        Body=b"orphan")
        assert await storage_s3.sweep(bucket, ["default"]) == (0, 0)  # all young
        monkeypatch.setattr(storage_s3, "BLOB_GRACE", -1.0)
        monkeypatch.setattr(storage_s3, "FEED_KEEP", -1.0)
        removed_blobs, removed_feed = await storage_s3.sweep(bucket, ["default"])
        assert removed_blobs == 1 and removed_feed == 1
        listed = hashlib.sha256(b"listed").hexdigest()
        assert bucket_info.keys("blobs/") == [f"blobs/{listed}"]
        assert bucket_info.keys("trash/") == [f"trash/{orphan}"]
        page = await host.store.page(NAME)
        assert page is not None
        stored = await host.store.open_file(NAME, page.files[0].filename, page.files[0].sha256)
        assert stored is not None and await _read(stored) == b"listed"
        # A sweep that lost the race with an upload reusing an old blob (it took
        # a blob that a record lists after all): the first reader restores it...
        client = bucket_info.client()
        client.copy_object(Bucket=bucket_info.name, Key=f"trash/{listed}",
                           CopySource={"Bucket": bucket_info.name, "Key": f"blobs/{listed}"})
        client.delete_object(Bucket=bucket_info.name, Key=f"blobs/{listed}")
        stored = await host.store.open_file(NAME, page.files[0].filename, listed)
        assert stored is not None and await _read(stored) == b"listed"
        assert f"blobs/{listed}" in bucket_info.keys("blobs/")
        # ... or the next sweep does; unlisted trash goes after TRASH_KEEP.
        client.copy_object(Bucket=bucket_info.name, Key=f"trash/{listed}",
                           CopySource={"Bucket": bucket_info.name, "Key": f"blobs/{listed}"})
        client.delete_object(Bucket=bucket_info.name, Key=f"blobs/{listed}")
        monkeypatch.setattr(storage_s3, "TRASH_KEEP", -1.0)
        await storage_s3.sweep(bucket, ["default"])
        assert bucket_info.keys("blobs/") == [f"blobs/{listed}"]
        assert bucket_info.keys("trash/") == []
    finally:
        await bucket.close()


async def test_a_feed_move_during_a_check_never_makes_a_private_name_public(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reader asks a remote store, then resolves. The feed moving in between
    (another commit anywhere, a poll) must not turn the answer into "not
    private": that would forward a private name upstream."""
    a, b = pair
    await a.add("acme_tool-1.0.tar.gz", b"one")
    if b.feed is None:  # local: the disk answers at once, nothing to race
        assert b.store.is_private(NAME)
        return
    records = b.store.records
    learn = records.learn

    async def feed_moves_meanwhile(name: NormalizedName) -> Any:
        found = await learn(name)
        assert b.feed is not None
        b.feed.moved()
        return found

    monkeypatch.setattr(records, "learn", feed_moves_meanwhile)
    assert b.store.needs_check(NAME)
    assert await b.store.check(NAME)
    assert b.store.is_private(NAME)
    assert b.store.needs_check(NAME)  # and the next request asks again


async def test_a_record_grown_past_the_bound_is_refused_not_buffered(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bucket is shared storage: a project record larger than MAX_OBJECT_BYTES
    (anyone with write access to the bucket could put one there) is a 503 with
    its reason, never read whole into a replica's memory."""
    bucket_info = moto_server.bucket()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3_bucket, "MAX_OBJECT_BYTES", 4096)
    bucket = Bucket(S3(bucket=bucket_info.name, endpoint_url=bucket_info.endpoint_url,
                       region="us-east-1"))
    await bucket.open()
    try:
        feed = ChangeFeed(bucket)

        async def no_tier(_sha: str) -> LocalFile | None:
            return None

        records = S3Records(bucket, "default", feed, no_tier)
        small = b'{"name": "fits", "files": [], "used": {}}'
        bucket_info.client().put_object(Bucket=bucket_info.name,
                                        Key="indexes/default/projects/fits.json", Body=small)
        assert (await records.read(NormalizedName("fits"))) is not None
        huge = b'{"name": "huge", "files": [], "pad": "' + b"x" * 8192 + b'"}'
        bucket_info.client().put_object(Bucket=bucket_info.name,
                                        Key="indexes/default/projects/huge.json", Body=huge)
        with pytest.raises(ServiceUnavailable, match="larger than 4096 bytes"):
            await records.read(NormalizedName("huge"))
    finally:
        await bucket.close()
