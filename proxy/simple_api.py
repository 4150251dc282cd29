"""The simple repository wire format: negotiate, render, parse. Pure functions only.

PEP 503 (HTML), PEP 691 (JSON, content negotiation), PEP 592 (yanked),
PEP 658/714 (metadata files), PEP 700 (versions, size, upload-time).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Iterable, Mapping
from html.parser import HTMLParser
from typing import Any, Literal
from urllib.parse import quote, unquote, urldefrag, urljoin, urlsplit

import orjson
from packaging.utils import NormalizedName

from .dists import guess_version, is_safe_filename
from .errors import BadRequest, NotAcceptable, quoted
from .model import (
    FileEntry,
    ProjectPage,
    clean_hashes,
    clean_metadata,
    clean_size,
    clean_text,
    clean_upload_time,
    clean_yanked,
    hex_digest,
)

API_VERSION = "1.1"
JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
_ALIASES = {
    "application/vnd.pypi.simple.latest+json": JSON_V1,
    "application/vnd.pypi.simple.latest+html": HTML_V1,
}
# PEP 691 recommends text/html when the client expresses no preference, so
# that old clients keep working; wildcards resolve in this order.
_SERVER_ORDER = (TEXT_HTML, HTML_V1, JSON_V1)
# What the proxy asks upstream for: JSON carries size and upload-time.
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, {TEXT_HTML};q=0.01"

Format = Literal["html", "json"]


# Clients send a handful of distinct Accept headers (pip's, uv's, a browser's):
# memoizing the pure parse takes it off the hot path (seen in a py-spy profile).
@functools.lru_cache(maxsize=512)
def negotiate(accept: str | None, format_query: str | None = None) -> tuple[Format, str]:
    """Pick (format, content type) per PEP 691 from Accept or PyPI's ?format=.

    Raises NotAcceptable when nothing fits, BadRequest for a malformed q-value.
    """
    if format_query:
        ctype = _ALIASES.get(format_query.strip(), format_query.strip())
        if ctype not in _SERVER_ORDER:
            raise NotAcceptable(f"Unsupported format {quoted(format_query, 80)}")
        return _format_of(ctype), ctype
    if not accept or not accept.strip():
        return "html", TEXT_HTML
    ranges = list(_parse_accept(accept))
    best: tuple[float, int, int, int] | None = None
    chosen = ""
    for server_rank, ctype in enumerate(_SERVER_ORDER):
        match = _match(ctype, ranges)
        if match is None:
            continue
        q, specificity, position = match
        if q <= 0:
            continue
        # Highest q wins; then the most specific range; then the client's
        # order; then the server's order.
        key = (q, specificity, -position, -server_rank)
        if best is None or key > best:
            best, chosen = key, ctype
    if best is None:
        raise NotAcceptable(
            f"None of the Accept types is served; try {JSON_V1} or {TEXT_HTML}"
        )
    return _format_of(chosen), chosen


def _format_of(ctype: str) -> Format:
    return "json" if ctype == JSON_V1 else "html"


def _parse_accept(accept: str) -> Iterable[tuple[str, float]]:
    for item in accept[:4096].split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        if not mtype:
            continue
        q = 1.0
        for param in parts[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    raise BadRequest(
                        f"Invalid q-value in Accept header: {quoted(value, 20)}"
                    ) from None
                if not 0.0 <= q <= 1.0:
                    raise BadRequest(f"Invalid q-value in Accept header: {quoted(value, 20)}")
        yield _ALIASES.get(mtype, mtype), q


def _match(ctype: str, ranges: list[tuple[str, float]]) -> tuple[float, int, int] | None:
    """(q, specificity, position) of the most specific range matching ctype."""
    major = ctype.split("/", 1)[0]
    found: tuple[float, int, int] | None = None
    for position, (mtype, q) in enumerate(ranges):
        if mtype == ctype:
            specificity = 2
        elif mtype == f"{major}/*":
            specificity = 1
        elif mtype == "*/*":
            specificity = 0
        else:
            continue
        if found is None or specificity > found[1]:
            found = (q, specificity, position)
    return found


# --- rendering -----------------------------------------------------------------


def file_href(project: NormalizedName, filename: str) -> str:
    """Relative from /simple/<project>/, so any reverse-proxy prefix works."""
    return f"../../files/{project}/{quote(filename, safe='')}"


def upstream_page_url(index_url: str, project: NormalizedName) -> str:
    """The upstream page of a project; quoted, so no name can steer the request."""
    return urljoin(index_url, f"{quote(project, safe='')}/")


def project_href(project: NormalizedName) -> str:
    return f"{project}/"


def _versions(page: ProjectPage) -> list[str]:
    if page.versions:
        return list(page.versions)
    seen: dict[str, None] = {}
    for entry in page.files:
        version = guess_version(entry.filename, page.name)
        if version is not None:
            seen[version] = None
    return list(seen)


def _hash_fragment(hashes: Mapping[str, str]) -> str:
    # PEP 503 allows one hash in the fragment; sha256 is the one every client checks.
    for algo in ("sha256", "sha384", "sha512"):
        if algo in hashes:
            return f"#{algo}={hashes[algo]}"
    return ""


def _metadata_attr(hashes: Mapping[str, str]) -> str:
    frag = _hash_fragment(hashes)
    return frag[1:] if frag else "true"


def render_project_html(page: ProjectPage) -> bytes:
    name = html.escape(page.name)
    out = [
        "<!DOCTYPE html>\n<html>\n<head>\n"
        f'<meta name="pypi:repository-version" content="{API_VERSION}">\n'
        f"<title>Links for {name}</title>\n</head>\n<body>\n<h1>Links for {name}</h1>\n"
    ]
    for f in page.files:
        # The digest is hex (the models check it) and escaped all the same:
        # every value from upstream is escaped on its way into HTML.
        href = html.escape(file_href(page.name, f.filename) + _hash_fragment(f.hashes))
        attrs = [f'href="{href}"']
        if f.requires_python:
            attrs.append(f'data-requires-python="{html.escape(f.requires_python)}"')
        if f.yanked is not False:
            reason = f.yanked if isinstance(f.yanked, str) else ""
            attrs.append(f'data-yanked="{html.escape(reason)}"')
        if f.metadata_hashes is not None:
            value = html.escape(_metadata_attr(f.metadata_hashes))
            # PEP 714: the new name, plus the old one for pip < 23.3.
            attrs.append(f'data-dist-info-metadata="{value}" data-core-metadata="{value}"')
        out.append(f"<a {' '.join(attrs)}>{html.escape(f.filename)}</a><br>\n")
    out.append("</body>\n</html>\n")
    return "".join(out).encode()


def render_project_json(page: ProjectPage) -> bytes:
    files: list[dict[str, Any]] = []
    for f in page.files:
        item: dict[str, Any] = {
            "filename": f.filename,
            "url": file_href(page.name, f.filename),
            "hashes": dict(f.hashes),
        }
        if f.requires_python:
            item["requires-python"] = f.requires_python
        meta: dict[str, str] | bool = (
            dict(f.metadata_hashes) or True if f.metadata_hashes is not None else False
        )
        item["core-metadata"] = meta
        item["dist-info-metadata"] = meta
        item["yanked"] = f.yanked
        if f.size is not None:
            item["size"] = f.size
        if f.upload_time is not None:
            item["upload-time"] = f.upload_time
        files.append(item)
    return orjson.dumps(
        {
            "meta": {"api-version": API_VERSION},
            "name": page.name,
            "files": files,
            "versions": _versions(page),
        }
    )


def render_root_html(names: Iterable[NormalizedName]) -> bytes:
    links = "".join(
        f'<a href="{html.escape(project_href(n))}">{html.escape(n)}</a><br>\n' for n in names
    )
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        f'<meta name="pypi:repository-version" content="{API_VERSION}">\n'
        f"<title>Simple index</title>\n</head>\n<body>\n{links}</body>\n</html>\n"
    ).encode()


def render_root_json(names: Iterable[NormalizedName]) -> bytes:
    return orjson.dumps(
        {"meta": {"api-version": API_VERSION}, "projects": [{"name": n} for n in names]}
    )


def render(page: ProjectPage, fmt: Format) -> bytes:
    return render_project_json(page) if fmt == "json" else render_project_html(page)


# --- parsing upstream pages -----------------------------------------------------


class PageParseError(ValueError):
    """The upstream answered 200 with something that is not a simple page."""


def parse_page(
    body: bytes, content_type: str, page_url: str, project: NormalizedName
) -> ProjectPage:
    """Parse an upstream project page; file origins become absolute URLs.

    Raises PageParseError for garbage (the caller treats it as upstream failure).
    """
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype.endswith("+json") or ctype == "application/json":
        return _parse_json(body, page_url, project)
    if ctype in (TEXT_HTML, HTML_V1):
        return _parse_html(body, page_url, project)
    raise PageParseError(f"unexpected content type {quoted(ctype)}")


def _origin(page_url: str, href: object) -> str | None:
    """The absolute URL of a file link; None for a non-string or unparsable one
    (urljoin raises ValueError for a bracketed host that is not IPv6)."""
    if not isinstance(href, str) or not href:
        return None
    try:
        return urljoin(page_url, href)
    except ValueError:
        return None


def _parse_json(body: bytes, page_url: str, project: NormalizedName) -> ProjectPage:
    """Every field is typed on the way in: a field of the wrong type is dropped,
    an entry without a usable filename or url is skipped (PEP 691 types)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PageParseError(f"invalid PEP 691 JSON: {exc}") from None
    raw_files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(raw_files, list):
        raise PageParseError("invalid PEP 691 JSON: no files list")
    files = []
    for raw in raw_files:
        if not isinstance(raw, dict):
            continue
        filename = raw.get("filename")
        if not isinstance(filename, str) or not is_safe_filename(filename):
            continue  # could not be served from one path segment: never list it
        origin = _origin(page_url, raw.get("url"))
        if origin is None:
            continue
        meta = raw.get("core-metadata", raw.get("dist-info-metadata"))
        files.append(
            FileEntry(
                filename=filename,
                hashes=clean_hashes(raw.get("hashes")),
                requires_python=clean_text(raw.get("requires-python")),
                yanked=clean_yanked(raw.get("yanked", False)),
                metadata_hashes=clean_metadata(meta),
                size=clean_size(raw.get("size")),
                upload_time=clean_upload_time(raw.get("upload-time")),
                origin=origin,
            )
        )
    raw_versions = data.get("versions")
    versions = (
        tuple(v for v in raw_versions if isinstance(v, str))
        if isinstance(raw_versions, list) else ()
    )
    return ProjectPage(name=project, files=tuple(files), versions=versions)


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._current: dict[str, str | None] | None = None
        self._text: list[str] = []
        self.saw_html = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("html", "body", "head", "meta", "title", "h1"):
            self.saw_html = True
        if tag == "a":
            self._current = dict(attrs)
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._current is not None:
            self.anchors.append((self._current, "".join(self._text).strip()))
            self._current = None


