"""Frozen models of the simple repository: one file entry, one project page.

Shared by the private store and the upstream cache so that one renderer serves
both; every field names the PEP that defines it. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from packaging.utils import NormalizedName


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
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        mh = data.get("metadata_hashes")
        return cls(
            filename=str(data["filename"]),
            hashes=dict(data.get("hashes") or {}),
            requires_python=data.get("requires_python"),
            yanked=data.get("yanked", False),
            metadata_hashes=dict(mh) if mh is not None else None,
            size=data.get("size"),
            upload_time=data.get("upload_time"),
            origin=str(data.get("origin") or ""),
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
        return cls(
            name=NormalizedName(str(data["name"])),
            files=tuple(FileEntry.from_json(f) for f in data.get("files", ())),
            versions=tuple(str(v) for v in data.get("versions", ())),
        )
