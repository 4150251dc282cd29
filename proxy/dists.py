"""Project names and distribution file names: parse, validate, normalize.

Pure functions over packaging's parsers; every failure is a BadRequest with a
reason a person can act on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from packaging.utils import (
    InvalidName,
    InvalidSdistFilename,
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    canonicalize_version,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from .errors import BadRequest, quoted

# Defined in model (the models check digests, and sit below this module);
# re-exported beside the other validators of what clients and upstreams send.

# Artifacts the simple API serves besides wheels and sdists (legacy uploads on
# PyPI); the proxy passes them through from upstream but never accepts them.
_LEGACY_SUFFIXES = (".egg", ".exe", ".msi", ".tar.bz2", ".tgz", ".tar", ".zip", ".rpm")
METADATA_SUFFIX = ".metadata"


@dataclass(frozen=True, slots=True)
class DistFile:
    filename: str
    name: NormalizedName
    version: Version
    kind: Literal["wheel", "sdist"]


def normalize_name(name: str) -> NormalizedName:
    """PEP 503 normalization of a PEP 508-valid name.

    Raises BadRequest for a name that PEP 508 does not allow.
    """
    try:
        return canonicalize_name(name, validate=True)
    except InvalidName:
        raise BadRequest(f"Invalid project name {quoted(name, 100)}: see PEP 508") from None


@functools.lru_cache(maxsize=4096)  # a pure function asked the same few names over and over
def name_from_url(raw: str) -> NormalizedName | None:
    """The normalized project name in a URL segment, None if it is not a PEP 508 name."""
    if len(raw) > 200:
        return None
    try:
        return canonicalize_name(raw, validate=True)
    except InvalidName:
        return None


def parse_version(text: str) -> Version:
    """Raises BadRequest when text is not a PEP 440 version."""
    try:
        return Version(text)
    except InvalidVersion:
        raise BadRequest(f"Invalid version {quoted(text, 100)}: see PEP 440") from None


def is_safe_filename(filename: str) -> bool:
    """A single path segment that cannot escape a directory or hide in a listing."""
    return (
        0 < len(filename) <= 255
        and filename not in (".", "..")
        and not filename.startswith(".")
        and "/" not in filename
        and "\\" not in filename
        # Printable ASCII without space, i.e. 32 < ord(ch) < 127 for every
        # character, tested in C: this runs for every file of every upstream page.
        and filename.isascii()
        and filename.isprintable()
        and " " not in filename
    )


def parse_dist_filename(filename: str) -> DistFile:
    """Parse a wheel or sdist file name (the only kinds accepted for upload).

    Raises BadRequest for anything else, including unsafe names.
    """
    if not is_safe_filename(filename):
        raise BadRequest(f"Invalid distribution filename {quoted(filename, 100)}")
    try:
        if filename.endswith(".whl"):
            name, version, _build, _tags = parse_wheel_filename(filename)
            return DistFile(filename, name, version, "wheel")
        if filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
            return DistFile(filename, name, version, "sdist")
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion) as exc:
        raise BadRequest(
            f"Invalid distribution filename {quoted(filename)}: {_why(exc)}"
        ) from None
    raise BadRequest(f"Invalid distribution filename {quoted(filename)}: not a wheel or sdist")


def _why(exc: Exception) -> str:
    # packaging says "Invalid wheel filename (wrong number of parts): 'x.whl'":
    # the part in parentheses is the reason; the rest repeats the name as a repr.
    text = str(exc)
    start, end = text.find("("), text.rfind(")")
    return text[start + 1 : end] if 0 <= start < end else "invalid version"


def file_key(filename: str) -> str:
    """The identity installers give a distribution file, for "is it already there".

    Filenames that differ only in spelling are one file to pip and uv (PEP 503
    names, PEP 440 versions, PEP 425 compressed tag sets), so a second spelling
    must not slip a second set of bytes in beside the first. Sdists key on the
    release alone: one sdist per release, .tar.gz or .zip (as on PyPI).
    A filename that does not parse keys as itself.
    """
    try:
        if filename.endswith(".whl"):
            name, version, build, tags = parse_wheel_filename(filename)
            # A tag set is the product of its three parts, so this spells it once.
            parts = (
                ".".join(sorted({getattr(t, a) for t in tags}))
                for a in ("interpreter", "abi", "platform")
            )
            build_tag = f"-{build[0]}{build[1]}" if build else ""
            return f"{name}-{canonicalize_version(version)}{build_tag}-{'-'.join(parts)}.whl"
        if filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
            return f"{name}-{canonicalize_version(version)}.sdist"
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        pass
    return filename


def guess_project(filename: str) -> NormalizedName | None:
    """The project a distribution file belongs to, from its name alone; None if
    it is no wheel or sdist (GitLab's file URLs carry no project name)."""
    try:
        return parse_dist_filename(filename).name
    except BadRequest:
        return None


def guess_version(filename: str, project: NormalizedName) -> str | None:
    """The version a served file belongs to, for PEP 700 `versions`; None if unknown."""
    try:
        return str(parse_dist_filename(filename).version)
    except BadRequest:
        pass
    # Legacy artifacts: "<name>-<version>.<ext>", best effort only.
    for suffix in _LEGACY_SUFFIXES:
        if filename.endswith(suffix):
            stem = filename[: -len(suffix)]
            head, sep, tail = stem.rpartition("-")
            if sep and canonicalize_name(head) == project:
                try:
                    return str(Version(tail))
                except InvalidVersion:
                    return None
    return None
