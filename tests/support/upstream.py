"""FakeUpstream: a PyPI-like simple index on 127.0.0.1, served from a background thread.

Scripted faults (errors, stalls, broken bodies) let tests drive the proxy's failure paths.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from packaging.utils import (
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

from .artifacts import metadata_field, sha256_file, wheel_metadata
from .faults import Fault, FaultBook, Payload, early_response, send
from .simple import (
    HTML_V1,
    JSON_V1,
    TEXT_HTML,
    UpstreamFile,
    file_url,
    negotiate,
    render_project,
    render_root,
)

# aiohttp >= 3.13 warns on plain string keys in request storage; older ones lack RequestKey.
_FAULT_KEY: Any = (
    web.RequestKey("fault", Fault) if hasattr(web, "RequestKey") else "indexguard.fault"
)


class _Default:
    """Marker for 'argument not given' where None is a meaningful value."""


_DEFAULT = _Default()


def _project_of(filename: str) -> tuple[NormalizedName, Version]:
    if filename.endswith(".whl"):
        name, version, _build, _tags = parse_wheel_filename(filename)
    else:
        name, version = parse_sdist_filename(filename)
    return name, version


class FakeUpstream:
    """A real aiohttp simple index; start()/stop() can be repeated on the same port."""

    def __init__(
        self, port: int | None = None, *, require_auth: tuple[str, str] | None = None,
        host: str = "127.0.0.1", missing_status: int = 404, files_base: str | None = None,
    ) -> None:
        self._port = port
        # Opt-in: every request without these Basic credentials gets a 401.
        self.require_auth = require_auth
        # Any loopback address (127.x.y.z): a second host for file links.
        self.host = host
        # What a project page of a name it does not host answers: the PyTorch
        # index says 403 where PyPI says 404.
        self.missing_status = missing_status
        # Where the pages' file links point (another FakeUpstream's base, as the
        # PyTorch index links another host); None: this server's own /files/.
        self.files_base = files_base
        self._lock = threading.Lock()
        self._files: dict[str, UpstreamFile] = {}
        self._requests: list[tuple[str, str]] = []
        self._faults = FaultBook()
        # path -> (status, headers, body): raw answers a hostile upstream scripts.
        self._scripted: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.html_only = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeUpstream:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream is already running")
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._serve, args=(loop, started), name="fake-upstream", daemon=True
        )
        thread.start()
        try:
            started.result(timeout=15)
        except BaseException:
            thread.join(timeout=15)
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Close the listening socket and every connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("FakeUpstream thread did not stop")
        self._loop = self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(
        self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[None]
    ) -> None:
        asyncio.set_event_loop(loop)
        # A short shutdown_timeout so stop() does not wait out a "slow" fault.
        runner = web.AppRunner(self._make_app(), access_log=None, shutdown_timeout=0.5)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self._port or 0, reuse_address=True)
            loop.run_until_complete(site.start())
            self._port = int(runner.addresses[0][1])
        except BaseException as exc:
            loop.run_until_complete(runner.cleanup())
            loop.close()
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    # ----------------------------------------------------------------- addresses
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream has no port before the first start()")
        return self._port

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        """host:port, as an upstream's file_hosts names it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/simple/"

    def file_url(self, filename: str) -> str:
        return file_url(self.files_base or self.base, filename)

    # ----------------------------------------------------------------- content
    def add(
        self,
        path: Path,
        *,
        upload_time: datetime | _Default | None = _DEFAULT,
        yanked: bool | str = False,
        requires_python: str | None = None,
        with_metadata: bool = True,
    ) -> UpstreamFile:
        """Serve a wheel or sdist; re-adding a filename replaces it.

        upload_time defaults to 30 days ago; None leaves it out of the page.
        requires_python defaults to the wheel's own Requires-Python, as PyPI does.
        The bytes are streamed from path on each request (hashes are taken now),
        so keep the file in place and unchanged.
        """
        path = Path(path)
        project, version = _project_of(path.name)
        if isinstance(upload_time, _Default):
            upload_time = datetime.now(UTC) - timedelta(days=30)
        metadata = None
        if path.name.endswith(".whl"):
            raw = wheel_metadata(path)
            if requires_python is None:
                requires_python = metadata_field(raw, "Requires-Python")
            metadata = raw if with_metadata else None
        entry = UpstreamFile(
            filename=path.name,
            project=project,
            version=version,
            path=path,
            sha256=sha256_file(path),
            size=path.stat().st_size,
            upload_time=upload_time,
            yanked=yanked,
            requires_python=requires_python,
            metadata=metadata,
            metadata_sha256=None if metadata is None else hashlib.sha256(metadata).hexdigest(),
        )
        with self._lock:
            self._files[path.name] = entry
        return entry

    def remove(self, filename: str) -> None:
        with self._lock:
            del self._files[filename]

    def files(self, project: str | None = None) -> list[UpstreamFile]:
        with self._lock:
            entries = list(self._files.values())
        if project is not None:
            norm = canonicalize_name(project)
            entries = [f for f in entries if f.project == norm]
        return entries

    # ----------------------------------------------------------------- request log
    @property
    def requests(self) -> list[tuple[str, str]]:
        """A snapshot of every (method, path) received so far."""
        with self._lock:
            return list(self._requests)

    def file_requests(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[1].startswith("/files/")]

    def page_requests(self, project: str | None = None) -> list[tuple[str, str]]:
        if project is None:
            return [r for r in self.requests if r[1].startswith("/simple")]
        wanted = f"/simple/{canonicalize_name(project)}/"
        return [r for r in self.requests if r[1] == wanted]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ----------------------------------------------------------------- faults
    def fault(
        self,
        kind: str | None,
        *,
        path_prefix: str = "/",
        times: int | None = None,
        **params: Any,
    ) -> Fault | None:
        """Script a fault for paths under path_prefix (replacing one on the same prefix).

        kind=None removes the faults at or below path_prefix ("/" removes all);
        times limits the fault to that many requests. Kinds: see faults.FAULT_KINDS.
        """
        return self._faults.set(kind, path_prefix, times, params)

    def clear_faults(self) -> None:
        self._faults.clear()

    # ----------------------------------------------------------------- hostile answers
    def script(
        self,
        path: str,
        body: bytes | str | Any = b"",
        *,
        status: int = 200,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer `path` (exact, query ignored) with exactly these bytes from now on.

        A dict or list body is sent as PEP 691 JSON; a str as text/html; bytes
        with the content_type given. This is how tests play a hostile upstream:
        any page, any status, any header (a `Location` for a redirect).
        """
        if isinstance(body, dict | list):
            raw = json.dumps(body).encode()
            content_type = content_type or JSON_V1
        elif isinstance(body, str):
            raw = body.encode()
            content_type = content_type or f"{TEXT_HTML}; charset=utf-8"
        else:
            raw = bytes(body)
        answer_headers = dict(headers or {})
        if content_type:
            answer_headers["Content-Type"] = content_type
        with self._lock:
            self._scripted[path] = (status, answer_headers, raw)

    def unscript(self, path: str | None = None) -> None:
        """Forget one scripted answer, or all of them."""
        with self._lock:
            if path is None:
                self._scripted.clear()
            else:
                self._scripted.pop(path, None)

    # ----------------------------------------------------------------- HTTP
    def _make_app(self) -> web.Application:
        @web.middleware
        async def entry(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            with self._lock:
                self._requests.append((request.method, request.path))
                scripted = self._scripted.get(request.path)
            if self.require_auth is not None:
                user, password = self.require_auth
                wanted = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                if request.headers.get("Authorization") != wanted:
                    return web.Response(status=401, text="credentials required\n",
                                        headers={"WWW-Authenticate": 'Basic realm="fake"'})
            if scripted is not None:
                status, headers, raw = scripted
                return web.Response(status=status, headers=headers, body=raw)
            fault = self._faults.take(request.path)
            if fault is not None:
                early = await early_response(request, fault)
                if early is not None:
                    return early
                request[_FAULT_KEY] = fault
            return await handler(request)

        app = web.Application(middlewares=[entry])
        app.router.add_get("/simple", self._redirect_root)
        app.router.add_get("/simple/", self._root)
        app.router.add_get("/simple/{project}", self._redirect_project)
        app.router.add_get("/simple/{project}/", self._project)
        app.router.add_get("/files/{filename}", self._file)
        return app

    def _content_type(self, request: web.Request) -> str:
        if self.html_only:
            return TEXT_HTML
        return negotiate(request.headers.get("Accept"), request.query.get("format"))

    async def _redirect_root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/simple/")

    async def _redirect_project(self, request: web.Request) -> web.StreamResponse:
        norm = canonicalize_name(request.match_info["project"])
        raise web.HTTPMovedPermanently(f"/simple/{norm}/{self._query(request)}")

    @staticmethod
    def _query(request: web.Request) -> str:
        return f"?{request.query_string}" if request.query_string else ""

    async def _root(self, request: web.Request) -> web.StreamResponse:
        ctype = self._content_type(request)
        names = sorted({f.project for f in self.files()})
        return await self._page(request, render_root(names, ctype), ctype)

    async def _project(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["project"]
        norm = canonicalize_name(raw)
        if raw != norm:
            raise web.HTTPMovedPermanently(f"/simple/{norm}/{self._query(request)}")
        files = sorted(self.files(norm), key=lambda f: (f.version, f.filename))
        if not files:
            return web.Response(status=self.missing_status, text=f"no project {norm}\n")
        ctype = self._content_type(request)
        base = self.files_base or self.base
        return await self._page(request, render_project(base, norm, files, ctype), ctype)

    async def _page(self, request: web.Request, body: bytes, ctype: str) -> web.StreamResponse:
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = {"ETag": etag, "Vary": "Accept", "Cache-Control": "max-age=600, public"}
        if_none = request.headers.get("If-None-Match", "")
        offered = {t.strip().removeprefix("W/") for t in if_none.split(",")}
        if etag in offered or "*" in offered:
            return web.Response(status=304, headers=headers)
        wire_type = f"{ctype}; charset=utf-8" if ctype in (TEXT_HTML, HTML_V1) else ctype
        payload = Payload(wire_type, body=body, size=len(body), headers=headers)
        return await send(request, payload, request.get(_FAULT_KEY))

    async def _file(self, request: web.Request) -> web.StreamResponse:
        filename = request.match_info["filename"]
        with self._lock:
            entry = self._files.get(filename)
            meta_of = self._files.get(filename.removesuffix(".metadata"))
        if entry is not None:
            payload = Payload("application/octet-stream", path=entry.path, size=entry.size)
        elif filename.endswith(".metadata") and meta_of is not None and meta_of.metadata:
            body = meta_of.metadata
            payload = Payload("application/octet-stream", body=body, size=len(body))
        else:
            raise web.HTTPNotFound(text=f"no file {filename}\n")
        return await send(request, payload, request.get(_FAULT_KEY))
