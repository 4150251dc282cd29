"""The upstream index client: project pages (conditional GET) and file streams.

Every answer is classified as ok / not_modified / not_found / unavailable, after
simple-repository's rule: 404 means not found, anything else means unavailable
(so the caller may serve stale). Never raises for what the upstream does.

Every URL it fetches, and every redirect hop (followed here, by hand), must be
on the upstream's own origin or a host of upstream.file_hosts (`refusal`);
credentials from upstream.url go to the upstream's own origin only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
from yarl import URL

from .errors import NotFound, UpstreamUnavailable
from .metrics import Metrics
from .simple_api import UPSTREAM_ACCEPT

log = logging.getLogger("indexguard.upstream")

Outcome = Literal["ok", "not_modified", "not_found", "unavailable"]
MAX_PAGE_BYTES = 64 * 2**20  # a 2,000-file PyPI page is ~2 MB; refuse absurd ones
# As many as pip (requests) follows is 30; PyPI and its CDN need at most one or two.
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class PageResponse:
    outcome: Outcome
    url: str
    body: bytes = b""
    content_type: str = ""
    etag: str | None = None
    last_modified: str | None = None
    reason: str = ""
    # The upstream itself failed (no answer in time, connection refused or cut,
    # a 5xx), not just this one page: the caller marks it down for every name.
    down: bool = False


def _origin(url: URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").rstrip("."), url.port


def _host_forms(url: URL) -> set[str]:
    """How upstream.file_hosts may name url's host: "host:port", and plain "host"
    when the port is its scheme's default."""
    host = (url.host or "").rstrip(".")
    if ":" in host:  # IPv6, written in brackets in file_hosts
        host = f"[{host}]"
    forms = {f"{host}:{url.port}"}
    if url.is_default_port():
        forms.add(host)
    return forms


class Origin(Protocol):
    """What the allow-list and the credentials need of an upstream's settings
    (config.Upstream, registry.UpstreamSpec)."""

    @property
    def url(self) -> str: ...
    @property
    def file_hosts(self) -> tuple[str, ...]: ...
    @property
    def credentials(self) -> tuple[str, str] | None: ...


def refusal(url: URL, upstream: Origin) -> str | None:
    """Why the proxy must not fetch url for this upstream; None when it may.

    Allowed: the upstream's own origin (scheme, host, port), or a host listed
    in upstream.file_hosts; never http once the upstream is https.
    """
    if url.scheme not in ("http", "https") or not url.host:
        return "refused a non-http(s) URL from upstream; not fetched"
    base = URL(upstream.url)
    if base.scheme == "https" and url.scheme != "https":
        return "refused an http URL from an https upstream; not fetched"
    if _origin(url) == _origin(base) or _host_forms(url) & set(upstream.file_hosts):
        return None
    host = sorted(_host_forms(url))[-1]
    return f"refused {host}: neither the upstream nor in upstream.file_hosts; not fetched"


def _credentials(url: URL, upstream: Origin) -> aiohttp.BasicAuth | None:
    if upstream.credentials is None or _origin(url) != _origin(URL(upstream.url)):
        return None
    user, password = upstream.credentials
    try:
        (user + password).encode("latin-1")
    except UnicodeEncodeError:
        return aiohttp.BasicAuth(user, password, encoding="utf-8")
    return aiohttp.BasicAuth(user, password)


def _environment_configures_http() -> bool:
    netrc = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    return bool(urllib.request.getproxies()) or os.path.isfile(netrc)


