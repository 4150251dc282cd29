"""Rendering of PEP 503 HTML and PEP 691 JSON simple pages for the fake upstream.

Kept apart from the server so tests can render the expected page themselves.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from packaging.utils import NormalizedName
from packaging.version import Version

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
API_VERSION = "1.1"

# Clients may ask for "latest"; PEP 691 says the server answers with a concrete version.
_ALIASES = {
    "application/vnd.pypi.simple.latest+json": JSON_V1,
    "application/vnd.pypi.simple.latest+html": HTML_V1,
}
# On equal quality the plainest type wins, as PyPI answers `*/*` with HTML.
_OFFERED = (TEXT_HTML, HTML_V1, JSON_V1)


@dataclass(frozen=True, slots=True)
class UpstreamFile:
    """One file the fake upstream serves, with everything its page says about it."""

    filename: str
    project: NormalizedName
    version: Version
    path: Path
    sha256: str
    size: int
    upload_time: datetime | None
    yanked: bool | str
    requires_python: str | None
    metadata: bytes | None
    metadata_sha256: str | None


def format_upload_time(value: datetime) -> str:
    """PEP 700 upload-time: UTC with microseconds and a Z suffix, as PyPI writes it."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _media_matches(pattern: str, offered: str) -> int | None:
    """Specificity of a match (2 exact, 1 type/*, 0 */*) or None."""
    if pattern == offered:
        return 2
    if pattern == "*/*":
        return 0
    if pattern.endswith("/*") and offered.startswith(pattern[:-1]):
        return 1
    return None


def negotiate(accept: str | None, fmt: str | None = None) -> str:
    """Pick the content type of a simple page from Accept (or PyPI's ?format=)."""
    if fmt:
        chosen = _ALIASES.get(fmt, fmt)
        return chosen if chosen in _OFFERED else TEXT_HTML
    if not accept:
        return TEXT_HTML
    scores: dict[str, tuple[float, int]] = {}
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        media = _ALIASES.get(media.lower(), media.lower())
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for offered in _OFFERED:
            spec = _media_matches(media, offered)
            if spec is None:
                continue
            # The most specific range decides an offered type's quality (RFC 9110).
            if offered not in scores or spec > scores[offered][1]:
                scores[offered] = (q, spec)
    best = TEXT_HTML
    best_score = (0.0, -1)
    for offered in _OFFERED:
        score = scores.get(offered)
        if score is not None and score[0] > 0 and score > best_score:
            best, best_score = offered, score
    return best


def file_url(base: str, filename: str) -> str:
    return f"{base}/files/{quote(filename)}"


def _json_file(base: str, f: UpstreamFile) -> dict[str, object]:
    meta: dict[str, str] | bool = (
        {"sha256": f.metadata_sha256} if f.metadata_sha256 is not None else False
    )
    entry: dict[str, object] = {
        "filename": f.filename,
        "url": file_url(base, f.filename),
        "hashes": {"sha256": f.sha256},
        "requires-python": f.requires_python,
        "yanked": f.yanked,
        "core-metadata": meta,
        "dist-info-metadata": meta,
        "size": f.size,
    }
    if f.upload_time is not None:
        entry["upload-time"] = format_upload_time(f.upload_time)
    return entry


def _html_anchor(base: str, f: UpstreamFile) -> str:
    attrs = [f'href="{html.escape(file_url(base, f.filename))}#sha256={f.sha256}"']
    if f.requires_python is not None:
        attrs.append(f'data-requires-python="{html.escape(f.requires_python)}"')
    if f.yanked is not False:
        reason = "" if f.yanked is True else str(f.yanked)
        attrs.append(f'data-yanked="{html.escape(reason)}"')
    if f.metadata_sha256 is not None:
        attrs.append(f'data-dist-info-metadata="sha256={f.metadata_sha256}"')
        attrs.append(f'data-core-metadata="sha256={f.metadata_sha256}"')
    return f"    <a {' '.join(attrs)}>{html.escape(f.filename)}</a><br />"


def _html_page(title: str, lines: Iterable[str]) -> bytes:
    head = (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
    )
    return (head + "\n".join(lines) + "\n  </body>\n</html>\n").encode()


def render_project(
    base: str, name: NormalizedName, files: Sequence[UpstreamFile], content_type: str
) -> bytes:
    """A project page listing files in the given order."""
    if content_type == JSON_V1:
        versions = sorted({f.version for f in files})
        doc = {
            "meta": {"api-version": API_VERSION},
            "name": name,
            "files": [_json_file(base, f) for f in files],
            "versions": [str(v) for v in versions],
        }
        return json.dumps(doc).encode()
    lines = [f"    <h1>Links for {html.escape(name)}</h1>"]
    lines.extend(_html_anchor(base, f) for f in files)
    return _html_page(f"Links for {name}", lines)


def render_root(names: Sequence[NormalizedName], content_type: str) -> bytes:
    """The /simple/ index of all project names."""
    if content_type == JSON_V1:
        doc = {"meta": {"api-version": API_VERSION}, "projects": [{"name": n} for n in names]}
        return json.dumps(doc).encode()
    anchors = (f'    <a href="/simple/{quote(n)}/">{html.escape(n)}</a><br />' for n in names)
    return _html_page("Simple index", anchors)
