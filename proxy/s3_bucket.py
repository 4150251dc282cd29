"""One S3 bucket through aiobotocore: get/put with the conditions the backend
commits by (If-None-Match: *, If-Match: <etag>), listing, ranged reads, and the
start-up probe that refuses a store ignoring them.

Every failure of the store surfaces as errors.ServiceUnavailable (503, "try
again"); credentials come from the standard AWS chain and are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from .config import S3
from .errors import ServiceUnavailable
from .storage import StoreRefused

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CHUNK = 256 * 1024
# The largest object read whole into memory (a project's record: about 0.5 KB a
# file, so 2,000 files take ~1 MB). The bucket is shared storage, not this
# process's: a record grown past this is refused (503), never buffered.
MAX_OBJECT_BYTES = 64 * 2**20


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _conflict(exc: ClientError) -> bool:
    # 412 PreconditionFailed; AWS answers 409 ConditionalRequestConflict to a
    # write racing another conditional write (retry).
    return _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _missing(exc: ClientError) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    what = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    return ServiceUnavailable(f"Storage unavailable ({what}); try again later")


# What a call to the bucket may raise besides ClientError.
_TRANSPORT = (BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    age: float  # seconds since last modified
    size: int


class Bucket:
    """The bucket through one aiobotocore client; opened and closed by the app."""

    def __init__(self, config: S3) -> None:
        self.config = config
        self.name = config.bucket
        self.prefix = config.prefix
        self._exit: contextlib.AsyncExitStack | None = None
        self._client: S3Client | None = None

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "Bucket.open() first"
        return self._client

    async def open(self) -> None:
        stack = contextlib.AsyncExitStack()
        session = get_session()
        self._client = await stack.enter_async_context(session.create_client(
            "s3", region_name=self.config.region, endpoint_url=self.config.endpoint_url,
            config=AioConfig(
                # No sha256 of the payload for the signature (botocore computes
                # one for http endpoints, reading the whole body on the event
                # loop): the x-amz-checksum-sha256 header, itself signed, is how
                # the store checks a blob's bytes.
                s3={"payload_signing_enabled": False,
                    **({"addressing_style": "path"} if self.config.endpoint_url else {})},
                connect_timeout=5, read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                # Not a CRC of every body computed on the event loop: blobs carry
                # their own sha256 (put(sha256=...)), which S3 checks on arrival.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        ))
        self._exit = stack

    async def close(self) -> None:
        if self._exit is not None:
            await self._exit.aclose()
            self._exit = None
            self._client = None

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    async def get(self, key: str, etag: str | None = None) -> tuple[bytes, str] | str | None:
        """(body, etag); None when absent; the etag given when unchanged (304).
        Raises ServiceUnavailable, also for an object over MAX_OBJECT_BYTES."""
        try:
            if etag is None:
                resp = await self.client.get_object(Bucket=self.name, Key=key)
            else:
                resp = await self.client.get_object(Bucket=self.name, Key=key, IfNoneMatch=etag)
            async with resp["Body"] as body:
                if resp["ContentLength"] > MAX_OBJECT_BYTES:
                    raise ServiceUnavailable(f"Storage holds {key} larger than "
                                             f"{MAX_OBJECT_BYTES} bytes; not read")
                data = await body.read(MAX_OBJECT_BYTES + 1)
            if len(data) > MAX_OBJECT_BYTES:
                raise ServiceUnavailable(f"Storage holds {key} larger than "
                                         f"{MAX_OBJECT_BYTES} bytes; not read")
            return data, resp["ETag"]
        except ClientError as exc:
            if _missing(exc):
                return None
            if _code(exc) in ("304", "NotModified") and etag is not None:
                return etag
            raise _unavailable(exc) from None
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None

    async def put(
        self, key: str, body: bytes | Any, *, if_none_match: bool = False,
        if_match: str | None = None, sha256: str | None = None,
    ) -> str | None:
        """The new etag; None when the condition failed. sha256 (hex): the store
        refuses bytes that do not match it. Raises ServiceUnavailable."""
        args: dict[str, Any] = {}
        if sha256 is not None:
            args["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256)).decode()
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            resp = await self.client.put_object(Bucket=self.name, Key=key, Body=body, **args)
        except ClientError as exc:
            if _conflict(exc) or (if_match is not None and _missing(exc)):
                return None
            raise _unavailable(exc) from None
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None
        return resp["ETag"]

    async def head(self, key: str) -> Listed | None:
        try:
            resp = await self.client.head_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise _unavailable(exc) from None
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None
        age = time.time() - resp["LastModified"].timestamp()
        return Listed(key, age, resp["ContentLength"])

    async def copy(self, source: str, key: str) -> None:
        """Copy an object within the bucket (server-side)."""
        try:
            await self.client.copy_object(
                Bucket=self.name, Key=key, CopySource={"Bucket": self.name, "Key": source})
        except (ClientError, *_TRANSPORT) as exc:
            raise _unavailable(exc) from None

    async def delete(self, key: str) -> None:
        try:
            await self.client.delete_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            if not _missing(exc):
                raise _unavailable(exc) from None
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None

    async def list(self, prefix: str, start_after: str = "") -> AsyncGenerator[Listed, None]:
        """Every key under prefix (after start_after), in key order."""
        token: str | None = None
        now = time.time()
        while True:
            args: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix}
            if token is not None:
                args["ContinuationToken"] = token
            elif start_after:
                args["StartAfter"] = start_after
            try:
                resp = await self.client.list_objects_v2(**args)
            except (ClientError, *_TRANSPORT) as exc:
                raise _unavailable(exc) from None
            for item in resp.get("Contents", []):
                yield Listed(item["Key"], now - item["LastModified"].timestamp(), item["Size"])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    async def download(self, key: str, dest: Path, limit: int) -> tuple[int, str] | None:
        """The object into dest (a new file): (size, sha256 of what was written);
        None when absent or larger than limit. Raises ServiceUnavailable."""
        try:
            resp = await self.client.get_object(Bucket=self.name, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise _unavailable(exc) from None
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None
        size = resp["ContentLength"]
        digest = hashlib.sha256()
        written = 0
        try:
            async with resp["Body"] as body:
                if size > limit:
                    return None
                fh = await asyncio.to_thread(open, dest, "xb")
                try:
                    while chunk := await body.read(CHUNK):
                        written += len(chunk)
                        if written > limit:
                            return None
                        await asyncio.to_thread(_write_hash, fh, chunk, digest)
                    await asyncio.to_thread(os.fsync, fh.fileno())
                finally:
                    await asyncio.to_thread(fh.close)
        except _TRANSPORT as exc:
            raise _unavailable(exc) from None
        return written, digest.hexdigest()

    async def presign(self, key: str, ttl: int) -> str:
        """A GET URL for key, valid ttl seconds, signed with this client's
        credentials (no request is made)."""
        try:
            url: str = await self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=ttl)
        except (ClientError, *_TRANSPORT) as exc:
            raise _unavailable(exc) from None
        return url

    def ranged(self, key: str) -> Callable[[int, int], AsyncGenerator[bytes, None]]:
        async def read(start: int, stop: int) -> AsyncGenerator[bytes, None]:
            try:
                resp = await self.client.get_object(
                    Bucket=self.name, Key=key, Range=f"bytes={start}-{stop - 1}")
                async with resp["Body"] as body:
                    while chunk := await body.read(CHUNK):
                        yield chunk
            except (ClientError, *_TRANSPORT) as exc:
                raise _unavailable(exc) from None
        return read


def _write_hash(fh: Any, chunk: bytes, digest: Any) -> None:
    fh.write(chunk)
    digest.update(chunk)


async def probe(bucket: Bucket) -> None:
    """Refuse a store that ignores conditional writes: two replicas could then
    both win one file name. Writes, re-writes and deletes one scratch key.
    Raises StoreRefused."""
    key = bucket.key("probe", uuid.uuid4().hex)
    try:
        first = await bucket.put(key, b"1", if_none_match=True)
        if first is None:
            raise StoreRefused("storage.s3: the probe's new scratch key already existed")
        again = await bucket.put(key, b"2", if_none_match=True)
        stale = await bucket.put(key, b"3", if_match='"00000000000000000000000000000000"')
    except ServiceUnavailable as exc:
        raise StoreRefused(
            f"storage.s3: cannot use bucket {bucket.name!r}: {exc.reason}") from None
    finally:
        with contextlib.suppress(ServiceUnavailable):
            await bucket.delete(key)
    if again is not None or stale is not None:
        which = "If-None-Match: *" if again is not None else "If-Match"
        raise StoreRefused(
            f"storage.s3: bucket {bucket.name!r} ignores conditional writes ({which}); "
            "replicas could overwrite each other's uploads: refusing to start")


