"""The write path: spool with hashing and a size limit, validate, read METADATA, store.

A pipeline of small validators, cheap ones first, each raising one error from
errors.py with a reason twine can print. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import NormalizedName
from packaging.version import Version

from .config import Config
from .distcheck import (
    METADATA_VERSIONS,
    CoreMetadata,
    parse_requires_python,
    read_sdist_metadata,
    read_wheel_metadata,
)
from .dists import DistFile, normalize_name, parse_dist_filename, parse_version
from .errors import BadRequest, Forbidden, ServiceUnavailable, TooLarge, quoted
from .fsutil import fsync_file, raise_if_full, temp_path, write_and_hash
from .guard import matches_any
from .metrics import Metrics
from .model import FileEntry
from .store import AddOutcome, PrivateStore

log = logging.getLogger("indexguard.publish")

MAX_FIELD_BYTES = 1 * 2**20  # a long README description fits; a 10 MB field does not
# Parts of one upload, named or not: each one costs a turn of the read loop.
MAX_FIELDS = 1000
# All text fields together: 1000 fields of 1 MiB each would otherwise be held at once.
MAX_FORM_BYTES = 8 * 2**20
CHUNK = 256 * 1024
_FILETYPES = {"wheel": "bdist_wheel", "sdist": "sdist"}


@dataclass(slots=True)
class UploadForm:
    """The legacy upload form's text fields, collected as they stream in."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    count: int = 0
    size: int = 0

    def count_part(self) -> None:
        """Called for every multipart part, the file and unnamed ones included."""
        self.count += 1
        if self.count > MAX_FIELDS:
            raise BadRequest(f"Too many form fields (more than {MAX_FIELDS} parts)")

    def add(self, name: str, raw: bytes) -> None:
        self.size += len(name) + len(raw)
        if self.size > MAX_FORM_BYTES:
            raise BadRequest(f"Form fields larger than {MAX_FORM_BYTES} bytes in all")
        self.fields.setdefault(name, []).append(raw.decode("utf-8", errors="replace"))

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def require(self, name: str) -> str:
        value = self.get(name)
        if value is None or not value.strip():
            raise BadRequest(f"Missing required form field {quoted(name)}")
        return value.strip()


@dataclass(frozen=True, slots=True)
class Spooled:
    path: Path
    filename: str
    size: int
    sha256: str
    md5: str
    blake2_256: str


# Why the caller may not publish a normalized name where it is uploading; None: it may.
Refusal = Callable[[NormalizedName], str | None]


def check_form_header(
    form: UploadForm, refusal: Refusal = lambda _name: None,
) -> tuple[NormalizedName, Version]:
    """The cheap checks, run before the file's bytes are read where possible."""
    action = form.require(":action")
    if action != "file_upload":
        raise BadRequest(f"Unsupported :action {quoted(action, 40)}; only file_upload is accepted")
    protocol = form.get("protocol_version")
    if protocol is not None and protocol.strip() != "1":
        raise BadRequest(f"Unsupported protocol_version {quoted(protocol, 10)}")
    name = normalize_name(form.require("name"))
    why = refusal(name)
    if why is not None:
        raise Forbidden(why)
    version = parse_version(form.require("version"))
    mv = form.get("metadata_version")
    if mv is not None and mv.strip() not in METADATA_VERSIONS:
        raise BadRequest(
            f"Unsupported metadata_version {quoted(mv, 10)}; accepted: 1.0 to 2.5"
        )
    rp = form.get("requires_python")
    if rp is not None and rp.strip():
        parse_requires_python(rp, "form field requires_python")
    return name, version


def check_file(form: UploadForm, spooled: Spooled, name: NormalizedName,
               version: Version) -> DistFile:
    if spooled.size == 0:
        raise BadRequest("Empty file uploaded")
    dist = parse_dist_filename(spooled.filename)
    if dist.name != name:
        raise BadRequest(
            f"Filename {spooled.filename} is for project {dist.name}, but the form says {name}"
        )
    if dist.version != version:
        raise BadRequest(
            f"Filename {spooled.filename} is for version {dist.version}, "
            f"but the form says {version}"
        )
    filetype = form.get("filetype")
    if filetype is not None and filetype.strip() != _FILETYPES[dist.kind]:
        raise BadRequest(f"filetype {quoted(filetype, 20)} does not match {spooled.filename}")
    return dist


def check_digests(form: UploadForm, spooled: Spooled) -> None:
    declared = {
        "sha256_digest": spooled.sha256,
        "md5_digest": spooled.md5,
        "blake2_256_digest": spooled.blake2_256,
    }
    given = {k: (form.get(k) or "").strip().lower() for k in declared}
    if not any(given.values()):
        raise BadRequest("Missing digest: send sha256_digest (twine and uv do)")
    for key, value in given.items():
        # compare_digest raises TypeError on non-ASCII str: check the form first.
        if value and (len(value) > 128 or not all(c in "0123456789abcdef" for c in value)):
            raise BadRequest(f"The {key} is not a hex digest")
    for key, actual in declared.items():
        if given[key] and not hmac.compare_digest(given[key], actual):
            raise BadRequest(f"The {key} does not match the uploaded file's contents")


