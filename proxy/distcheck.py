"""Core metadata out of uploaded wheels and sdists, with every size bounded.

An upload's bytes come from a write token that may be stolen: zip and tar
headers lie and compressed members inflate without end. Readers here count what
they inflate and stop past a cap; nothing is extracted to disk. Blocking (run in
a worker thread). Every failure is a BadRequest with the reason.
"""

from __future__ import annotations

import email.parser
import gzip
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .dists import DistFile
from .errors import BadRequest, quoted

# Core metadata versions accepted (GitLab rejected 2.4 for a while; PyPI takes all).
METADATA_VERSIONS = frozenset({"1.0", "1.1", "1.2", "2.0", "2.1", "2.2", "2.3", "2.4", "2.5"})
MAX_METADATA_BYTES = 16 * 2**20  # METADATA or PKG-INFO, long description included
MAX_REQUIRES_PYTHON = 1000  # characters; it is copied into every page that lists the file
# Members scanned in one archive. Wheels with tens of thousands of files exist;
# zipfile holds about 500 bytes per member in memory, so this is ~25 MB at most.
MAX_MEMBERS = 50_000
# zipfile reads the whole central directory into memory and makes one object per
# entry (~10x its size): bounded before zipfile sees it, whatever the entry count says.
MAX_CENTRAL_DIRECTORY = 4 * 2**20
# An sdist's tar stream is inflated to the end once (CPU, never memory).
MAX_SDIST_INFLATED = 2**30
# pax and GNU long-name headers are read into memory whole.
MAX_TAR_HEADER_DATA = 64 * 1024
_CHUNK = 64 * 1024
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# Everything a hostile zip can make zipfile raise (struct.error and zlib.error
# are not OSErrors; UnicodeDecodeError is a ValueError).
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, KeyError, ValueError,
    struct.error, zlib.error, NotImplementedError, RuntimeError,
)


@dataclass(frozen=True, slots=True)
class CoreMetadata:
    raw: bytes  # as found in the archive (served as PEP 658 metadata for wheels)
    requires_python: str | None


def parse_requires_python(value: str, where: str) -> str:
    """A PEP 440 specifier set, stripped. Raises BadRequest with the reason."""
    value = value.strip()
    if len(value) > MAX_REQUIRES_PYTHON:
        raise BadRequest(
            f"{where}: Requires-Python is longer than {MAX_REQUIRES_PYTHON} characters"
        )
    try:
        SpecifierSet(value)
    except InvalidSpecifier:
        raise BadRequest(
            f"{where}: Requires-Python {quoted(value, 100)} is not a valid version specifier "
            "(PEP 440)"
        ) from None
    return value


def check_core_metadata(raw: bytes, dist: DistFile, member: str) -> CoreMetadata:
    """Name, Version and Metadata-Version against the filename; Requires-Python valid."""
    where = f"{dist.filename}: {member}"
    # Only the header block: the description after it can be megabytes, and
    # the parser would hold it as a str of up to 4 bytes a character.
    end = re.search(rb"\r?\n\r?\n", raw)
    head = raw[: end.start()] if end else raw
    meta = email.parser.Parser().parsestr(head.decode("utf-8", "replace"), headersonly=True)
    name, version = meta.get("Name"), meta.get("Version")
    if not name or canonicalize_name(str(name).strip()) != dist.name:
        raise BadRequest(f"{where} names {quoted(name, 100)}, not {dist.name}")
    try:
        same = version is not None and Version(str(version).strip()) == dist.version
    except InvalidVersion:
        same = False
    if not same:
        raise BadRequest(f"{where} version {quoted(version, 100)} != {dist.version}")
    mv = meta.get("Metadata-Version")
    if mv is not None and str(mv).strip() not in METADATA_VERSIONS:
        raise BadRequest(f"{where}: unsupported Metadata-Version {quoted(mv, 20)}")
    rp = meta.get("Requires-Python")
    requires_python = parse_requires_python(str(rp), where) if rp and str(rp).strip() else None
    return CoreMetadata(raw, requires_python)


# --- zip (wheels and .zip sdists) ------------------------------------------------------

