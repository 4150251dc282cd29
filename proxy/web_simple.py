"""GET/HEAD of the simple index and its files: negotiate, ETag/304, gzip, redirects.

Thin handlers: parse the request, ask the Index, render the answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict
from packaging.utils import NormalizedName

from .answers import RemoteFile, Rendered
from .auth import ANONYMOUS
from .config import Config
from .dists import METADATA_SUFFIX, guess_project, is_safe_filename, name_from_url
from .download import Download, FileSpan
from .errors import Forbidden, NotFound, ProxyError, quoted
from .logs import CACHE_OUTCOME, CLIENT
from .metrics import Metrics
from .model import is_sha256
from .reader import View
from .reader import view as view_
from .resolve import may_read_group, may_read_index
from .simple_api import negotiate, render_root_html, render_root_json
from .state import CONFIG, IDENTITY, METRICS, READER
from .storage import LocalFile, RedirectFile, StoredFile, StreamedFile

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
# ASCII digits only: \d would take other scripts' digits too.
_BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)


def _client(request: web.Request) -> str:
    return request.get(CLIENT) or request.remote or "-"


def _etag_matches(request: web.Request, etags: tuple[str, ...]) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    offered = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in offered or any(e in offered for e in etags)


def respond_page(request: web.Request, page: Rendered) -> web.Response:
    use_gzip = page.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", "")
    request[CACHE_OUTCOME] = page.source
    if "If-None-Match" in request.headers and _etag_matches(
        request, (page.etag, page.etag[:-1] + '-gz"')
    ):
        return web.Response(status=304, headers=_page_wire(page, use_gzip, not_modified=True))
    body = page.gzipped if use_gzip else page.body
    return web.Response(body=body, headers=_page_wire(page, use_gzip))


def _page_wire(page: Rendered, use_gzip: bool, not_modified: bool = False) -> CIMultiDict[str]:
    """A page's headers, built once per variant and kept with the rendering
    (aiohttp copies them into each response)."""
    key = f"{'gz' if use_gzip else 'plain'}{'-304' if not_modified else ''}"
    wire: CIMultiDict[str] | None = page.wire.get(key)
    if wire is None:
        wire = CIMultiDict({"Vary": _VARY, "Cache-Control": _PAGE_CACHE_CONTROL,
                            **_page_headers(page.content_type)})
        wire["ETag"] = page.etag[:-1] + '-gz"' if use_gzip else page.etag
        if not not_modified:
            if use_gzip:
                wire["Content-Encoding"] = "gzip"
            wire["Content-Type"] = (
                f"{page.content_type}; charset=utf-8" if "html" in page.content_type
                else page.content_type
            )
        page.wire[key] = wire
    return wire




def view_of(request: web.Request, config: Config) -> View:
    """What the URL reads, checked against the caller's token patterns.

    /simple/ is the default group; /g/<group>/ a group; /i/<index>/ one index
    alone; GitLab's project and group routes read through the group their
    alias names. Raises NotFound (no such view), Forbidden (not the token's).
    """
    info = request.match_info
    registry = config.registry
    if "group" in info:
        if registry.group(info["group"]) is None:
            raise NotFound(f"No group named {quoted(info['group'])}")
        view = view_("group", info["group"])
    elif "index" in info:
        if registry.index(info["index"]) is None:
            raise NotFound(f"No index named {quoted(info['index'])}")
        view = view_("index", info["index"])
    elif "gl_project" in info:
        alias = registry.gitlab.project(info["gl_project"])
        if alias is None:
            raise NotFound(f"No GitLab project {quoted(info['gl_project'])} (gitlab.projects)")
        view = view_("group", alias.group)
    elif "gl_group" in info:
        group = registry.gitlab.group(info["gl_group"])
        if group is None:
            raise NotFound(f"No GitLab group {quoted(info['gl_group'])} (gitlab.groups)")
        view = view_("group", group)
    else:
        view = view_("group", registry.default_group.name)
    identity = request.get(IDENTITY, ANONYMOUS)
    if identity is ANONYMOUS:
        return view  # let through by edge(): anonymous reads are on
    if view.kind == "group" and not may_read_group(identity, view.name):
        raise Forbidden(f"Token {identity.name} may not read group {view.name}")
    if view.kind == "index" and not may_read_index(identity, view.name):
        raise Forbidden(f"Token {identity.name} may not read index {view.name}")
    return view


def private_cache_control(value: str | None) -> str:
    """The Cache-Control value with `public` replaced by `private`, the rest kept
    (max-age=0, must-revalidate for pages; immutable for files)."""
    kept = [d.strip() for d in (value or "").split(",")
            if d.strip() and d.strip().lower() not in ("public", "private")]
    return ", ".join(["private", *kept])


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
    config = request.app[CONFIG].current
    view = view_of(request, config)
    fmt, ctype = negotiate(request.headers.get("Accept"), request.query.get("format"))
    names = await request.app[READER].root_names(config, view)
    body = render_root_json(names) if fmt == "json" else render_root_html(names)
    return web.Response(body=body, headers={
        "Content-Type": f"{ctype}; charset=utf-8" if fmt == "html" else ctype,
        "Vary": _VARY, "Cache-Control": _PAGE_CACHE_CONTROL, **_page_headers(ctype),
    })


async def project(request: web.Request) -> web.StreamResponse:
    name = _normalized_or_redirect(request, request.match_info["project"], "/")
    config = request.app[CONFIG].current
    view = view_of(request, config)
    fmt, ctype = negotiate(request.headers.get("Accept"), request.query.get("format"))
    page = await request.app[READER].rendered(name, fmt, ctype, config, _client(request), view)
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
    """A file, cached, private or streamed from upstream; HEAD answers what GET
    would (status and headers), from the same code path."""
    return await _project_file(
        request, request.match_info["project"], request.match_info["filename"]
    )


def _check_file_name(filename: str) -> None:
    """Refuse traversal and odd names before anything touches the disk (the
    stores join paths with fsutil.safe_join too). Raises NotFound."""
    if not is_safe_filename(filename):
        raise NotFound("Not found")


async def _project_file(request: web.Request, raw: str, filename: str) -> web.StreamResponse:
    name = _project_name(raw)
    _check_file_name(filename)
    if raw != name:
        raise web.HTTPMovedPermanently(f"../{quote(name)}/{quote(filename)}")
    config = request.app[CONFIG].current
    view = view_of(request, config)
    source = await request.app[READER].file(name, filename, config, _client(request), view,
                                            redirect=request.method == "GET")
    return await _answer_file(request, filename, source)


async def gitlab_file(request: web.Request) -> web.StreamResponse:
    """GitLab's file URL, .../files/<sha256>/<filename>: served only when the file
    the name resolves to in the view has that sha256. Our own pages link
    .../files/<project>/<filename> under the same prefix: both forms land here."""
    key, filename = request.match_info["key"], request.match_info["filename"]
    if not is_sha256(key):
        return await _project_file(request, key, filename)
    project = guess_project(filename.removesuffix(METADATA_SUFFIX))
    if project is None:
        raise NotFound(f"Not a distribution file name: {quoted(filename)}")
    _check_file_name(filename)
    config = request.app[CONFIG].current
    view = view_of(request, config)
    source = await request.app[READER].file(project, filename, config, _client(request), view,
                                            redirect=request.method == "GET")
    if source.sha256 != key:
        if isinstance(source, LocalFile):
            await asyncio.to_thread(source.file.close)
        raise NotFound(f"No file {filename} with sha256 {key}")
    return await _answer_file(request, filename, source)


async def _answer_file(
    request: web.Request, filename: str, source: StoredFile | RedirectFile | RemoteFile,
) -> web.StreamResponse:
    metrics = request.app[METRICS]
    credentialed = request.get(IDENTITY, ANONYMOUS) is not ANONYMOUS
    headers = {
        "Content-Type": _content_type(filename),
        # Sent by the handler itself, so marked here, not by app.edge.
        "Cache-Control": (private_cache_control(_FILE_CACHE_CONTROL) if credentialed
                          else _FILE_CACHE_CONTROL),
        "Accept-Ranges": "bytes", **_NOSNIFF,
    }
    # The content hash is the strongest validator there is, and the same
    # for a cached file and one still arriving.
    if source.sha256:
        headers["ETag"] = f'"{source.sha256}"'
    if isinstance(source, LocalFile):
        request[CACHE_OUTCOME] = source.source
        try:
            if _etag_matches(request, (headers.get("ETag", ""),)):
                return web.Response(status=304, headers=headers)
            return await _send_file(request, source, headers, metrics)
        finally:
            await asyncio.to_thread(source.file.close)
    if isinstance(source, RedirectFile):
        request[CACHE_OUTCOME] = source.source
        if _etag_matches(request, (headers["ETag"],)):
            return web.Response(status=304, headers=headers)
        # The URL expires soon and carries a signature: no cache keeps it.
        # pip and uv follow it without sending this index's credentials.
        return web.Response(status=302, headers={
            "Location": source.url, "Cache-Control": "private, no-store", **_NOSNIFF})
    if isinstance(source, StreamedFile):
        request[CACHE_OUTCOME] = source.source
        if _etag_matches(request, (headers.get("ETag", ""),)):
            return web.Response(status=304, headers=headers)
        return await _send_stored_stream(request, source, headers, metrics)
    request[CACHE_OUTCOME] = "upstream"
    if _etag_matches(request, (headers["ETag"],)):
        return web.Response(status=304, headers=headers)
    return await _stream(request, source.start(), headers, metrics)


def parse_range(header: str, total: int) -> tuple[int, int] | None:
    """[start, stop) of a Range header within a file of total bytes; None when
    it is not one satisfiable byte range (a 416), as RFC 9110 14.1.2 has it: a
    suffix of 0 bytes ("bytes=-0"), a first byte past the end, a last byte
    before the first, or anything that is not "bytes=first-last" (aiohttp's
    FileResponse refuses multiple ranges and other units alike)."""
    m = _BYTE_RANGE.fullmatch(header.strip())
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:  # a suffix: the last n bytes
        n = int(m[2])
        return (max(total - n, 0), total) if n > 0 and total > 0 else None
    start = int(m[1])
    if m[2] and int(m[2]) < start:
        return None
    stop = min(int(m[2]) + 1, total) if m[2] else total
    return (start, stop) if start < total else None


def _wants_range(request: web.Request, etag: str | None) -> bool:
    """A Range to honour: there is one, and If-Range (if any) names our ETag.
    A date in If-Range never matches: the hash is the only validator here."""
    if "Range" not in request.headers:
        return False
    if_range = request.headers.get("If-Range")
    return if_range is None or (etag is not None and if_range.strip() == etag)


def _unsatisfiable(headers: dict[str, str], total: int) -> web.Response:
    # Said, not left to aiohttp: it says it for GET only, and HEAD must agree.
    headers["Content-Length"] = "0"
    headers["Content-Range"] = f"bytes */{total}"
    return web.Response(status=416, headers=headers)


async def _send_file(
    request: web.Request, local: LocalFile, headers: dict[str, str], metrics: Metrics,
) -> web.StreamResponse:
    """A file already open (see Index.file): 200, 206 or 416; sendfile."""
    status, start, stop = 200, 0, local.size
    if _wants_range(request, headers.get("ETag")):
        wanted = parse_range(request.headers["Range"], local.size)
        if wanted is None:
            return _unsatisfiable(headers, local.size)
        (start, stop), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{local.size}"
    headers["Content-Length"] = str(stop - start)
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    if request.method != "HEAD" and stop > start:
        transport = request.transport
        if transport is None:
            return response
        try:
            await asyncio.get_running_loop().sendfile(transport, local.file, start, stop - start)
        except (OSError, RuntimeError):
            # The client went away (RuntimeError: the transport is closing).
            transport.abort()
            return response
        metrics.count(metrics.bytes_served, local.source, amount=stop - start)
    await response.write_eof()
    return response


async def _send_stored_stream(
    request: web.Request, stored: StreamedFile, headers: dict[str, str], metrics: Metrics,
) -> web.StreamResponse:
    """A stored file with no copy on this host (see storage.StreamedFile): 200,
    206 or 416 as for a file on disk, its bytes streamed from the store."""
    status, start, stop = 200, 0, stored.size
    if _wants_range(request, headers.get("ETag")):
        wanted = parse_range(request.headers["Range"], stored.size)
        if wanted is None:
            return _unsatisfiable(headers, stored.size)
        (start, stop), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{stored.size}"
    headers["Content-Length"] = str(stop - start)
    if request.method == "HEAD" or stop <= start:
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        await response.write_eof()
        return response
    chunks = stored.read(start, stop)
    sent = 0
    try:
        first = await anext(chunks, b"")  # a store failure before any byte: a clean 502
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        try:
            piece = first
            while piece:
                await response.write(piece)
                sent += len(piece)
                piece = await anext(chunks, b"")
        except ProxyError as exc:
            # Headers are out: cut the connection (pip and uv report a failed download).
            log.warning("store transfer failed mid-stream",
                        extra={"path": request.path, "reason": exc.reason})
            if request.transport is not None:
                request.transport.abort()
            return response
        finally:
            metrics.count(metrics.bytes_served, stored.source, amount=sent)
    finally:
        await chunks.aclose()
    await response.write_eof()
    return response


async def _stream(
    request: web.Request, download: Download, headers: dict[str, str], metrics: Metrics,
) -> web.StreamResponse:
    await download.started.wait()  # upstream has answered: the size is known, if ever
    if _wants_range(request, headers.get("ETag")) and download.on_disk is None:
        # A Range on a file still arriving (uv reads wheels' metadata so) is
        # answered once the whole file is verified, from the bytes the
        # transfer keeps, as a cached file would be: never a byte before
        # the hash matched. A transfer whose disk failed keeps no such
        # bytes: it answers 200 with the whole stream (below), which a client
        # asking for a range must accept (RFC 9110 14.2).
        with download.kept():
            total = await download.verified()  # its error: a clean 4xx/5xx
            wanted = parse_range(request.headers["Range"], total)
            if wanted is None:
                return _unsatisfiable(headers, total)
            start, stop = wanted
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
            return await _send_chunks(request, download, (start, stop), 206, headers, metrics)
    return await _send_chunks(request, download, (0, None), 200, headers, metrics)


async def _send_chunks(
    request: web.Request, download: Download, span: tuple[int, int | None], status: int,
    headers: dict[str, str], metrics: Metrics,
) -> web.StreamResponse:
    start, stop = span
    # sendfile needs the body unframed: a known length, no chunked encoding.
    length = (stop - start) if stop is not None else download.total
    chunks = download.chunks(start, stop, spans=length is not None)
    try:
        first = await anext(chunks, b"")  # errors before any byte become a clean 4xx/5xx
        if length is not None:
            headers["Content-Length"] = str(length)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
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
