"""One upstream index as a source: its pages (memory, disk, upstream), one fetch
per name, the outage backoff, stale pages, and where its files come from.

Mirror.page() answers an upstream page or raises UpstreamUnavailable;
Mirror.file() a cached file or a transfer to start. The guard's decision is
made before either is asked (reader.py): a mirror never sees a private name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.utils import NormalizedName
from yarl import URL

from .answers import Prerendered, RemoteFile, render_page, visible
from .cache import ArtifactCache
from .config import Config
from .dists import METADATA_SUFFIX
from .download import Download
from .errors import NotFound, UpstreamUnavailable
from .guard import CollisionLedger
from .metrics import Metrics
from .model import FileEntry, ProjectPage
from .page_memory import PageMemory
from .pagecache import CachedPage, PageCache
from .registry import UpstreamSpec
from .simple_api import Format, PageParseError, upstream_page_url
from .simple_api import parse_page as parse_any_page
from .storage import LocalFile, RedirectFile, StoredFile
from .upstream import UpstreamClient, refusal

log = logging.getLogger("indexguard.index")

# The most files an upstream page may list. A real page reaches the 64 MiB body
# cap first (PyPI's JSON takes ~450 bytes a file: ~150,000 files); a page of
# minimal entries could list ~2.5 million, which parsed would take ~1.2 GiB.
MAX_PAGE_FILES = 250_000
# A `.metadata` file from upstream, as for uploads (publish.MAX_METADATA_BYTES):
# its page gives no size, so this bounds the transfer.
MAX_UPSTREAM_METADATA_BYTES = 16 * 2**20
# Names served from upstream, for the root page (PyPI's own list is of no use).
_SERVED_NAMES = 100_000


@dataclass(slots=True)
class Outage:
    """The upstream counts as down until `until` (time.time()), for every name.

    Set by a failure of the upstream itself (timeout, refused, 5xx), so that a
    hanging upstream costs one timeout per outage, not one per name: until
    then stale pages answer at once and names with nothing cached get 502.
    """

    until: float = 0.0
    reason: str = ""

    def active(self, now: float) -> bool:
        return now < self.until


def parse_page(
    body: bytes, content_type: str, url: str, name: NormalizedName,
) -> ProjectPage:
    """simple_api's parser, bounded: a page listing more than MAX_PAGE_FILES
    files is refused as broken. Raises PageParseError."""
    page = parse_any_page(body, content_type, url, name)
    if len(page.files) > MAX_PAGE_FILES:
        raise PageParseError(
            f"{len(page.files)} files listed, over the {MAX_PAGE_FILES} the proxy takes"
        )
    return page


def _parse_and_render(
    body: bytes, content_type: str, url: str, name: NormalizedName, config: Config,
    min_age: float | None, now: float, fmt: Format, ctype: str,
) -> tuple[ProjectPage, Prerendered]:
    page = parse_page(body, content_type, url, name)
    shown, valid_until, hidden = visible(page, config, now, min_age)
    return page, Prerendered(shown, valid_until, hidden,
                             render_page(shown, fmt, ctype, "upstream"))


# The settings of one upstream, read from the live config on every use (SIGHUP
# swaps the config whole).
Settings = Callable[[Config], UpstreamSpec]


class Mirror:
    """One upstream: owns its page fetches, outage state and served names.

    `prefix` namespaces its keys in the page cache and in memory, so that two
    upstreams never answer for each other ("" for the one upstream of a config
    without `upstreams`: pages cached by earlier versions stay valid).
    """

    def __init__(
        self, client: UpstreamClient, pages: PageCache, artifacts: ArtifactCache,
        memory: PageMemory, ledger: CollisionLedger, metrics: Metrics, keep_renders: bool,
        *, name: str, prefix: str, settings: Settings,
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.settings = settings
        self.client = client
        self.pages = pages
        self.artifacts = artifacts
        self.memory = memory
        self.ledger = ledger
        self.metrics = metrics
        self._keep_renders = keep_renders
        self._flights: dict[str, asyncio.Future[CachedPage]] = {}
        # Per name: a broken page (garbage, too large) backs off that name alone.
        self._backoff: dict[str, float] = {}
        self.outage = Outage()
        self._writes: set[asyncio.Task[None]] = set()
        self.served_names: OrderedDict[str, None] = OrderedDict()

    # --- pages -------------------------------------------------------------------

    def key(self, name: str) -> str:
        """Where this upstream's page of a name is kept (page cache, memory)."""
        return self.prefix + name

    def fresh_in_memory(
        self, name: NormalizedName, config: Config, now: float,
    ) -> CachedPage | None:
        """The warm path: a fresh page in memory, with no coroutine call."""
        entry = self.memory.get(self.key(name))
        if entry is None or entry.page is None:
            return None
        if now - entry.fetched_at < self.settings(config).index_ttl:
            self.metrics.count(self.metrics.index_cache, "hit", self.name)
            return entry
        return None

    def fresh_absence(self, name: NormalizedName, config: Config, now: float) -> bool:
        """Whether this upstream said "no such project" within negative_ttl (memory only)."""
        entry = self.memory.get(self.key(name))
        return (entry is not None and entry.page is None
                and now - entry.fetched_at < self.settings(config).negative_ttl)

    async def page(
        self, name: NormalizedName, config: Config, want: tuple[Format, str] | None = None,
    ) -> CachedPage:
        """The upstream page from memory, disk or upstream. `want` (format, content
        type): render a freshly fetched page for it in the same thread hop as the
        parse; each hop is a wake-up of the loop on a cold page's critical path.

        Raises UpstreamUnavailable (nothing stale to serve)."""
        key, settings = self.key(name), self.settings(config)
        entry = self.memory.get(key)
        if entry is None:
            entry = await self.pages.get(key)
            if entry is not None:
                self.memory.put(key, entry)
        if entry is not None:
            ttl = settings.index_ttl if entry.page is not None else settings.negative_ttl
            now = time.time()
            if now - entry.fetched_at < ttl or (
                entry.page is not None and now < self._backoff.get(name, 0.0)
            ):
                self.metrics.count(self.metrics.index_cache, "hit", self.name)
                return entry
        now = time.time()
        if self.outage.active(now):
            # Not asked again until the outage is over: stale or 502, at once
            # (logged once, when the upstream was marked down).
            if entry is not None and entry.page is not None:
                self.metrics.stale_pages.labels(self.name).inc()
                return entry
            raise UpstreamUnavailable(
                f"Upstream index unavailable for {name}: {self.outage.reason}; "
                f"asking again in {self.outage.until - now:.0f}s"
            )
        flight = self._flights.get(name)
        if flight is None:
            flight = asyncio.ensure_future(self._refresh(name, entry, config, want))
            self._flights[name] = flight
            flight.add_done_callback(lambda _f: self._flights.pop(name, None))
        return await asyncio.shield(flight)

    async def _refresh(
        self, name: NormalizedName, entry: CachedPage | None, config: Config,
        want: tuple[Format, str] | None = None,
    ) -> CachedPage:
        settings = self.settings(config)
        url = upstream_page_url(settings.url, name)
        has_page = entry is not None and entry.page is not None
        resp = await self.client.fetch_page(
            url, settings.timeout, not_found=settings.not_found,
            etag=entry.etag if has_page and entry else None,
            last_modified=entry.last_modified if has_page and entry else None,
        )
        now = time.time()
        fresh: CachedPage
        pre: Prerendered | None = None
        if resp.outcome == "ok":
            try:
                if want is None:
                    page = await asyncio.to_thread(
                        parse_page, resp.body, resp.content_type, resp.url, name
                    )
                else:
                    page, pre = await asyncio.to_thread(
                        _parse_and_render, resp.body, resp.content_type, resp.url, name,
                        config, settings.min_age, now, *want,
                    )
            except PageParseError as exc:
                return self._stale_or_fail(
                    name, entry, f"upstream sent a broken page ({exc})", config, backoff=True
                )
            fresh = CachedPage(page, now, resp.etag, resp.last_modified)
            self.metrics.count(self.metrics.index_cache, "miss", self.name)
            self.ledger.remember(name, True, self.name, config)
        elif resp.outcome == "not_modified" and entry is not None and entry.page is not None:
            fresh = dataclasses.replace(entry, fetched_at=now)
            self.metrics.count(self.metrics.index_cache, "revalidated", self.name)
        elif resp.outcome == "not_found":
            fresh = CachedPage(None, now)
            self.metrics.count(self.metrics.index_cache, "miss", self.name)
            self.ledger.remember(name, False, self.name, config)
        else:
            reason = resp.reason or "upstream unavailable"
            if resp.down:
                self.outage = Outage(now + settings.backoff, f"upstream down ({reason})")
                log.warning("upstream marked down", extra={
                    "upstream": self.name, "reason": reason, "seconds": settings.backoff})
            return self._stale_or_fail(name, entry, reason, config, backoff=not resp.down)
        self._backoff.pop(name, None)
        self.memory.put(self.key(name), fresh)
        if pre is not None and want is not None and self._keep_renders:
            if pre.hidden:
                self.metrics.count(self.metrics.min_age_hidden, amount=pre.hidden)
            # Found by the reader's remembered(): same entry, same guard settings.
            self.memory.keep_rendered(
                self.key(name), want[1], ((fresh, config.guard), pre.valid_until, pre.rendered)
            )
        # The page is in memory already; the disk copy (a SQLite write) need not
        # delay the answer. bench/ saw cold pages at 45-56 ms under uv's fan-out.
        write = asyncio.create_task(self.pages.put(self.key(name), fresh))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return fresh

    def _stale_or_fail(
        self, name: str, entry: CachedPage | None, reason: str, config: Config,
        *, backoff: bool = False,
    ) -> CachedPage:
        if entry is not None and entry.page is not None:
            self.metrics.stale_pages.labels(self.name).inc()
            if backoff:
                self._backoff[name] = time.time() + self.settings(config).backoff
            log.warning("serving stale page", extra={"project": name, "reason": reason})
            return entry
        raise UpstreamUnavailable(f"Upstream index unavailable for {name}: {reason}")

    def note_served(self, name: str) -> None:
        self.served_names[name] = None
        self.served_names.move_to_end(name)
        while len(self.served_names) > _SERVED_NAMES:
            self.served_names.popitem(last=False)

    async def flush(self) -> None:
        """Wait for page-cache writes still in flight (shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    # --- files -------------------------------------------------------------------

    async def known(self, name: NormalizedName) -> CachedPage | None:
        """What this upstream last said of the name (memory, then disk), however old."""
        key = self.key(name)
        return self.memory.get(key) or await self.pages.get(key)

    async def file(
        self, name: NormalizedName, filename: str, entry: FileEntry, config: Config,
        redirect: bool = False,
    ) -> StoredFile | RedirectFile | RemoteFile:
        """Where the bytes of a file listed on this upstream's page come from.
        Raises NotFound (no valid sha256), UpstreamUnavailable (a refused URL)."""
        is_meta = filename.endswith(METADATA_SUFFIX)
        hashes = entry.metadata_hashes if is_meta else entry.hashes
        sha256 = hashes.get("sha256") if hashes is not None else None
        if sha256 is None:
            raise NotFound(
                f"{filename} has no sha256 upstream; the proxy serves verified files only"
            )
        shared = self.artifacts.shared
        if redirect and shared is not None:
            url = await shared.presign("artifacts", sha256)
            if url is not None:
                self.metrics.count(self.metrics.file_cache, "hit")
                return RedirectFile(url, None if is_meta else entry.size, "cache", sha256)
        opened = await self.artifacts.open_cached(sha256)
        if opened is not None:
            self.metrics.count(self.metrics.file_cache, "hit")
            return LocalFile(opened[0], opened[1], "cache", sha256)
        origin = entry.origin + METADATA_SUFFIX if is_meta else entry.origin
        # Checked again at every hop by the client; here so that a refused
        # file costs no transfer, for GET and HEAD alike.
        try:
            refused = refusal(URL(origin), self.settings(config))
        except ValueError:
            refused = "refused a URL that does not parse; not fetched"
        if refused is not None:
            log.warning("upstream file refused", extra={
                "project": name, "file": filename, "reason": refused})
            raise UpstreamUnavailable(f"Upstream URL {refused}")
        expected = None if is_meta else entry.size
        limit = MAX_UPSTREAM_METADATA_BYTES if is_meta else None

        def start() -> Download:
            joined = self.artifacts.inflight(sha256) is not None
            self.metrics.count(self.metrics.file_cache, "joined" if joined else "miss")
            timeout = self.settings(config).timeout
            opener: Callable[[str], Any] = lambda url: self.client.open_file(  # noqa: E731
                url, timeout
            )
            return self.artifacts.download(sha256, origin, expected, opener, limit)

        return RemoteFile(start, expected, sha256)
