"""create_app(config): services, middlewares, the route table, SIGHUP reload.

The whole HTTP surface is on one screen in _routes(); resources are opened
before the app starts and closed in its cleanup context. Lifecycle counts the
requests in flight, so that a graceful shutdown (cli.py) can let them finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from . import __version__, web_admin, web_oidc, web_ops, web_simple, web_ui, web_upload
from .auth import ANONYMOUS, OPEN_SCOPES, Authenticator, client_address
from .backends import open_storage
from .cache import ArtifactCache
from .config import Config, ConfigError, load_config
from .errors import NotFound, ProxyError, Unauthorized, UpstreamUnavailable
from .guard import CollisionLedger
from .jwks import KeySets
from .login_limit import FailureLimit
from .logs import CLIENT, TOKEN_NAME
from .metrics import FLUSH_INTERVAL, Metrics
from .mirror import Mirror
from .page_memory import PageMemory
from .pagecache import PageCache
from .publish import Publisher
from .reader import Reader
from .registry import UpstreamSpec
from .replay import ReplayGuard, SharedReplay
from .state import (
    AUTH,
    CONFIG,
    IDENTITY,
    METRICS,
    PUBLISHERS,
    READER,
    STORES,
    TRUST,
    LiveConfig,
)
from .trust import TrustedPublishing
from .ui_model import wants_html
from .upstream import UpstreamClient
from .upstream_names import UpstreamNames

log = logging.getLogger("indexguard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

class Lifecycle:
    """Handlers running and whether the server is draining for a shutdown."""

    def __init__(self) -> None:
        self.active = 0
        self.draining = False
        # loop.time() by which the shutdown must be over; None while serving.
        self.deadline: float | None = None
        self._idle: asyncio.Event | None = None  # only while someone waits

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._idle = None


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# Set on a request whose answer took credentials (see _private_if_credentialed).
CREDENTIALED = web.RequestKey("credentialed", bool)


def _routes(app: web.Application) -> None:
    """Every route with the scope it needs (None: open to all)."""
    def add(method: str, path: str, handler: Handler, scope: str | None) -> None:
        wrapped = edge(handler, path, scope)
        if method == "GET":
            app.router.add_get(path, wrapped)  # and HEAD
        else:
            app.router.add_route(method, path, wrapped)

    # The default group at /simple/, every group at /g/<group>/, one index alone
    # at /i/<index>/; a group's token patterns are checked by the handler.
    for prefix in ("", "/g/{group}", "/i/{index}"):
        add("GET", f"{prefix}/simple/", web_simple.root, "read")
        add("GET", f"{prefix}/simple/{{project}}/", web_simple.project, "read")
        add("GET", f"{prefix}/simple/{{project}}", web_simple.project_no_slash, "read")
        add("GET", f"{prefix}/files/{{project}}/{{filename}}", web_simple.dist_file, "read")
    # Uploads: to the first index at / and /legacy/, to one index under /i/<index>/.
    for prefix in ("", "/i/{index}"):
        add("POST", f"{prefix}/", web_upload.upload, "write")
        add("POST", f"{prefix}/legacy/", web_upload.upload, "write")
        add("POST", f"{prefix}/legacy", web_upload.upload, "write")  # twine: .../legacy
    # GitLab's layout (gitlab.projects / gitlab.groups aliases), so that pip.conf,
    # requirements and .pypirc lines move here by a change of host alone.
    for base in ("/api/v4/projects/{gl_project}/packages/pypi",
                 "/api/v4/groups/{gl_group}/-/packages/pypi"):
        add("GET", f"{base}/simple/", web_simple.root, "read")
        add("GET", f"{base}/simple/{{project}}/", web_simple.project, "read")
        add("GET", f"{base}/simple/{{project}}", web_simple.project_no_slash, "read")
        add("GET", f"{base}/files/{{key}}/{{filename}}", web_simple.gitlab_file, "read")
    add("POST", "/api/v4/projects/{gl_project}/packages/pypi", web_upload.upload, "write")
    add("GET", "/", _landing, None)
    # The web UI, for people: read like the simple API; the guard page for admins.
    for prefix in ("", "/g/{group}"):
        add("GET", f"{prefix}/project/{{project}}/", web_ui.project, "read")
        add("GET", f"{prefix}/project/{{project}}", web_ui.project_no_slash, "read")
        add("GET", f"{prefix}/search", web_ui.search, "read")
    add("GET", "/guard/", web_ui.guard, "admin")
    add("GET", "/-/static/{asset}", web_ui.asset, None)
    add("GET", "/-/health", web_ops.health, None)
    # It names private and reserved projects: as open as reading, or a metrics token.
    add("GET", "/metrics", web_ops.metrics, "metrics")
    add("GET", "/-/guard", web_admin.guard_report, "admin")
    # Trusted publishing, where PyPI has it (uv and gh-action-pypi-publish ask the host root).
    add("GET", "/_/oidc/audience", web_oidc.audience, None)
    add("POST", "/_/oidc/mint-token", web_oidc.mint_token, None)
    add("POST", "/_/oidc/github/mint-token", web_oidc.mint_token, None)
    for prefix in ("", "/i/{index}"):
        add("POST", f"{prefix}/-/yank/{{project}}/{{version}}", web_admin.yank, "admin")
        add("POST", f"{prefix}/-/unyank/{{project}}/{{version}}", web_admin.unyank, "admin")
        add("DELETE", f"{prefix}/-/files/{{project}}/{{filename}}", web_admin.delete_file,
            "admin")
        add("DELETE", f"{prefix}/-/projects/{{project}}", web_admin.release, "admin")
    # Last: whatever no route above takes, so that it is counted and answered
    # like the rest (404 or 405 with a reason), not by aiohttp's defaults.
    app.router.add_route("*", "/{tail:.*}", edge(_unmatched, "unmatched", None))


async def _landing(request: web.Request) -> web.StreamResponse:
    """GET /: a browser (its Accept names text/html) gets the web UI, authorized as
    a read (so a browser's Basic-auth prompt works); any other client today's line.
    Only this route negotiates: /simple/ pays nothing for it."""
    if not wants_html(request.headers.get("Accept")):
        return await web_ops.landing(request)
    if not _open_to_anonymous(request, "read"):
        await _authorize(request, "read")
    return await web_ui.landing(request)


async def _unmatched(request: web.Request) -> web.StreamResponse:
    allowed: set[str] = set()
    catch_all = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is catch_all:
            continue
        _match, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise NotFound("Not found")


def edge(handler: Handler, label: str, scope: str | None) -> Handler:
    """The handler with what every request needs: counted in flight, authorized
    for scope, timed under label, and any ProxyError turned into its status with
    a one-line reason.

    A wrapper per route, not middleware: the profile of a warm page put the
    four middlewares this replaces at 12% of a request's CPU, and aiohttp runs
    its own wrapper coroutine around any middleware chain. The scope and the
    metric label are fixed here, at registration, not looked up per request.
    A FileResponse is sent after the handler returns; cli.py waits for those
    separately, by waiting for their connections to close.
    """
    # GitLab's package URLs ignore the username (CI sends gitlab-ci-token).
    any_user = label.startswith("/api/v4/")

    async def wrapped(request: web.Request) -> web.StreamResponse:
        app = request.app
        life = app[LIFECYCLE]
        started = time.monotonic()
        status = 500
        life.active += 1
        if "X-Forwarded-For" in request.headers:
            # Logs and the failed-login limit name the client, not our own balancer.
            request[CLIENT] = client_address(
                request.remote, request.headers["X-Forwarded-For"],
                app[CONFIG].current.listen.trusted_proxies)
        try:
            try:
                if scope is not None and not _open_to_anonymous(request, scope):
                    await _authorize(request, scope, any_user)
                response = await handler(request)
            except ProxyError as exc:
                response = _error_response(request, exc)
            except web.HTTPException as exc:
                status = exc.status
                _private_if_credentialed(request, exc)
                raise
            except (ConnectionError, asyncio.CancelledError):
                # The client went away (or was cut off): nginx's 499, not a server error.
                status = 499
                raise
            except Exception:
                log.exception("unhandled error",
                              extra={"path": request.path, "method": request.method})
                response = web.Response(status=500, text="Internal server error\n")
            status = response.status
            _private_if_credentialed(request, response)
            if life.draining:
                # Finish this request, take no further one on its connection.
                response.force_close()
            return response
        finally:
            life.leave()
            app[METRICS].request_done(label, request.method, status, time.monotonic() - started)

    return functools.update_wrapper(wrapped, handler)


def _open_to_anonymous(request: web.Request, scope: str) -> bool:
    """No credentials, and none needed: the common case, decided without a coroutine."""
    if "Authorization" in request.headers or scope not in OPEN_SCOPES:
        return False
    if not request.app[CONFIG].current.auth.anonymous_read:
        return False
    request[TOKEN_NAME] = ANONYMOUS.name
    return True


async def _authorize(request: web.Request, scope: str, any_user: bool = False) -> None:
    config = request.app[CONFIG].current
    client = request.get(CLIENT) or request.remote or "-"
    try:
        identity = await request.app[AUTH].identify(
            request.headers.get("Authorization"), config.auth, client, any_user=any_user)
        Authenticator.require(identity, scope, config.auth)
    except ProxyError as exc:
        metrics = request.app[METRICS]
        metrics.count(metrics.auth_failures, _auth_reason(exc))
        raise
    request[TOKEN_NAME] = identity.name
    request[IDENTITY] = identity
    if identity is not ANONYMOUS:
        request[CREDENTIALED] = True


def _private_if_credentialed(request: web.Request, response: web.StreamResponse) -> None:
    """An answer that took credentials must not be kept by a shared (front) cache,
    or it would serve private wheels and pages to anyone who asks after. Here
    for answers prepared after the handler (pages, errors, redirects); a file
    the handler sends itself is marked by web_simple. Not an on_response_prepare
    hook: aiohttp then awaits a signal for every response (bench: warm pages)."""
    if request.get(CREDENTIALED) and not response.prepared:
        response.headers["Cache-Control"] = web_simple.private_cache_control(
            response.headers.get("Cache-Control"))


def _error_response(request: web.Request, exc: ProxyError) -> web.Response:
    # The reason may quote what a client or upstream sent: never sniffed as HTML.
    headers = {"X-Content-Type-Options": "nosniff"}
    if isinstance(exc, Unauthorized):
        realm = request.app[CONFIG].current.auth.realm
        headers["WWW-Authenticate"] = f'Basic realm="{realm}"'
    return web.Response(
        status=exc.status, reason=exc.reason, text=exc.reason + "\n", headers=headers,
    )


def _auth_reason(exc: ProxyError) -> str:
    label = getattr(exc, "label", None)
    if isinstance(label, str):
        return label
    if exc.status == 503:
        return "unavailable"
    if exc.status == 429:
        return "rate_limited"
    if exc.status == 403:
        return "scope"
    if "expired" in exc.reason:
        return "expired"
    return "missing" if "required" in exc.reason else "invalid"


def _reload(app: web.Application) -> None:
    live = app[CONFIG]
    try:
        new = load_config(live.path)
    except ConfigError as exc:
        log.error("config reload refused; keeping the running config",
                  extra={"problems": exc.problems})
        return
    old = live.current
    layout = (
        [i.name for i in new.registry.indexes], [u.name for u in new.registry.upstreams],
    )
    if layout != ([i.name for i in old.registry.indexes],
                  [u.name for u in old.registry.upstreams]):
        log.error("config reload refused: indexes or upstreams added, removed or "
                  "reordered; restart to apply", extra={"path": live.path})
        return
    # What is read once at start; everything else applies to the next request
    # (listen.trusted_proxies included).
    at_start = {
        "listen.host": (old.listen.host, new.listen.host),
        "listen.port": (old.listen.port, new.listen.port),
        "listen.max_connections": (old.listen.max_connections, new.listen.max_connections),
        "data_dir": (old.data_dir, new.data_dir),
        "workers": (old.workers, new.workers),
        "storage": (old.storage, new.storage),
        "cache.max_bytes": (old.cache.max_bytes, new.cache.max_bytes),
        "cache.memory_pages": (old.cache.memory_pages, new.cache.memory_pages),
        "log.access_log": (old.log.access_log, new.log.access_log),
        "auth.signing_key_file": (old.auth.signing_key_file, new.auth.signing_key_file),
    }
    for key, (was, now) in at_start.items():
        if was != now:
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


def _mirror(
    name: str, live: LiveConfig, derived: bool, metrics: Metrics, pages: PageCache,
    artifacts: ArtifactCache, memory: PageMemory, ledger: CollisionLedger, keep_renders: bool,
) -> Mirror:
    """One upstream, reading its settings from the live config at every use."""
    def settings(config: Config) -> UpstreamSpec:
        spec = config.registry.upstream(name)
        if spec is None:  # a reload cannot remove an upstream (see _reload)
            raise UpstreamUnavailable(f"Upstream {name} is not in the config any more")
        return spec

    client = UpstreamClient(metrics, f"indexguard/{__version__}",
                            lambda: settings(live.current), name=name)
    # A config without `upstreams` keeps the page keys of earlier versions.
    prefix = "" if derived else f"{name}/"
    return Mirror(client, pages, artifacts, memory, ledger, metrics, keep_renders,
                  name=name, prefix=prefix, settings=settings)


async def create_app(config: Config, config_path: str | None = None) -> web.Application:
    """Open the stores (off the loop) and assemble the application."""
    data = config.data_dir
    registry = config.registry
    metrics = Metrics(
        [u.name for u in registry.upstreams],
        [g.name for g in registry.groups] + [f"index:{i.name}" for i in registry.indexes],
    )
    storage = await open_storage(config, metrics)
    artifacts, stores = storage.artifacts, storage.stores
    pages = await asyncio.to_thread(PageCache, data / "cache" / "pages")
    live = LiveConfig(config, config_path)
    names = UpstreamNames(data / "cache" / "upstream-names", data / "tmp", metrics,
                          f"indexguard/{__version__}")
    ledger = CollisionLedger(names, metrics)
    # Upstream entries and rendered pages share one budget (renderings only
    # when memory_pages is above 0).
    memory = PageMemory(max(config.cache.memory_pages, 1), config.cache.memory_bytes)
    keep_renders = config.cache.memory_pages > 0
    derived = config.layout.upstreams is None  # upstream.* alone, as before `upstreams`
    mirrors = {
        spec.name: _mirror(spec.name, live, derived, metrics, pages, artifacts, memory, ledger,
                           keep_renders)
        for spec in registry.upstreams
    }
    reader = Reader(stores, mirrors, memory, ledger, metrics, keep_renders)
    publishers = {name: Publisher(store, metrics, reader.upstream_has)
                  for name, store in stores.items()}
    if storage.swept:
        log.info("removed temp files left by an earlier crash", extra={"count": storage.swept})

    app = web.Application(client_max_size=1024**2)
    app[CONFIG] = live
    app[METRICS] = metrics
    app[STORES] = stores
    app[READER] = reader
    app[PUBLISHERS] = publishers
    failures = FailureLimit(data / "auth-failures.sqlite3")
    await asyncio.to_thread(failures.open)
    keysets = KeySets(f"indexguard/{__version__}")
    replay = ReplayGuard(data / "oidc-jti.sqlite3")
    await asyncio.to_thread(replay.open)
    shared_replay = SharedReplay(storage.bucket) if storage.bucket is not None else None
    trust = app[TRUST] = TrustedPublishing(keysets, replay, config, shared_replay)
    if config.auth.trusted_publishers or config.auth.signing_key_file:
        await trust.signing_key()  # cli checked it; a worker reads the same file
    app[AUTH] = Authenticator(failures, trust)
    life = app[LIFECYCLE] = Lifecycle()

    async def flush_metrics() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            metrics.flush()

    async def resources(_app: web.Application) -> AsyncIterator[None]:
        for mirror in mirrors.values():
            await mirror.client.start()
        await names.start()
        await keysets.start()
        flusher = asyncio.create_task(flush_metrics())
        # After start: a large cache never delays the first answer.
        scan = asyncio.create_task(artifacts.scan())
        storage.start()
        yield
        flusher.cancel()
        scan.cancel()
        await storage.stop()
        # Cache fills whose clients have gone get what is left of the shutdown
        # grace (at most 10 s); one cut off just leaves nothing in the cache.
        budget = 10.0
        if life.deadline is not None:
            budget = max(0.0, min(budget, life.deadline - asyncio.get_running_loop().time()))
        if not await artifacts.drain(budget):
            log.warning("cache downloads cut off at shutdown")
        artifacts.close()
        await names.close()
        await keysets.close()
        await asyncio.to_thread(replay.close)
        for mirror in mirrors.values():
            await mirror.client.close()
        await reader.flush()
        await asyncio.to_thread(pages.close)
        await storage.close()
        await asyncio.to_thread(failures.close)
        metrics.flush()

    app.cleanup_ctx.append(resources)
    app.on_startup.append(_on_startup)
    await web_ui.setup(app)
    _routes(app)
    return app
