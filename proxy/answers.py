"""What the read path hands the web layer: a rendered page, a stored file
(storage.StoredFile), or an upstream file to stream; and the pure steps from a
page to what a client sees.

No I/O here beyond rendering in memory.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .download import Download
from .guard import matures_at, too_young
from .model import ProjectPage
from .simple_api import Format, render
from .storage import Source

_GZIP_MIN = 512


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    gzipped: bytes | None
    etag: str
    content_type: str
    source: Source
    # The web layer's wire headers for this page, built on first use (per
    # variant: plain, gzip, 304): a warm page is answered thousands of times.
    wire: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file to stream from upstream: start() starts (or joins) its transfer."""

    start: Callable[[], Download]
    size: int | None
    sha256: str


def render_page(page: ProjectPage, fmt: Format, ctype: str, source: Source) -> Rendered:
    body = render(page, fmt)
    digest = hashlib.blake2b(body, digest_size=12).hexdigest()
    gz = gzip.compress(body, 6, mtime=0) if len(body) >= _GZIP_MIN else None
    return Rendered(body, gz, f'"{digest}"', ctype, source)


def visible(
    page: ProjectPage, config: Config, now: float, min_age: float | None,
) -> tuple[ProjectPage, float, int]:
    """Apply the upstream's min_age and drop metadata links the proxy cannot verify.

    Returns the page to show, until when it holds, and how many files it hides.
    """
    files = []
    hidden = 0
    valid_until = float("inf")
    for f in page.files:
        if too_young(f, page.name, config, now, min_age):
            hidden += 1
            valid_until = min(valid_until, matures_at(f, min_age) or valid_until)
            continue
        if f.metadata_hashes is not None and "sha256" not in f.metadata_hashes:
            f = dataclasses.replace(f, metadata_hashes=None)
        files.append(f)
    versions = page.versions if not hidden else ()
    return ProjectPage(page.name, tuple(files), versions), valid_until, hidden


@dataclass(frozen=True, slots=True)
class Prerendered:
    """A fresh upstream page, parsed and rendered for its first asker in one thread hop."""
    page: ProjectPage
    valid_until: float
    hidden: int
    rendered: Rendered