def _parse_html(body: bytes, page_url: str, project: NormalizedName) -> ProjectPage:
    parser = _AnchorParser()
    try:
        parser.feed(body.decode("utf-8"))
        parser.close()
    except UnicodeDecodeError:
        raise PageParseError("invalid PEP 503 HTML: not UTF-8") from None
    except AssertionError:
        raise PageParseError("invalid PEP 503 HTML: malformed markup") from None
    if not parser.saw_html and not parser.anchors:
        raise PageParseError("invalid PEP 503 HTML: no markup")
    files = []
    for attrs, text in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        absolute = _origin(page_url, href)
        if absolute is None:
            continue
        try:
            url, fragment = urldefrag(absolute)
            filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or text
        except ValueError:
            continue
        if not is_safe_filename(filename):
            continue
        yanked_attr = attrs.get("data-yanked")
        meta_attr = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
        meta: dict[str, str] | None = None
        if meta_attr is not None:
            meta = _fragment_hashes(meta_attr)
        files.append(
            FileEntry(
                filename=filename,
                hashes=_fragment_hashes(fragment),
                requires_python=clean_text(attrs.get("data-requires-python")),
                yanked=(yanked_attr or True) if "data-yanked" in attrs else False,
                metadata_hashes=meta,
                origin=url,
            )
        )
    return ProjectPage(name=project, files=tuple(files))


def _fragment_hashes(fragment: str) -> dict[str, str]:
    """`<algo>=<hex>` of a PEP 503 URL fragment (or a PEP 714 attribute; "true"
    gives {}); pip reads `&`-separated pairs, so they are accepted too."""
    hashes: dict[str, str] = {}
    for pair in fragment.split("&"):
        algo, sep, value = pair.partition("=")
        algo = algo.lower()
        digest = hex_digest(algo, value) if sep else None
        if digest is not None:
            hashes.setdefault(algo, digest)
    return hashes
