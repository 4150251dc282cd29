"""GET/HEAD of the simple index and its files: negotiate, ETag/304, gzip, redirects.

Thin handlers: parse the request, ask the Index, render the answer.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import BaseRequest
from packaging.utils import NormalizedName

from .dists import name_from_url
from .download import Download, FileSpan
from .errors import NotFound, ProxyError
from .fsutil import safe_join
from .index import LocalFile, Rendered
from .logs import CACHE_OUTCOME
from .metrics import Metrics
from .simple_api import negotiate, render_root_html, render_root_json
from .state import CONFIG, INDEX, METRICS

log = logging.getLogger("indexguard.web")

_VARY = "Accept, Accept-Encoding"
# Pages are revalidated on every use (cheap with ETag/304), so a fresh upload or
# a newly reserved name is seen at once by clients with an HTTP cache.
_PAGE_CACHE_CONTROL = "max-age=0, must-revalidate"
_FILE_CACHE_CONTROL = "public, max-age=31536000, immutable"
# Pages carry upstream text (escaped, but a second wall costs nothing): no
# script, style, frame, form or base URL may run or load from them; pip and uv
# only read the links. nosniff keeps a browser from reading JSON as HTML.
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}
_HTML_HEADERS = {
    **_NOSNIFF,
    "Content-Security-Policy":
        "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


def _page_headers(content_type: str) -> dict[str, str]:
    return _HTML_HEADERS if "html" in content_type else _NOSNIFF


def _client(request: web.Request) -> str:
    return request.remote or "-"


def _etag_matches(request: web.Request, etags: tuple[str, ...]) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    offered = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in offered or any(e in offered for e in etags)


def respond_page(request: web.Request, page: Rendered) -> web.Response:
    gz_etag = page.etag[:-1] + '-gz"'
    headers = {"Vary": _VARY, "Cache-Control": _PAGE_CACHE_CONTROL,
               **_page_headers(page.content_type)}
    use_gzip = page.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", "")
    etag = gz_etag if use_gzip else page.etag
    headers["ETag"] = etag
    request[CACHE_OUTCOME] = page.source
    if _etag_matches(request, (page.etag, gz_etag)):
        return web.Response(status=304, headers=headers)
    if use_gzip:
        headers["Content-Encoding"] = "gzip"
        body = page.gzipped
    else:
        body = page.body
    headers["Content-Type"] = (
        f"{page.content_type}; charset=utf-8" if "html" in page.content_type else page.content_type
    )
    return web.Response(body=body, headers=headers)


def _project_name(raw: str) -> NormalizedName:
    """Raises NotFound for anything that is not a project name: such a request
    never reaches the store or the upstream."""
    name = name_from_url(raw)
    if name is None:
        raise NotFound("Not a valid project name")
    return name


def _normalized_or_redirect(request: web.Request, raw: str, suffix: str) -> NormalizedName:
    name = _project_name(raw)
    if raw != name:
        # PEP 503: redirect to the normalized URL; relative, for path prefixes.
        location = f"../{quote(name)}{suffix}"
        if request.query_string:
            location += "?" + request.query_string
        raise web.HTTPMovedPermanently(location)
    return name


async def root(request: web.Request) -> web.StreamResponse:
    fmt, ctype = negotiate(request.headers.get("Accept"), request.query.get("format"))
    names = await request.app[INDEX].root_names()
    body = render_root_json(names) if fmt == "json" else render_root_html(names)
    return web.Response(body=body, headers={
        "Content-Type": f"{ctype}; charset=utf-8" if fmt == "html" else ctype,
        "Vary": _VARY, "Cache-Control": _PAGE_CACHE_CONTROL, **_page_headers(ctype),
    })


async def project(request: web.Request) -> web.StreamResponse:
    name = _normalized_or_redirect(request, request.match_info["project"], "/")
    config = request.app[CONFIG].current
    fmt, ctype = negotiate(request.headers.get("Accept"), request.query.get("format"))
    page = await request.app[INDEX].rendered(name, fmt, ctype, config, _client(request))
    return respond_page(request, page)


async def project_no_slash(request: web.Request) -> web.StreamResponse:
    raw = request.match_info["project"]
    location = f"{quote(_project_name(raw))}/"
    if request.query_string:
        location += "?" + request.query_string
    raise web.HTTPMovedPermanently(location)


def _content_type(filename: str) -> str:
    if filename.endswith(".metadata"):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


async def dist_file(request: web.Request) -> web.StreamResponse:
    raw, filename = request.match_info["project"], request.match_info["filename"]
    name = _project_name(raw)
    # Reject traversal and odd names before anything touches the disk.
    safe_join(request.app[INDEX].store.root, name, filename)
    if raw != name:
        raise web.HTTPMovedPermanently(f"../{quote(name)}/{quote(filename)}")
    config = request.app[CONFIG].current
    source = await request.app[INDEX].file(
        name, filename, config, _client(request), head=request.method == "HEAD"
    )
    metrics = request.app[METRICS]
    headers = {"Content-Type": _content_type(filename), "Cache-Control": _FILE_CACHE_CONTROL}
    # The content hash is the strongest validator there is; FileResponse adds its
    # own mtime-size ETag for cached files, and both answer 304.
    hash_etag = f'"{source.sha256}"' if source.sha256 else None
    if hash_etag and _etag_matches(request, (hash_etag,)):
        return web.Response(status=304, headers={"ETag": hash_etag, **headers})
    if isinstance(source, LocalFile):
        request[CACHE_OUTCOME] = source.source
        # FileResponse: sendfile, Range, and ETag/304 from the file's mtime and size.
        return _CountedFileResponse(
            source.path, metrics, source.source, chunk_size=256 * 1024, headers=headers,
        )
    request[CACHE_OUTCOME] = "upstream"
    headers["ETag"] = f'"{source.sha256}"'
    if source.size is not None:
        headers["Content-Length"] = str(source.size)
    if source.download is None:  # HEAD of an uncached file: answered from the page
        return web.Response(headers=headers)
    return await _stream(request, source.download, headers, metrics)


class _CountedFileResponse(web.FileResponse):
    """Counts the bytes it sends; only prepare() knows the status and range."""

    def __init__(self, path: Path, metrics: Metrics, source: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._metrics = metrics
        self._source = source

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method != "HEAD" and self.status in (200, 206):
            self._metrics.count(
                self._metrics.bytes_served, self._source, amount=self.content_length or 0
            )
        return writer


def byte_range(wanted: slice, total: int) -> tuple[int, int] | None:
    """[start, stop) of a parsed Range header (aiohttp's http_range) within a
    file of total bytes, None if no byte of it is in the file; as FileResponse
    reads it, so a cached and an uncached file answer a Range alike."""
    start, stop = wanted.start, wanted.stop
    if start is None:
        return None if stop is None else (0, min(stop, total))
    if start < 0:  # a suffix: the last -start bytes
        start = max(total + start, 0)
    stop = total if stop is None else min(stop, total)
    return (start, stop) if start < stop else None


async def _stream(
    request: web.Request, download: Download, headers: dict[str, str], metrics: Metrics,
) -> web.StreamResponse:
    status, start, stop = 200, 0, None
    await download.started.wait()  # upstream has answered: the size is known, if ever
    if "Range" in request.headers:
        # A Range on a file still arriving (uv reads wheels' metadata so, and a
        # request can land between the last byte and the cache commit) gets
        # the same 206 or 416 as a cached file would.
        total = download.total
        if total is not None:
            try:
                wanted = byte_range(request.http_range, total)
            except ValueError:
                wanted = None
            if wanted is None:
                headers.pop("Content-Length", None)
                headers["Content-Range"] = f"bytes */{total}"
                return web.Response(status=416, headers=headers)
            (start, stop), status = wanted, 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
    # sendfile needs the body unframed: a known length, no chunked encoding.
    length = (stop - start) if stop is not None else download.total
    chunks = download.chunks(start, stop, spans=length is not None)
    try:
        first = await anext(chunks, b"")  # errors before any byte become a clean 4xx/5xx
        if length is not None:
            headers["Content-Length"] = str(length)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        sent = 0
        try:
            piece = first
            while piece:
                if isinstance(piece, FileSpan):
                    # Behind the memory window: the kernel copies from the
                    # transfer's file, as for a cached file.
                    transport = request.transport
                    if transport is None:
                        return response
                    try:
                        await asyncio.get_running_loop().sendfile(
                            transport, piece.file, piece.offset, piece.count
                        )
                    except (OSError, RuntimeError):
                        # The client went away (RuntimeError: the transport is
                        # closing), or the file could not be read: cut the
                        # connection as for any failure mid-body.
                        transport.abort()
                        return response
                else:
                    await response.write(piece)
                sent += len(piece)
                piece = await anext(chunks, b"")
        except ProxyError as exc:
            # Headers are out: the only honest signal left is a cut connection,
            # which pip and uv report as a failed download.
            log.warning("upstream transfer failed mid-stream",
                        extra={"path": request.path, "reason": exc.reason})
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            metrics.count(metrics.bytes_served, "upstream", amount=sent)
    finally:
        await chunks.aclose()
    await response.write_eof()
    return response
