"""The read path in one place: private first -> guard -> upstream via caches -> stale.

Index.rendered() answers a project page, Index.file() a file; both raise the
errors of errors.py. Rendered pages are kept in memory with their ETag and a
gzip copy, so a warm page costs a dict lookup; what memory holds is bounded in
pages and in bytes (_PageMemory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

from packaging.utils import NormalizedName
from yarl import URL

from .cache import ArtifactCache, open_sized
from .config import Config
from .dists import METADATA_SUFFIX
from .download import Download
from .errors import NotFound, UpstreamUnavailable
from .guard import CollisionLedger, Decision, decide, matures_at, too_young
from .metrics import Metrics
from .model import FileEntry, ProjectPage
from .pagecache import CachedPage, PageCache
from .simple_api import Format, PageParseError, render, upstream_page_url
from .simple_api import parse_page as parse_any_page
from .store import PrivateStore
from .upstream import UpstreamClient, refusal

log = logging.getLogger("indexguard.index")
guard_log = logging.getLogger("indexguard.guard")

Source = Literal["private", "cache", "upstream"]
_GZIP_MIN = 512
# The most files an upstream page may list. A real page reaches the 64 MiB body
# cap first (PyPI's JSON takes ~450 bytes a file: ~150,000 files); a page of
# minimal entries could list ~2.5 million, which parsed would take ~1.2 GiB.
MAX_PAGE_FILES = 250_000
# A `.metadata` file from upstream, as for uploads (publish.MAX_METADATA_BYTES):
# its page gives no size, so this bounds the transfer.
MAX_UPSTREAM_METADATA_BYTES = 16 * 2**20


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


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    gzipped: bytes | None
    etag: str
    content_type: str
    source: Source


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file on disk, already open: an eviction or a delete after this point
    cannot take it from the reader. Whoever gets one closes it."""

    file: IO[bytes]
    size: int
    source: Source
    sha256: str | None


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file to stream from upstream: start() starts (or joins) its transfer."""

    start: Callable[[], Download]
    size: int | None
    sha256: str


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


# What a parsed file entry holds besides its strings: set with tracemalloc so
# that the estimate is 0-25% above what parsed PyPI-like pages really hold
# (tests/faults/test_hostile_upstream_files.py checks it stays close).
_FILE_BYTES = 250
_ITEM_BYTES = 70  # one more entry in a hashes mapping


def _str_bytes(text: str | None) -> int:
    return sys.getsizeof(text) if text else 0


def _hashes_bytes(hashes: Any) -> int:
    if not hashes:
        return 0
    return sum(_ITEM_BYTES + _str_bytes(k) + _str_bytes(v) for k, v in hashes.items())


def _file_bytes(f: FileEntry) -> int:
    return (
        _FILE_BYTES + _str_bytes(f.filename) + _str_bytes(f.origin)
        + _str_bytes(f.requires_python) + _str_bytes(f.upload_time)
        + (_str_bytes(f.yanked) if isinstance(f.yanked, str) else 0)
        + _hashes_bytes(f.hashes) + _hashes_bytes(f.metadata_hashes)
    )


def entry_bytes(entry: CachedPage) -> int:
    """An estimate of the memory a remembered upstream page holds (about 2 ms
    for 10,000 files; pages are capped at MAX_PAGE_FILES)."""
    page = entry.page
    if page is None:
        return 200
    return 400 + sum(map(_file_bytes, page.files)) + sum(
        60 + _str_bytes(v) for v in page.versions
    )


_Kept = tuple[tuple[object, ...], float, Rendered]


class _Held:
    """What memory holds for one name: its upstream entry and its renderings."""

    __slots__ = ("cost", "entry", "renders")

    def __init__(self) -> None:
        self.entry: CachedPage | None = None
        self.renders: dict[str, _Kept] = {}
        self.cost = 0


def _rendered_bytes(rendered: Rendered) -> int:
    return 300 + len(rendered.body) + len(rendered.gzipped or b"")


class _PageMemory:
    """Upstream entries and rendered pages, least recently used name out first:
    at most max_names names and max_bytes (estimated) bytes. Something bigger
    than the whole budget is not kept at all."""

    def __init__(self, max_names: int, max_bytes: int) -> None:
        self._max_names = max_names
        self._max_bytes = max_bytes
        self._names: OrderedDict[str, _Held] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._names)

    def get(self, name: str) -> CachedPage | None:
        held = self._names.get(name)
        if held is None:
            return None
        self._names.move_to_end(name)
        return held.entry

    def put(self, name: str, entry: CachedPage) -> None:
        """Remember name's upstream entry; renderings of an older one go."""
        self._drop(name)
        cost = entry_bytes(entry)
        if cost > self._max_bytes:
            return
        held = self._names[name] = _Held()
        held.entry, held.cost = entry, cost
        self.bytes += cost
        self._shrink()

    def rendered(self, name: str, ctype: str) -> _Kept | None:
        held = self._names.get(name)
        kept = held.renders.get(ctype) if held is not None else None
        if kept is not None:
            self._names.move_to_end(name)
        return kept

    def keep_rendered(self, name: str, ctype: str, kept: _Kept) -> None:
        held = self._names.get(name)
        if held is None:
            held = self._names[name] = _Held()
        old = held.renders.pop(ctype, None)
        if old is not None:
            held.cost -= _rendered_bytes(old[2])
            self.bytes -= _rendered_bytes(old[2])
        cost = _rendered_bytes(kept[2])
        if cost <= self._max_bytes:
            held.renders[ctype] = kept
            held.cost += cost
            self.bytes += cost
        self._names.move_to_end(name)
        self._shrink()

    def _drop(self, name: str) -> None:
        held = self._names.pop(name, None)
        if held is not None:
            self.bytes -= held.cost

    def _shrink(self) -> None:
        while self._names and (
            len(self._names) > self._max_names or self.bytes > self._max_bytes
        ):
            _name, held = self._names.popitem(last=False)
            self.bytes -= held.cost