def requires_python_of(metadata: CoreMetadata, form: UploadForm) -> str | None:
    """The archive's own Requires-Python wins over the form's (both checked valid)."""
    if metadata.requires_python is not None:
        return metadata.requires_python
    value = form.get("requires_python")
    return value.strip() if value and value.strip() else None


def read_metadata(path: Path, dist: DistFile) -> CoreMetadata:
    """METADATA of a wheel or PKG-INFO of an sdist, checked. Blocking."""
    if dist.kind == "wheel":
        return read_wheel_metadata(path, dist)
    return read_sdist_metadata(path, dist)


def upload_time_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Publisher:
    def __init__(
        self, store: PrivateStore, metrics: Metrics,
        upstream_has: Callable[[NormalizedName, Config], Awaitable[bool | None]],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._upstream_has = upstream_has

    async def spool(self, chunks: AsyncIterator[bytes], filename: str, limit: int) -> Spooled:
        """Stream the file part to a temp file, hashing as it arrives.

        Raises TooLarge past `limit` (nothing is written beyond it),
        InsufficientStorage when the disk fills.
        """
        tmp = temp_path(self.store.tmp_dir, ".upload")
        sha, md5, blake = hashlib.sha256(), hashlib.md5(), hashlib.blake2b(digest_size=32)
        size = 0
        try:
            fh = await asyncio.to_thread(open, tmp, "wb")
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(
                            f"File too large: the limit is {limit} bytes (limits.max_upload)"
                        )
                    await asyncio.to_thread(write_and_hash, fh, chunk, sha, md5, blake)
                await asyncio.to_thread(fsync_file, fh)
            finally:
                await asyncio.to_thread(fh.close)
        except OSError as exc:
            await asyncio.to_thread(tmp.unlink, True)
            raise_if_full(exc)
            raise
        except BaseException:
            await asyncio.to_thread(tmp.unlink, True)
            raise
        return Spooled(tmp, filename, size, sha.hexdigest(), md5.hexdigest(), blake.hexdigest())

    async def publish(
        self, form: UploadForm, spooled: Spooled, config: Config,
        refusal: Refusal = lambda _name: None, published_by: Mapping[str, str] | None = None,
    ) -> AddOutcome:
        """Validate and store. The spooled file is consumed either way. refusal(name)
        says why the caller may not publish the name here (token patterns, owns);
        published_by (a trusted publisher and its CI claims) is kept with the file.

        Raises BadRequest, FileExists, Forbidden (refusal, collision policy),
        ServiceUnavailable (policy reject and upstream cannot say), InsufficientStorage.
        """
        try:
            name, version = check_form_header(form, refusal)
            dist = check_file(form, spooled, name, version)
            check_digests(form, spooled)
            metadata = await asyncio.to_thread(read_metadata, spooled.path, dist)
            await self._check_collision(name, config)
            # PEP 658 metadata is served for wheels only (PKG-INFO may be dynamic).
            served = metadata.raw if dist.kind == "wheel" else None
            entry = FileEntry(
                filename=dist.filename,
                hashes={"sha256": spooled.sha256},
                requires_python=requires_python_of(metadata, form),
                metadata_hashes=(
                    {"sha256": hashlib.sha256(served).hexdigest()} if served else None
                ),
                size=spooled.size,
                upload_time=upload_time_now(),
                published_by=published_by,
            )
            outcome = await self.store.add(name, entry, spooled.path, served)
        except BaseException:
            await asyncio.to_thread(spooled.path.unlink, True)
            raise
        log.info("upload", extra={"project": name, "file": dist.filename,
                                  "outcome": outcome, "size": spooled.size,
                                  **({"published_by": published_by} if published_by else {})})
        return outcome

    async def _check_collision(self, name: NormalizedName, config: Config) -> None:
        """guard.upload_collision for a name that exists upstream and is new here."""
        policy = config.guard.upload_collision
        if (
            policy == "allow"
            or matches_any(name, config.guard.allow_shadow)
            or matches_any(name, config.guard.private_only)
            or not config.upstream.forward
            or await self.store.private(name)
        ):
            return
        exists = await self._upstream_has(name, config)
        if exists is None:
            # Fail closed: under reject, an unchecked name could shadow a public one.
            if policy == "reject":
                raise ServiceUnavailable(
                    f"Cannot check whether {name} exists on the upstream index (upstream "
                    "unavailable); upload refused under guard.upload_collision: reject. "
                    "Try again later"
                )
            log.warning("upload not checked for collision: upstream unavailable",
                        extra={"project": name})
            return
        if not exists:
            return
        if policy == "reject":
            self.metrics.upload_collisions.labels("rejected").inc()
            raise Forbidden(
                f"{name} exists on the upstream index; publishing it here would shadow it "
                "(guard.upload_collision: reject)"
            )
        self.metrics.upload_collisions.labels("warned").inc()
        log.warning("upload shadows an upstream name", extra={"project": name})
