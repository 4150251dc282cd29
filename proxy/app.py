"""create_app(config): services, middlewares, the route table, SIGHUP reload.

The whole HTTP surface is on one screen in _routes(); resources are opened
before the app starts and closed in its cleanup context. Lifecycle counts the
requests in flight, so that a graceful shutdown (cli.py) can let them finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import __version__, web_admin, web_ops, web_simple, web_upload
from .auth import Authenticator
from .cache import ArtifactCache
from .config import Config, ConfigError, load_config
from .errors import ProxyError, Unauthorized
from .guard import CollisionLedger
from .index import Index
from .logs import TOKEN_NAME
from .metrics import Metrics
from .pagecache import PageCache
from .publish import Publisher
from .state import AUTH, CONFIG, INDEX, METRICS, PUBLISHER, STORE, LiveConfig
from .store import PrivateStore
from .upstream import UpstreamClient

log = logging.getLogger("indexguard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The scope each named route needs; routes not listed are open (health, metrics).
ROUTE_SCOPES = {"simple": "read", "files": "read", "upload": "write", "admin": "admin"}


class Lifecycle:
    """Handlers running and whether the server is draining for a shutdown."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        # loop.time() by which the shutdown must be over; None while serving.
        self.deadline: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


def _routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/simple/", web_simple.root, name="simple")
    r.add_get("/simple/{project}/", web_simple.project, name="simple-project")
    r.add_get("/simple/{project}", web_simple.project_no_slash, name="simple-redirect")
    r.add_get("/files/{project}/{filename}", web_simple.dist_file, name="files")
    r.add_post("/", web_upload.upload, name="upload")
    r.add_post("/legacy/", web_upload.upload, name="upload-legacy")
    r.add_get("/", web_ops.landing, name="landing")
    r.add_get("/-/health", web_ops.health, name="health")
    r.add_get("/metrics", web_ops.metrics, name="metrics")
    r.add_get("/-/guard", web_admin.guard_report, name="admin")
    r.add_post("/-/yank/{project}/{version}", web_admin.yank, name="admin-yank")
    r.add_post("/-/unyank/{project}/{version}", web_admin.unyank, name="admin-unyank")
    r.add_delete("/-/files/{project}/{filename}", web_admin.delete_file, name="admin-delete")
    r.add_delete("/-/projects/{project}", web_admin.release, name="admin-release")


def _scope_for(request: web.Request) -> str | None:
    route = request.match_info.route.name or ""
    for prefix, scope in ROUTE_SCOPES.items():
        if route == prefix or route.startswith(prefix + "-"):
            return scope
    return None


@web.middleware
async def lifecycle_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: counts the request while its handler runs.

    A FileResponse is sent after the handler returns; cli.py waits for those
    separately, by waiting for their connections to close.
    """
    life = request.app[LIFECYCLE]
    life.enter()
    try:
        response = await handler(request)
        if life.draining:
            # Finish this request, take no further one on its connection.
            response.force_close()
        return response
    finally:
        life.leave()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as exc:
        headers = {}
        if isinstance(exc, Unauthorized):
            realm = request.app[CONFIG].current.auth.realm
            headers["WWW-Authenticate"] = f'Basic realm="{realm}"'
        return web.Response(
            status=exc.status, reason=exc.reason, text=exc.reason + "\n", headers=headers,
        )
    except (web.HTTPException, asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return web.Response(status=500, text="Internal server error\n")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[CONFIG].current
    authenticator = request.app[AUTH]
    scope = _scope_for(request)
    if scope is None:
        return await handler(request)
    try:
        identity = authenticator.identify(
            request.headers.get("Authorization"), config.auth, request.remote or "-",
            dt.date.today(),
        )
        authenticator.require(identity, scope, config.auth)
    except ProxyError as exc:
        request.app[METRICS].auth_failures.labels(_auth_reason(exc)).inc()
        raise
    request[TOKEN_NAME] = identity.name
    return await handler(request)


def _auth_reason(exc: ProxyError) -> str:
    if exc.status == 429:
        return "rate_limited"
    if exc.status == 403:
        return "scope"
    if "expired" in exc.reason:
        return "expired"
    return "missing" if "required" in exc.reason else "invalid"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    metrics = request.app[METRICS]
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (ConnectionError, asyncio.CancelledError):
        # The client went away (or was cut off): nginx's 499, not a server error.
        status = 499
        raise
    finally:
        metrics.requests.labels(label, request.method, str(status)).inc()
        metrics.request_latency.labels(label).observe(time.monotonic() - started)


def _reload(app: web.Application) -> None:
    live = app[CONFIG]
    try:
        new = load_config(live.path)
    except ConfigError as exc:
        log.error("config reload refused; keeping the running config",
                  extra={"problems": exc.problems})
        return
    old = live.current
    for key in ("listen", "data_dir", "workers"):
        if getattr(new, key) != getattr(old, key):
            log.warning("config change needs a restart", extra={"key": key})
    logging.getLogger().setLevel(new.log.level.upper())
    live.current = new
    log.info("config reloaded", extra={"forward": new.upstream.forward,
                                       "tokens": len(new.auth.tokens)})


async def _on_startup(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    # Not possible outside the main thread (in-process tests): no reload there.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, _reload, app)


async def create_app(config: Config, config_path: str | None = None) -> web.Application:
    """Open the stores (off the loop) and assemble the application."""
    data = config.data_dir
    metrics = Metrics()
    store = PrivateStore(data / "private", data / "tmp")
    swept = await asyncio.to_thread(store.open)
    artifacts = ArtifactCache(data / "cache" / "files", data / "tmp", config.cache.max_bytes,
                              metrics)
    await asyncio.to_thread(artifacts.open)
    pages = await asyncio.to_thread(PageCache, data / "cache" / "pages")
    upstream = UpstreamClient(metrics, f"indexguard/{__version__}")
    index = Index(store, pages, artifacts, upstream, CollisionLedger(), metrics,
                  config.cache.memory_pages)
    publisher = Publisher(store, metrics, index.upstream_has)
    if swept:
        log.info("removed temp files left by an earlier crash", extra={"count": swept})

    app = web.Application(
        middlewares=[lifecycle_middleware, metrics_middleware, error_middleware, auth_middleware],
        client_max_size=1024**2,
    )
    app[CONFIG] = LiveConfig(config, config_path)
    app[METRICS] = metrics
    app[STORE] = store
    app[INDEX] = index
    app[PUBLISHER] = publisher
    app[AUTH] = Authenticator()
    life = app[LIFECYCLE] = Lifecycle()

    async def resources(_app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        yield
        # Cache fills whose clients have gone get what is left of the shutdown
        # grace (at most 10 s); one cut off just leaves nothing in the cache.
        budget = 10.0
        if life.deadline is not None:
            budget = max(0.0, min(budget, life.deadline - asyncio.get_running_loop().time()))
        if not await artifacts.drain(budget):
            log.warning("cache downloads cut off at shutdown")
        await upstream.close()
        await index.flush()
        await asyncio.to_thread(pages.close)

    app.cleanup_ctx.append(resources)
    app.on_startup.append(_on_startup)
    _routes(app)
    return app