def _render(page: ProjectPage, fmt: Format, ctype: str, source: Source) -> Rendered:
    body = render(page, fmt)
    digest = hashlib.blake2b(body, digest_size=12).hexdigest()
    gz = gzip.compress(body, 6, mtime=0) if len(body) >= _GZIP_MIN else None
    return Rendered(body, gz, f'"{digest}"', ctype, source)


def visible(page: ProjectPage, config: Config, now: float) -> tuple[ProjectPage, float, int]:
    """Apply guard.min_age and drop metadata links the proxy cannot verify.

    Returns the page to show, until when it holds, and how many files it hides.
    """
    files = []
    hidden = 0
    valid_until = float("inf")
    for f in page.files:
        if too_young(f, page.name, config, now):
            hidden += 1
            valid_until = min(valid_until, matures_at(f, config) or valid_until)
            continue
        if f.metadata_hashes is not None and "sha256" not in f.metadata_hashes:
            f = dataclasses.replace(f, metadata_hashes=None)
        files.append(f)
    versions = page.versions if not hidden else ()
    return ProjectPage(page.name, tuple(files), versions), valid_until, hidden


@dataclass(frozen=True, slots=True)
class _Prerendered:
    """A fresh upstream page, parsed and rendered for its first asker in one thread hop."""
    page: ProjectPage
    valid_until: float
    hidden: int
    rendered: Rendered


def _parse_and_render(
    body: bytes, content_type: str, url: str, name: NormalizedName, config: Config,
    now: float, fmt: Format, ctype: str,
) -> tuple[ProjectPage, _Prerendered]:
    page = parse_page(body, content_type, url, name)
    shown, valid_until, hidden = visible(page, config, now)
    return page, _Prerendered(shown, valid_until, hidden,
                              _render(shown, fmt, ctype, "upstream"))