def _check_zip_directory(fh: BinaryIO, filename: str) -> None:
    """Bound the central directory from its end record, before zipfile reads it.

    Raises BadZipFile for a broken archive, BadRequest past a bound.
    """
    size = fh.seek(0, os.SEEK_END)
    tail_len = min(size, 22 + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    # Where zipfile looks: no comment first, else the last signature.
    at = tail_len - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise zipfile.BadZipFile("no end of central directory record")
    entries, cd_size = struct.unpack_from("<HI", tail, at + 10)
    if at >= 20 and tail[at - 20: at - 16] == b"PK\x06\x07":
        # Just before its locator, where zipfile looks (the locator's offset is
        # wrong when data was prepended to the archive).
        fh.seek(max(0, size - tail_len + at - 20 - 56))
        record = fh.read(56)
        if record[:4] != b"PK\x06\x06":
            raise zipfile.BadZipFile("no zip64 end of central directory record")
        entries, cd_size = struct.unpack_from("<QQ", record, 32)
    if entries > MAX_MEMBERS:
        raise BadRequest(f"{filename} has more than {MAX_MEMBERS} members")
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise BadRequest(
            f"{filename}: zip central directory larger than {MAX_CENTRAL_DIRECTORY} bytes"
        )


def _check_zip_members(zf: zipfile.ZipFile, filename: str) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:  # the end record's count can lie
        raise BadRequest(f"{filename} has more than {MAX_MEMBERS} members")
    for info in infos:
        if info.compress_type not in _ZIP_METHODS:
            raise BadRequest(
                f"{filename}: member {quoted(info.filename, 100)} uses zip compression method "
                f"{info.compress_type}; only stored and deflate are accepted"
            )
        if info.flag_bits & 0x1:
            raise BadRequest(f"{filename}: member {quoted(info.filename, 100)} is encrypted")
    return infos


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> bytes:
    """At most MAX_METADATA_BYTES inflated, whatever the header says."""
    if info.file_size > MAX_METADATA_BYTES:
        raise BadRequest(f"{where} is larger than {MAX_METADATA_BYTES} bytes")
    buf = bytearray()
    # Chunked reads: read() with no size inflates the whole member at once.
    with zf.open(info) as member:
        while chunk := member.read(_CHUNK):
            buf += chunk
            if len(buf) > MAX_METADATA_BYTES:
                raise BadRequest(f"{where} is larger than {MAX_METADATA_BYTES} bytes")
    return bytes(buf)


@contextmanager
def _zip(path: Path, filename: str) -> Iterator[tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]]:
    with open(path, "rb") as fh:
        _check_zip_directory(fh, filename)
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            yield zf, _check_zip_members(zf, filename)


def read_wheel_metadata(path: Path, dist: DistFile) -> CoreMetadata:
    """The wheel's .dist-info/METADATA, checked against its filename. Blocking."""
    try:
        with _zip(path, dist.filename) as (zf, infos):
            matching = [
                i for i in infos
                if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/METADATA")
                and canonicalize_name(
                    i.filename.split("/")[0][: -len(".dist-info")].rpartition("-")[0]
                ) == dist.name
            ]
            if len(matching) != 1:
                raise BadRequest(f"{dist.filename} has no single {dist.name} .dist-info/METADATA")
            raw = _read_zip_member(zf, matching[0], f"{dist.filename}: METADATA")
    except _ZIP_ERRORS as exc:
        raise BadRequest(f"{dist.filename} is not a valid wheel: {_describe(exc)}") from None
    return check_core_metadata(raw, dist, "METADATA")


def _read_zip_sdist(path: Path, dist: DistFile) -> bytes:
    with _zip(path, dist.filename) as (zf, infos):
        top = _single_top({i.filename.split("/")[0] for i in infos}, dist.filename)
        matching = [i for i in infos if i.filename == f"{top}/PKG-INFO"]
        if len(matching) != 1:
            raise BadRequest(f"{dist.filename} has no single {top}/PKG-INFO")
        return _read_zip_member(zf, matching[0], f"{dist.filename}: PKG-INFO")


def _single_top(tops: set[str], filename: str) -> str:
    if len(tops) != 1 or next(iter(tops)) in ("", ".", ".."):
        raise BadRequest(f"{filename}: an sdist holds exactly one top-level directory")
    return next(iter(tops))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:100]}" if str(exc) else type(exc).__name__


# --- tar.gz sdists ---------------------------------------------------------------------

class _Inflater:
    """A gzip stream read in bounded pieces, counting every inflated byte."""

    def __init__(self, fh: BinaryIO, filename: str) -> None:
        self._gz = gzip.GzipFile(fileobj=fh, mode="rb")
        self._filename = filename
        self.total = 0

    def read(self, n: int) -> bytes:
        """Exactly n bytes; b"" at a clean end of stream. Raises BadRequest."""
        data = self._gz.read(n)
        self.total += len(data)
        if self.total > MAX_SDIST_INFLATED:
            raise BadRequest(
                f"{self._filename} inflates to more than {MAX_SDIST_INFLATED} bytes"
            )
        if data and len(data) != n:
            raise BadRequest(f"{self._filename}: tar archive is truncated")
        return data

    def read_exact(self, n: int) -> bytes:
        if n and not (data := self.read(n)):
            raise BadRequest(f"{self._filename}: tar archive is truncated")
        return data if n else b""

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _CHUNK)
            self.read_exact(step)
            n -= step


def _blocks(size: int) -> int:
    return (size + 511) // 512 * 512


