"""Frozen models of the simple repository: one file entry, one project page.

Shared by the private store and the upstream cache so that one renderer serves
both; every field names the PEP that defines it. No I/O here. The field checks
below hold for every value that reaches a model, from an upstream page or from
disk: a digest is lowercase hex of its algorithm's length, never a path.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from packaging.utils import NormalizedName

# hashlib names the simple API uses (PEP 503 fragments, PEP 691 `hashes`) and
# the hex length of each; a digest of another algorithm is dropped.
DIGEST_HEX_LENGTHS = {
    "md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128,
}
_HEX = re.compile(r"[0-9a-fA-F]+")
# PEP 700 stamps are 27 characters; anything much longer is not one.
_MAX_UPLOAD_TIME = 64
# A claim kept as provenance (oidc.py bounds them at 200 when minting).
_MAX_PUBLISHED_BY = 300


def hex_digest(algo: str, value: object) -> str | None:
    """The lowercased digest if value is hex of algo's length, else None.

    Lowercased: hex is case-insensitive, and a correct uppercase sha256 must
    match the file (and name its cache entry), not count as a mismatch.
    """
    if type(value) is not str or len(value) != DIGEST_HEX_LENGTHS.get(algo):
        return None
    return value.lower() if _HEX.fullmatch(value) else None


def sha256_hex(value: object) -> str | None:
    """A sha256 as 64 lowercase hex digits, or None: the only form that may name a file."""
    return hex_digest("sha256", value)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: str) -> bool:
    """Exactly 64 lowercase hex digits: what sha256_hex() gives, checked again where
    a digest names a file (the cache) or comes from a URL (GitLab's file route)."""
    return _SHA256.fullmatch(value) is not None


def clean_hashes(raw: object) -> dict[str, str]:
    """PEP 691 `hashes` keeping only well-formed digests; anything else is {}."""
    # Runs once or twice per file of every upstream page (2 MB ones too): kept lean.
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return {}
    hashes: dict[str, str] = {}
    for algo, value in raw.items():
        if type(value) is str and len(value) == DIGEST_HEX_LENGTHS.get(algo) and (
            _HEX.fullmatch(value)
        ):
            hashes[algo] = value.lower()
    return hashes


def clean_metadata(raw: object) -> dict[str, str] | None:
    """PEP 658/714 metadata: hashes when a dict, {} for a bare True, else None.

    {} (no sha256) is kept so the page says what upstream said; the read path
    neither advertises nor serves metadata it cannot verify.
    """
    if raw is True:
        return {}
    return clean_hashes(raw) if type(raw) is dict or isinstance(raw, Mapping) else None


def clean_yanked(raw: object) -> bool | str:
    """PEP 592/691: a bool, or a non-empty reason; any other type is dropped."""
    if isinstance(raw, bool):
        return raw
    return raw if isinstance(raw, str) and raw else False


def clean_size(raw: object) -> int | None:
    """PEP 700 `size`: a non-negative int (bool is an int to Python, not here)."""
    return raw if type(raw) is int and raw >= 0 else None


def clean_text(raw: object) -> str | None:
    """A non-empty string (requires-python) or None."""
    return raw if isinstance(raw, str) and raw else None


def clean_upload_time(raw: object) -> str | None:
    """PEP 700 `upload-time` if it reads as ISO 8601, else None.

    Read as guard.parse_upload_time reads it, so min_age never meets a value it
    cannot parse.
    """
    if not isinstance(raw, str) or not raw or len(raw) > _MAX_UPLOAD_TIME:
        return None
    try:
        # Any stamp that parses has an epoch time: datetime's range, +-24 h, fits.
        dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return raw


def clean_published_by(raw: object) -> dict[str, str] | None:
    """Who published a private file; absent in records older than trusted publishing."""
    if not isinstance(raw, Mapping) or not raw:
        return None
    return {k: v[:_MAX_PUBLISHED_BY] for k, v in list(raw.items())[:32]
            if isinstance(k, str) and isinstance(v, str)} or None


@dataclass(frozen=True, slots=True)
class FileEntry:
    # PEP 503/691: the distribution's file name; also the last path segment.
    filename: str
    # PEP 691 `hashes`; sha256 is what the proxy verifies and links with.
    hashes: Mapping[str, str]
    # PEP 503 data-requires-python / PEP 691 requires-python.
    requires_python: str | None = None
    # PEP 592: False, True, or the yank reason (a non-empty string).
    yanked: bool | str = False
    # PEP 658/714: hashes of the `.metadata` file, or None when there is none.
    metadata_hashes: Mapping[str, str] | None = None
    # PEP 700 `size`, None when the upstream did not say.
    size: int | None = None
    # PEP 700 `upload-time`, ISO 8601 in UTC ("2024-01-01T00:00:00.000000Z").
    upload_time: str | None = None
    # Where the bytes come from: the absolute upstream URL; "" for private files.
    origin: str = ""
    # Private files sent with a minted token: the trusted publisher and its CI
    # claims (repository or project_path, ref, workflow...); None otherwise.
    published_by: Mapping[str, str] | None = None

    @property
    def sha256(self) -> str | None:
        return self.hashes.get("sha256")

    @property
    def has_metadata(self) -> bool:
        return self.metadata_hashes is not None

    def to_json(self) -> dict[str, Any]:
        """The storage form (not the wire form: see simple_api)."""
        return {
            "filename": self.filename,
            "hashes": dict(self.hashes),
            "requires_python": self.requires_python,
            "yanked": self.yanked,
            "metadata_hashes": (
                dict(self.metadata_hashes) if self.metadata_hashes is not None else None
            ),
            "size": self.size,
            "upload_time": self.upload_time,
            "origin": self.origin,
            # Only when there is one: records of other files stay as they were.
            **({"published_by": dict(self.published_by)} if self.published_by else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        """Checked again on the way in: a page stored by an older version may
        hold anything its upstream sent (a path for a hash, a number for a time).

        Raises TypeError when data or its filename has the wrong type.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("filename"), str):
            raise TypeError("not a stored file entry")
        origin = data.get("origin")
        return cls(
            filename=data["filename"],
            hashes=clean_hashes(data.get("hashes")),
            requires_python=clean_text(data.get("requires_python")),
            yanked=clean_yanked(data.get("yanked", False)),
            metadata_hashes=clean_metadata(data.get("metadata_hashes")),
            size=clean_size(data.get("size")),
            upload_time=clean_upload_time(data.get("upload_time")),
            origin=origin if isinstance(origin, str) else "",
            published_by=clean_published_by(data.get("published_by")),
        )

    def with_yank(self, yanked: bool | str) -> FileEntry:
        return replace(self, yanked=yanked)


@dataclass(frozen=True, slots=True)
class ProjectPage:
    # PEP 691 `name`: the normalized project name.
    name: NormalizedName
    files: tuple[FileEntry, ...]
    # PEP 700 `versions`; derived from the files when not given by upstream.
    versions: tuple[str, ...] = field(default=())

    def file(self, filename: str) -> FileEntry | None:
        for entry in self.files:
            if entry.filename == filename:
                return entry
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "files": [f.to_json() for f in self.files],
            "versions": list(self.versions),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProjectPage:
        """Entries that are not file entries are skipped, as the parser skips them.

        Raises KeyError or TypeError when data is not a stored page.
        """
        if not isinstance(data, Mapping):
            raise TypeError("not a stored page")
        files, versions = data.get("files", ()), data.get("versions", ())
        if not isinstance(files, list | tuple) or not isinstance(versions, list | tuple):
            raise TypeError("not a stored page")
        entries = []
        for raw in files:
            try:
                entries.append(FileEntry.from_json(raw))
            except TypeError:
                continue
        return cls(
            name=NormalizedName(str(data["name"])),
            files=tuple(entries),
            versions=tuple(v for v in versions if isinstance(v, str)),
        )