class Index:
    def __init__(
        self, store: PrivateStore, pages: PageCache, artifacts: ArtifactCache,
        upstream: UpstreamClient, ledger: CollisionLedger, metrics: Metrics,
        memory_pages: int, memory_bytes: int = 256 * 2**20,
    ) -> None:
        self.store = store
        self.pages = pages
        self.artifacts = artifacts
        self.upstream = upstream
        self.ledger = ledger
        self.metrics = metrics
        self._memory_pages = memory_pages
        # Upstream entries and rendered pages (renderings only when memory_pages).
        self._hot = _PageMemory(max(memory_pages, 1), memory_bytes)
        self._flights: dict[str, asyncio.Future[CachedPage]] = {}
        # Per name: a broken page (garbage, too large) backs off that name alone.
        self._backoff: dict[str, float] = {}
        self.outage = Outage()
        self._writes: set[asyncio.Task[None]] = set()
        self.served_names: OrderedDict[str, None] = OrderedDict()

    # --- the guard ---------------------------------------------------------------

    def decide(self, name: NormalizedName, config: Config, client: str) -> Decision:
        decision = decide(name, self.store.is_private(name), config)
        self.metrics.count(self.metrics.guard_decisions, decision.rule)
        level = logging.DEBUG if decision.rule == "upstream" else logging.INFO
        if guard_log.isEnabledFor(level):
            guard_log.log(level, "guard decision",
                          extra={"project": name, "rule": decision.rule, "client": client})
        if decision.rule in ("private", "reserved") and config.upstream.forward:
            self.ledger.observe(name, decision.rule, config)
        return decision

    async def upstream_has(self, name: NormalizedName, config: Config) -> bool | None:
        """Whether upstream lists the name; None when it cannot say now. Never
        names it to upstream: the answer comes from the upstream's project list."""
        return await self.ledger.upstream_has(name, config)

    # --- pages -----------------------------------------------------------------------

    async def rendered(
        self, name: NormalizedName, fmt: Format, ctype: str, config: Config, client: str,
    ) -> Rendered:
        """The page for a name in one format. Raises NotFound, UpstreamUnavailable."""
        decision = self.decide(name, config, client)
        key = (name, ctype)
        now = time.time()
        if decision.rule == "private":
            private = await self.store.page(name)
            if private is None:  # released between the check and the read
                raise NotFound(f"No project named {name}")
            return self._remembered(key, (private,), now) or await self._render(
                key, fmt, (private,), private, float("inf"), "private"
            )
        self._refuse_unless_forwarded(name, decision)
        # The warm path makes no coroutine call: a fresh entry in memory, and
        # its page already rendered for this format.
        entry = self._fresh_in_memory(name, config, now) or await self._upstream_page(
            name, config, (fmt, ctype)
        )
        upstream_page = entry.page
        if upstream_page is None:
            raise NotFound(f"No project named {name} upstream")
        self._note_served(name)
        # The visible page depends on the entry and on the guard settings (min_age).
        token = (entry, config.guard)
        hit = self._remembered(key, token, now)
        if hit is not None:
            return hit
        page, valid_until = self._visible(upstream_page, config, now)
        return await self._render(key, fmt, token, page, valid_until, "upstream")

    @staticmethod
    def _refuse_unless_forwarded(name: NormalizedName, decision: Decision) -> None:
        if decision.rule == "reserved":
            raise NotFound(f"{name} is reserved for private packages (guard.private_only)")
        if decision.rule == "forward_off":
            raise NotFound(f"No private project named {name}; forwarding upstream is off")

    def _remembered(
        self, key: tuple[str, str], token: tuple[object, ...], now: float,
    ) -> Rendered | None:
        """The page rendered earlier, while `token`'s objects are the same ones."""
        hit = self._hot.rendered(*key)
        if (
            hit is not None and now < hit[1] and len(hit[0]) == len(token)
            and all(a is b for a, b in zip(hit[0], token, strict=True))
        ):
            return hit[2]
        return None

    async def _render(
        self, key: tuple[str, str], fmt: Format, token: tuple[object, ...],
        page: ProjectPage, valid_until: float, source: Source,
    ) -> Rendered:
        # A 2,000-file page takes milliseconds to render and gzip: off the loop.
        rendered = await asyncio.to_thread(_render, page, fmt, key[1], source)
        if self._memory_pages:
            self._keep_rendered(key, token, valid_until, rendered)
        return rendered

    def _keep_rendered(
        self, key: tuple[str, str], token: tuple[object, ...], valid_until: float,
        rendered: Rendered,
    ) -> None:
        self._hot.keep_rendered(key[0], key[1], (token, valid_until, rendered))

    def _visible(self, page: ProjectPage, config: Config, now: float) -> tuple[ProjectPage, float]:
        shown, valid_until, hidden = visible(page, config, now)
        if hidden:
            self.metrics.count(self.metrics.min_age_hidden, amount=hidden)
        return shown, valid_until

    def _note_served(self, name: str) -> None:
        self.served_names[name] = None
        self.served_names.move_to_end(name)
        while len(self.served_names) > 100_000:
            self.served_names.popitem(last=False)

    async def root_names(self) -> list[NormalizedName]:
        private = await self.store.names()
        names = set(private) | {NormalizedName(n) for n in self.served_names}
        return sorted(names)

    def _fresh_in_memory(
        self, name: NormalizedName, config: Config, now: float,
    ) -> CachedPage | None:
        entry = self._hot.get(name)
        if entry is None or entry.page is None:
            return None
        if now - entry.fetched_at < config.upstream.index_ttl:
            self.metrics.count(self.metrics.index_cache, "hit")
            return entry
        return None

    async def _upstream_page(
        self, name: NormalizedName, config: Config, want: tuple[Format, str] | None = None,
    ) -> CachedPage:
        """The upstream page from memory, disk or upstream. `want` (format, content
        type): render a freshly fetched page for it in the same thread hop as the
        parse; each hop is a wake-up of the loop on a cold page's critical path."""
        entry = self._hot.get(name)
        if entry is None:
            entry = await self.pages.get(name)
            if entry is not None:
                self._remember(name, entry)
        if entry is not None:
            ttl = config.upstream.index_ttl if entry.page is not None else (
                config.upstream.negative_ttl
            )
            now = time.time()
            if now - entry.fetched_at < ttl or (
                entry.page is not None and now < self._backoff.get(name, 0.0)
            ):
                self.metrics.count(self.metrics.index_cache, "hit")
                return entry
        now = time.time()
        if self.outage.active(now):
            # Not asked again until the outage is over: stale or 502, at once
            # (logged once, when the upstream was marked down).
            if entry is not None and entry.page is not None:
                self.metrics.stale_pages.inc()
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

    def _remember(self, name: str, entry: CachedPage) -> None:
        self._hot.put(name, entry)

    async def _refresh(
        self, name: NormalizedName, entry: CachedPage | None, config: Config,
        want: tuple[Format, str] | None = None,
    ) -> CachedPage:
        url = upstream_page_url(config.upstream.url, name)
        has_page = entry is not None and entry.page is not None
        resp = await self.upstream.fetch_page(
            url, config.upstream.timeout,
            etag=entry.etag if has_page and entry else None,
            last_modified=entry.last_modified if has_page and entry else None,
        )
        now = time.time()
        fresh: CachedPage
        pre: _Prerendered | None = None
        if resp.outcome == "ok":
            try:
                if want is None:
                    page = await asyncio.to_thread(
                        parse_page, resp.body, resp.content_type, resp.url, name
                    )
                else:
                    page, pre = await asyncio.to_thread(
                        _parse_and_render, resp.body, resp.content_type, resp.url, name,
                        config, now, *want,
                    )
            except PageParseError as exc:
                return self._stale_or_fail(
                    name, entry, f"upstream sent a broken page ({exc})", config, backoff=True
                )
            fresh = CachedPage(page, now, resp.etag, resp.last_modified)
            self.metrics.count(self.metrics.index_cache, "miss")
            self.ledger.remember(name, True)
        elif resp.outcome == "not_modified" and entry is not None and entry.page is not None:
            fresh = dataclasses.replace(entry, fetched_at=now)
            self.metrics.count(self.metrics.index_cache, "revalidated")
        elif resp.outcome == "not_found":
            fresh = CachedPage(None, now)
            self.metrics.count(self.metrics.index_cache, "miss")
            self.ledger.remember(name, False)
        else:
            reason = resp.reason or "upstream unavailable"
            if resp.down:
                self.outage = Outage(now + config.upstream.backoff, f"upstream down ({reason})")
                log.warning("upstream marked down", extra={
                    "reason": reason, "seconds": config.upstream.backoff})
            return self._stale_or_fail(name, entry, reason, config, backoff=not resp.down)
        self._backoff.pop(name, None)
        self._remember(name, fresh)
        if pre is not None and want is not None and self._memory_pages:
            if pre.hidden:
                self.metrics.count(self.metrics.min_age_hidden, amount=pre.hidden)
            # Found by rendered()'s _remembered(): same entry, same guard settings.
            self._keep_rendered((name, want[1]), (fresh, config.guard), pre.valid_until,
                                pre.rendered)
        # The page is in memory already; the disk copy (a SQLite write) need not
        # delay the answer. bench/ saw cold pages at 45-56 ms under uv's fan-out.
        write = asyncio.create_task(self.pages.put(name, fresh))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        return fresh

    def _stale_or_fail(
        self, name: str, entry: CachedPage | None, reason: str, config: Config,
        *, backoff: bool = False,
    ) -> CachedPage:
        if entry is not None and entry.page is not None:
            self.metrics.stale_pages.inc()
            if backoff:
                self._backoff[name] = time.time() + config.upstream.backoff
            log.warning("serving stale page", extra={"project": name, "reason": reason})
            return entry
        raise UpstreamUnavailable(f"Upstream index unavailable for {name}: {reason}")

    async def flush(self) -> None:
        """Wait for page-cache writes still in flight (shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    # --- files -------------------------------------------------------------------------

    async def file(
        self, name: NormalizedName, filename: str, config: Config, client: str,
    ) -> LocalFile | RemoteFile:
        """Where a file's bytes come from: a file already open, or a transfer
        to start. Raises NotFound, UpstreamUnavailable."""
        is_meta = filename.endswith(METADATA_SUFFIX)
        dist_name = filename[: -len(METADATA_SUFFIX)] if is_meta else filename
        decision = self.decide(name, config, client)
        if decision.rule == "private":
            page = await self.store.page(name)
            entry = page.file(dist_name) if page is not None else None
            if entry is None or (is_meta and not entry.has_metadata):
                raise NotFound(f"No file {filename} in private project {name}")
            hashes = entry.metadata_hashes if is_meta else entry.hashes
            try:
                fh, size = await asyncio.to_thread(
                    open_sized, self.store.file_path(name, filename)
                )
            except FileNotFoundError:  # deleted since the page was read
                raise NotFound(f"No file {filename} in private project {name}") from None
            return LocalFile(fh, size, "private", (hashes or {}).get("sha256"))
        # A name that became private or reserved after its files were cached is
        # refused here, before the cache is consulted.
        self._refuse_unless_forwarded(name, decision)
        cached = await self._page_for_file(name, dist_name, config)
        entry = cached.file(dist_name)
        if entry is None or too_young(entry, name, config, time.time()):
            raise NotFound(f"No file {dist_name} for {name} upstream")
        hashes = entry.metadata_hashes if is_meta else entry.hashes
        sha256 = hashes.get("sha256") if hashes is not None else None
        if sha256 is None:
            raise NotFound(
                f"{filename} has no sha256 upstream; the proxy serves verified files only"
            )
        opened = await self.artifacts.open_cached(sha256)
        if opened is not None:
            self.metrics.count(self.metrics.file_cache, "hit")
            return LocalFile(opened[0], opened[1], "cache", sha256)
        origin = entry.origin + METADATA_SUFFIX if is_meta else entry.origin
        # Checked again at every hop by the client; here so that a refused
        # file costs no transfer, for GET and HEAD alike.
        try:
            refused = refusal(URL(origin), config.upstream)
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
            opener: Callable[[str], Any] = lambda url: self.upstream.open_file(  # noqa: E731
                url, config.upstream.timeout
            )
            return self.artifacts.download(sha256, origin, expected, opener, limit)

        return RemoteFile(start, expected, sha256)

    async def _page_for_file(
        self, name: NormalizedName, filename: str, config: Config
    ) -> ProjectPage:
        """A page listing the file. Upstream files never change once published,
        so any cached page that lists it will do, fresh or not."""
        entry = self._hot.get(name) or await self.pages.get(name)
        if entry is not None and entry.page is not None and entry.page.file(filename):
            return entry.page
        fresh = await self._upstream_page(name, config)
        if fresh.page is None:
            raise NotFound(f"No project named {name} upstream")
        return fresh.page