def _tar_number(field: bytes, filename: str) -> int:
    """A tar number field: octal text, or GNU base-256 (high bit set)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise BadRequest(f"{filename}: invalid tar header") from None


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, filename: str) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records (POSIX pax extended header)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[pos: pos + length]
        if length <= 0 or len(record) != length or not record.endswith(b"\n") \
                or b"=" not in record:
            raise BadRequest(f"{filename}: malformed pax header")
        key, _, value = record[space - pos + 1: -1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos
_EXTENDED = (b"x", b"X", b"g", b"L", b"K")  # pax (local, Solaris, global), GNU long names


@dataclass(frozen=True, slots=True)
class _TarHeader:
    kind: bytes
    size: int
    name: str


def _tar_header(block: bytes, filename: str) -> _TarHeader:
    """One 512-byte ustar/GNU header, read the way tarfile reads it."""
    stored = _tar_number(block[148:156], filename)
    unsigned = 256 + sum(block[:148]) + sum(block[156:])
    # Some tars sum signed chars (tarfile accepts both).
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise BadRequest(f"{filename} is not a valid tar.gz (bad header checksum)")
    kind, name = block[156:157], _tar_text(block[0:100])
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"  # a v7 directory
    if kind == b"5":
        name = name.rstrip("/")
    prefix = _tar_text(block[345:500])
    if prefix and kind not in _EXTENDED:
        name = prefix + "/" + name
    return _TarHeader(kind, _tar_number(block[124:136], filename), name)


def _extended(header: _TarHeader, data: bytes, filename: str) -> dict[str, str]:
    """What an extended header says about the next member: {"path", "size"}."""
    if header.kind == b"L":
        return {"path": _tar_text(data)}
    if header.kind == b"K":
        return {}
    records = _pax_records(data, filename)
    if any(k.startswith("GNU.sparse") for k in records) or (
        header.kind == b"g" and ("path" in records or "size" in records)
    ):
        raise BadRequest(f"{filename}: unsupported pax header in the sdist")
    return {} if header.kind == b"g" else records


def _read_tar_sdist(path: Path, dist: DistFile) -> bytes:
    """Walk the tar headers in the gzip stream. tarfile reads pax, GNU long-name
    and sparse headers into memory with no bound, so it never sees these bytes."""
    filename = dist.filename
    top: str | None = None
    pkg_info: bytes | None = None
    nxt: dict[str, str] = {}  # from extended headers, for the next member
    members = extended = 0
    with open(path, "rb") as fh:
        src = _Inflater(fh, filename)
        while (block := src.read(512)) and block != bytes(512):  # tarfile stops there too
            header = _tar_header(block, filename)
            if header.kind in _EXTENDED:
                extended += 1
                if extended > MAX_MEMBERS:
                    raise BadRequest(f"{filename} has more than {MAX_MEMBERS} extended headers")
                if not 0 <= header.size <= MAX_TAR_HEADER_DATA:
                    raise BadRequest(f"{filename}: tar extended header larger than "
                                     f"{MAX_TAR_HEADER_DATA} bytes")
                data = src.read_exact(_blocks(header.size))[: header.size]
                nxt = {**nxt, **_extended(header, data, filename)}
                continue
            if header.kind == b"S":
                raise BadRequest(f"{filename}: sparse files are not accepted in an sdist")
            members += 1
            if members > MAX_MEMBERS:
                raise BadRequest(f"{filename} has more than {MAX_MEMBERS} members")
            name = nxt.get("path", header.name)
            try:
                size = int(nxt.get("size", header.size))
            except ValueError:
                size = -1
            nxt = {}
            if size < 0:
                raise BadRequest(f"{filename}: invalid tar header (size)")
            first = name.split("/")[0]
            top = _single_top({top or first, first}, filename)
            if header.kind in _NO_DATA:
                continue
            if header.kind in _REGULAR and name == f"{top}/PKG-INFO":
                if size > MAX_METADATA_BYTES:
                    raise BadRequest(
                        f"{filename}: PKG-INFO is larger than {MAX_METADATA_BYTES} bytes"
                    )
                # Extraction keeps the last member of a name: so does this.
                pkg_info = src.read_exact(size)
                src.skip(_blocks(size) - size)
            else:
                src.skip(_blocks(size))
    if top is None:
        raise BadRequest(f"{filename} is an empty archive")
    if pkg_info is None:
        raise BadRequest(f"{filename} has no {top}/PKG-INFO regular file")
    return pkg_info


def read_sdist_metadata(path: Path, dist: DistFile) -> CoreMetadata:
    """The sdist's <top>/PKG-INFO, checked against its filename. Blocking."""
    if dist.filename.endswith(".zip"):
        try:
            raw = _read_zip_sdist(path, dist)
        except _ZIP_ERRORS as exc:
            raise BadRequest(f"{dist.filename} is not a valid sdist: {_describe(exc)}") from None
    else:
        try:
            raw = _read_tar_sdist(path, dist)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise BadRequest(f"{dist.filename} is not a valid tar.gz: {_describe(exc)}") from None
    return check_core_metadata(raw, dist, "PKG-INFO")
