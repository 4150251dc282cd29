"""The legacy upload form as twine posts it, built by hand for raw-HTTP tests."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable


def multipart(
    fields: Iterable[tuple[str, str]], file: tuple[str, bytes] | None,
    boundary: str | None = None,
) -> tuple[bytes, str]:
    """A twine-style multipart/form-data body: (body, content type)."""
    boundary = boundary or uuid.uuid4().hex
    out: list[bytes] = []
    for key, value in fields:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                   .encode() + value.encode() + b"\r\n")
    if file is not None:
        filename, content = file
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="content"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + content + b"\r\n"
        )
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def upload_fields(name: str, version: str, content: bytes) -> list[tuple[str, str]]:
    """The text fields twine sends for a py3 wheel."""
    return [
        (":action", "file_upload"), ("protocol_version", "1"), ("metadata_version", "2.1"),
        ("name", name), ("version", version), ("filetype", "bdist_wheel"),
        ("pyversion", "py3"), ("sha256_digest", hashlib.sha256(content).hexdigest()),
    ]