class UpstreamClient:
    """Owns its HTTP session: start() opens it, close() closes it (the app's cleanup_ctx)."""

    def __init__(
        self, metrics: Metrics, user_agent: str, settings: Callable[[], Origin], name: str,
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._user_agent = user_agent
        # Read at every request: a reload (SIGHUP) may change url, hosts, credentials.
        self._settings = settings
        self._client: aiohttp.ClientSession | None = None
        self.last_ok = True

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300),
            headers={"User-Agent": self._user_agent},
            # HTTPS_PROXY and friends, and ~/.netrc, as pip honours them. Only when
            # there are some: aiohttp then reads the environment and parses the
            # netrc file for every request (2.5% of a cold page's CPU, profiled).
            trust_env=_environment_configures_http(),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError("UpstreamClient used before start()")
        return self._client

    def _record(self, kind: str, outcome: str, started: float) -> None:
        self._metrics.upstream_latency.labels(kind, self.name).observe(time.monotonic() - started)
        self._count(kind, outcome)

    def _count(self, kind: str, outcome: str) -> None:
        self._metrics.upstream_requests.labels(kind, outcome, self.name).inc()
        if outcome == "refused":
            return  # a hostile link says nothing about whether upstream is up
        self.last_ok = outcome != "error"
        self._metrics.upstream_up.labels(self.name).set(1 if self.last_ok else 0)

    async def _follow(self, url: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """GET url, following redirects by hand: each hop is checked (refusal)
        before it is connected to, and gets credentials only on the upstream's
        origin. The caller releases the answer.

        Raises UpstreamUnavailable for a refused hop (only), and what aiohttp
        raises (ClientError, TooManyRedirects among them, TimeoutError, ValueError).
        """
        # Userinfo in a URL from upstream is never used: aiohttp would send it.
        target = URL(url).with_user(None)
        for _hop in range(MAX_REDIRECTS + 1):
            settings = self._settings()
            reason = refusal(target, settings)
            if reason is not None:
                raise UpstreamUnavailable(f"Upstream URL {reason}")
            resp = await self._session.get(
                target, allow_redirects=False, auth=_credentials(target, settings), **kwargs
            )
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or location is None:
                return resp
            resp.release()
            target = resp.url.join(URL(location)).with_user(None).with_fragment(None)
        # As aiohttp would have it: an upstream failure, not a refusal.
        raise aiohttp.TooManyRedirects(resp.request_info, (resp,))

    async def fetch_page(
        self, url: str, timeout: float, etag: str | None = None,
        last_modified: str | None = None, not_found: Collection[int] = (404, 410),
    ) -> PageResponse:
        """not_found: the statuses that mean "no such project" here (the PyTorch
        index answers 403 for names it does not host)."""
        headers = {"Accept": UPSTREAM_ACCEPT, "Accept-Encoding": "gzip"}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout), await self._follow(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status == 304:
                    self._record("page", "not_modified", started)
                    return PageResponse("not_modified", str(resp.url))
                if resp.status in not_found:
                    self._record("page", "not_found", started)
                    return PageResponse("not_found", str(resp.url))
                if resp.status != 200:
                    self._record("page", "error", started)
                    return PageResponse(
                        "unavailable", url, reason=f"upstream answered {resp.status}",
                        down=resp.status >= 500,
                    )
                if (resp.content_length or 0) > MAX_PAGE_BYTES:
                    self._record("page", "error", started)
                    return PageResponse("unavailable", url, reason="upstream page too large")
                # To the end of the body: content.read(n) returns whatever has
                # arrived so far, which would take a page cut short (or still
                # in flight) for the whole page. A body shorter than its
                # Content-Length raises ClientPayloadError here.
                parts: list[bytes] = []
                size = 0
                async for part in resp.content.iter_chunked(256 * 1024):
                    size += len(part)
                    if size > MAX_PAGE_BYTES:
                        self._record("page", "error", started)
                        return PageResponse("unavailable", url, reason="upstream page too large")
                    parts.append(part)
                body = b"".join(parts)
                self._record("page", "ok", started)
                return PageResponse(
                    "ok", str(resp.url), body=body,
                    content_type=resp.headers.get("Content-Type", ""),
                    etag=resp.headers.get("ETag"),
                    last_modified=resp.headers.get("Last-Modified"),
                )
        except UpstreamUnavailable as exc:
            self._record("page", "refused", started)
            return PageResponse("unavailable", url, reason=exc.reason)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._record("page", "error", started)
            reason = "upstream timed out" if isinstance(exc, asyncio.TimeoutError) else (
                f"upstream failed: {type(exc).__name__}"
            )
            return PageResponse("unavailable", url, reason=reason, down=True)

    @asynccontextmanager
    async def open_file(self, url: str, timeout: float) -> AsyncIterator[aiohttp.ClientResponse]:
        """An open 200 response whose body the caller streams.

        Raises NotFound for 404/410, UpstreamUnavailable for anything else.
        """
        started = time.monotonic()
        try:
            resp = await self._follow(
                url, timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout),
                auto_decompress=False,
                # Hashes are over the stored bytes: never let a transfer encoding in.
                headers={"Accept-Encoding": "identity"},
            )
        except UpstreamUnavailable:
            self._record("file", "refused", started)
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._record("file", "error", started)
            raise UpstreamUnavailable(f"Upstream file fetch failed: {type(exc).__name__}") from None
        try:
            if resp.status in (404, 410):
                self._record("file", "not_found", started)
                raise NotFound("File not found upstream")
            if resp.status != 200:
                self._record("file", "error", started)
                raise UpstreamUnavailable(f"Upstream answered {resp.status} for the file")
            self._metrics.upstream_latency.labels("file", self.name).observe(
                time.monotonic() - started)
            try:
                yield resp
            except Exception:
                # Headers arrived but the body did not (reset, truncation, a
                # stall past the timeout): a failed request, counted as one.
                self._count("file", "error")
                raise
            self._count("file", "ok")
        finally:
            resp.release()
