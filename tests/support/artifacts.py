"""Real wheels and sdists built in-process, without network or a build backend.

Tests use them to feed the fake upstream and the proxy with installable files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import time
import zipfile
from collections.abc import Sequence
from email.parser import BytesParser
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

_GENERATOR = "indexguard-tests (1.0)"


def dist_stem(name: str) -> str:
    """The file-name form of a project name (wheel spec / sdist spec)."""
    return canonicalize_name(name).replace("-", "_")


def import_name(name: str) -> str:
    """The top-level package the built distribution installs."""
    return name.replace("-", "_").replace(".", "_").lower()


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _metadata_text(
    name: str,
    version: str,
    metadata_version: str,
    requires_python: str | None,
    requires_dist: Sequence[str],
    description: str | None = None,
    description_content_type: str | None = None,
) -> str:
    lines = [
        f"Metadata-Version: {metadata_version}",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: Test distribution {name}",
    ]
    if requires_python is not None:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {req}" for req in requires_dist)
    if description_content_type is not None:
        lines.append(f"Description-Content-Type: {description_content_type}")
    # Metadata 2.1: the description is the message body.
    return "\n".join(lines) + "\n\n" + (description or "")


def build_wheel(
    dest: Path,
    name: str,
    version: str,
    *,
    requires_python: str | None = None,
    metadata_version: str = "2.1",
    requires_dist: Sequence[str] = (),
    extra_bytes: int = 0,
    module_text: str | None = None,
    description: str | None = None,
    description_content_type: str | None = None,
) -> Path:
    """Write a pure-python py3-none-any wheel into dest and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    # The spec wants the normalized version in file and dist-info names.
    norm_version = str(Version(version))
    stem = dist_stem(name)
    pkg = import_name(name)
    dist_info = f"{stem}-{norm_version}.dist-info"
    text = module_text if module_text is not None else f'__version__ = "{version}"\n'
    members: list[tuple[str, bytes]] = [(f"{pkg}/__init__.py", text.encode())]
    if extra_bytes > 0:
        # Random bytes so deflate cannot shrink them: the wheel really is big.
        members.append((f"{pkg}/blob.bin", os.urandom(extra_bytes)))
    meta = _metadata_text(name, version, metadata_version, requires_python, requires_dist,
                          description, description_content_type)
    members.append((f"{dist_info}/METADATA", meta.encode()))
    wheel_text = (
        f"Wheel-Version: 1.0\nGenerator: {_GENERATOR}\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"
    )
    members.append((f"{dist_info}/WHEEL", wheel_text.encode()))
    record = "".join(f"{arc},{_record_hash(data)},{len(data)}\n" for arc, data in members)
    record += f"{dist_info}/RECORD,,\n"
    members.append((f"{dist_info}/RECORD", record.encode()))

    path = dest / f"{stem}-{norm_version}-py3-none-any.whl"
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arc, data in members:
            # A fixed timestamp keeps equal inputs byte-identical (same sha256).
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            # Deflating random bytes costs seconds per 100 MB and saves nothing.
            is_blob = arc.endswith("/blob.bin")
            info.compress_type = zipfile.ZIP_STORED if is_blob else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    # Rename last so a reader never sees a half-written wheel.
    tmp.replace(path)
    return path


def build_sdist(dest: Path, name: str, version: str) -> Path:
    """Write a .tar.gz sdist (PKG-INFO, pyproject.toml, module) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    norm_version = str(Version(version))
    root = f"{dist_stem(name)}-{norm_version}"
    pkg = import_name(name)
    pyproject = (
        '[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
    )
    members = [
        (f"{root}/PKG-INFO", _metadata_text(name, version, "2.1", None, ()).encode()),
        (f"{root}/pyproject.toml", pyproject.encode()),
        (f"{root}/{pkg}/__init__.py", f'__version__ = "{version}"\n'.encode()),
    ]
    path = dest / f"{root}.tar.gz"
    tmp = path.with_name(path.name + ".part")
    now = int(time.time())
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for arc, data in members:
            info = tarfile.TarInfo(arc)
            info.size = len(data)
            info.mtime = now
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def wheel_metadata(path: Path) -> bytes:
    """The METADATA bytes of a wheel (what PEP 658 serves as `<file>.metadata`)."""
    with zipfile.ZipFile(path) as zf:
        candidates = [
            n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
        ]
        if len(candidates) != 1:
            raise ValueError(f"{path.name}: expected one .dist-info/METADATA, got {candidates}")
        return zf.read(candidates[0])


def metadata_field(metadata: bytes, field: str) -> str | None:
    """One header of core metadata bytes, None when absent."""
    value = BytesParser().parsebytes(metadata, headersonly=True).get(field)
    return None if value is None else str(value)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so big wheels stay cheap."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
