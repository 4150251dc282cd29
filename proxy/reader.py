"""The read path of one view: resolve the name (resolve.py) -> one member answers.

A view is a group (its members walked in order: private indexes first, then
upstreams) or one index alone (/i/<index>/: no upstream). Reader.rendered()
answers a project page, Reader.file() a file; both raise the errors of
errors.py. Nothing is ever merged: the one member that answers a name answers
its page and its files. Rendered pages are kept in memory with their ETag and a
gzip copy (page_memory.py), so a warm page costs a dict lookup.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from packaging.utils import NormalizedName

from .answers import RemoteFile, Rendered, render_page, visible
from .config import Config
from .dists import METADATA_SUFFIX
from .errors import NotFound, UpstreamUnavailable
from .guard import CollisionLedger, too_young
from .metrics import Metrics
from .mirror import Mirror
from .model import ProjectPage
from .page_memory import PageMemory
from .pagecache import CachedPage
from .registry import GroupSpec, Member, UpstreamSpec
from .resolve import ForwardOff, Missing, Private, Reserved, Resolution, Upstreams, resolve
from .simple_api import Format
from .storage import RedirectFile, Source, StoredFile
from .store import PrivateStore

guard_log = logging.getLogger("indexguard.guard")
# Remembered resolutions; past this the memo starts over (names are unbounded).
_MEMO_ENTRIES = 50_000


@dataclass(frozen=True, slots=True)
class View:
    """What a URL reads: a group (/simple/, /g/<group>/) or one index (/i/<index>/)."""

    kind: str  # "group" | "index"
    name: str

    @property
    def label(self) -> str:
        return self.name if self.kind == "group" else f"index:{self.name}"


@functools.lru_cache(maxsize=1024)
def view(kind: str, name: str) -> View:
    """The one View per (kind, name): a frozen dataclass costs its __init__, and
    every request names one (the names come from routes the config bounds, or a
    404)."""
    return View(kind, name)


class _BecamePrivate(Exception):
    """A remote store says the name is private now: read it again from the top."""


class Reader:
    """Every view's read path; the stores and mirrors are shared by all views."""

    def __init__(
        self, stores: Mapping[str, PrivateStore], mirrors: Mapping[str, Mirror],
        memory: PageMemory, ledger: CollisionLedger, metrics: Metrics, keep_renders: bool,
    ) -> None:
        self.stores = stores
        self.mirrors = mirrors
        self.memory = memory
        self.ledger = ledger
        self.metrics = metrics
        self._keep_renders = keep_renders
        # Resolutions per (group, name, which indexes hold it), for _memo_config.
        self._memo: dict[tuple[str, str, tuple[bool, ...]], Resolution] = {}
        self._memo_config: Config | None = None
        # /i/<index>/ views as groups of one member, made once.
        self._alone: dict[str, GroupSpec] = {}
        self._remote = any(store.records.remote for store in stores.values())

    # --- resolution --------------------------------------------------------------

    def group_of(self, view: View, config: Config) -> GroupSpec:
        """The group a view walks; an index alone is a group of one member, never
        forwarded. Raises NotFound for a group or index the config does not have."""
        registry = config.registry
        if view.kind == "index":
            if view.name not in self.stores or registry.index(view.name) is None:
                raise NotFound(f"No index named {view.name}")
            alone = self._alone.get(view.name)
            if alone is None:
                alone = self._alone[view.name] = GroupSpec(
                    f"index:{view.name}", (Member("index", view.name),), (), False)
            return alone
        group = registry.group(view.name)
        if group is None:
            raise NotFound(f"No group named {view.name}")
        return group

    async def _ask_stores(self, name: NormalizedName, view: View, config: Config) -> None:
        """A remote store asked whether the name is private there, when nothing
        fresh is remembered (guard across replicas). Never for a local store."""
        for index in self.group_of(view, config).index_names:
            store = self.stores.get(index)
            if store is not None and store.must_wait(name):
                await store.check(name)

    async def _before_upstream(self, name: NormalizedName, view: View, config: Config) -> None:
        """Right before a request that names the name may leave for an upstream
        (a page not fresh in memory, a cold file): ask every remote store of the
        group now, whatever this replica remembers. The change feed tells a
        replica within about 2 s that a name turned private, and a remembered
        "not private" holds for ABSENCE_TTL; neither window may let the name out
        once an upload of it answered 200 anywhere. One small GET per upstream
        request, never on the warm path. Raises _BecamePrivate."""
        if not self._remote:
            return
        for index in self.group_of(view, config).index_names:
            store = self.stores.get(index)
            if store is not None and store.records.remote and await store.check(name):
                raise _BecamePrivate(name)

    def _stores_unsure(self, name: NormalizedName, view: View, config: Config) -> bool:
        if not self._remote:
            return False
        return any(
            store.must_wait(name) for index in self.group_of(view, config).index_names
            if (store := self.stores.get(index)) is not None
        )

    def resolve(
        self, name: NormalizedName, view: View, config: Config, client: str,
    ) -> Resolution:
        group = self.group_of(view, config)
        stores = self.stores
        held = tuple([  # a list first: faster than a generator for a handful
            index in stores and stores[index].is_private(name) for index in group.index_names
        ])
        # resolve() is pure: its answer depends on the config and on which indexes
        # hold the name, so it is remembered per those (a warm page is asked the
        # same question thousands of times a second; bench: group page).
        if config is not self._memo_config:
            self._memo.clear()
            self._memo_config = config
        key = (group.name, name, held)
        resolution = self._memo.get(key)
        if resolution is None:
            holders = dict(zip(group.index_names, held, strict=True))
            resolution = resolve(name, group, config.registry,
                                 lambda index: holders.get(index, False), config.upstream.forward)
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = resolution
        rule = resolution.rule
        self.metrics.count(self.metrics.guard_decisions, rule, view.label)
        level = logging.DEBUG if rule == "upstream" else logging.INFO
        if guard_log.isEnabledFor(level):
            guard_log.log(level, "guard decision", extra={
                "project": name, "rule": rule, "client": client, "group": group.name})
        if rule in ("private", "reserved") and config.upstream.forward:
            self.ledger.observe(name, rule, config)
        return resolution

    async def upstream_has(self, name: NormalizedName, config: Config) -> bool | None:
        """Whether upstream lists the name; None when it cannot say now. Never
        names it to upstream: the answer comes from the upstream's project list."""
        return await self.ledger.upstream_has(name, config)

    @staticmethod
    def _refuse(resolution: Resolution) -> None:
        if isinstance(resolution, Reserved | ForwardOff | Missing):
            raise NotFound(resolution.reason)

    def _walk_in_memory(
        self, name: NormalizedName, candidates: Upstreams, config: Config, now: float,
    ) -> tuple[Mirror, CachedPage] | None:
        """The walk, when memory alone can decide it: every upstream before the
        answering one said "not found" recently, and the answering one's page is
        fresh. None: ask _walk()."""
        for spec in candidates.candidates:
            mirror = self.mirrors.get(spec.name)
            if mirror is None:
                return None
            entry = mirror.fresh_in_memory(name, config, now)
            if entry is not None:
                return mirror, entry
            if not mirror.fresh_absence(name, config, now):
                return None
        return None

    async def _walk(
        self, name: NormalizedName, candidates: Upstreams, config: Config,
        want: tuple[Format, str] | None, now: float,
    ) -> tuple[Mirror, CachedPage]:
        """The first upstream that hosts the name, and its page. An upstream that
        fails stops the walk (its stale page, else 502): never the next one.
        Raises NotFound when none hosts it, UpstreamUnavailable."""
        for spec in candidates.candidates:
            mirror = self.mirrors.get(spec.name)
            if mirror is None:
                raise UpstreamUnavailable(f"Upstream {spec.name} needs a restart to be used")
            entry = mirror.fresh_in_memory(name, config, now) or await mirror.page(
                name, config, want
            )
            if entry.page is not None:
                return mirror, entry
        raise NotFound(f"No project named {name} upstream")

    # --- pages -------------------------------------------------------------------

    async def rendered(
        self, name: NormalizedName, fmt: Format, ctype: str, config: Config, client: str,
        view: View,
    ) -> Rendered:
        """The page for a name in one format. Raises NotFound, UpstreamUnavailable."""
        if self._stores_unsure(name, view, config):
            await self._ask_stores(name, view, config)
        resolution = self.resolve(name, view, config, client)
        now = time.time()
        if isinstance(resolution, Private):
            index = resolution.index.name
            private = await self.stores[index].page(name)
            if private is None:  # released between the check and the read
                raise NotFound(f"No project named {name}")
            key = self._private_key(index, name)
            return self._remembered(key, ctype, (private,), now) or await self._render(
                key, fmt, ctype, (private,), private, float("inf"), "private"
            )
        self._refuse(resolution)
        assert isinstance(resolution, Upstreams)
        # The warm path makes no coroutine call: fresh entries in memory, and the
        # answering page already rendered for this format.
        found = self._walk_in_memory(name, resolution, config, now)
        if found is None:
            try:
                await self._before_upstream(name, view, config)
            except _BecamePrivate:
                # The store now remembers the name as private: it resolves there.
                return await self.rendered(name, fmt, ctype, config, client, view)
            found = await self._walk(name, resolution, config, (fmt, ctype), now)
        mirror, entry = found
        upstream_page = entry.page
        assert upstream_page is not None
        mirror.note_served(name)
        # The visible page depends on the entry and on the guard settings (min_age);
        # it is kept under the mirror's key (the same for every group that reads it).
        token = (entry, config.guard)
        key = mirror.key(name)
        hit = self._remembered(key, ctype, token, now)
        if hit is not None:
            return hit
        page, valid_until = self._visible(upstream_page, config, mirror.settings(config), now)
        return await self._render(key, fmt, ctype, token, page, valid_until, "upstream")

    @staticmethod
    def _private_key(index: str, name: str) -> str:
        # Apart from every mirror's keys ("" or "<upstream>/" prefixes).
        return f"@{index}/{name}"

    def _remembered(
        self, key: str, ctype: str, token: tuple[object, ...], now: float,
    ) -> Rendered | None:
        """The page rendered earlier, while `token`'s objects are the same ones."""
        hit = self.memory.rendered(key, ctype)
        if hit is None or now >= hit[1] or len(hit[0]) != len(token):
            return None
        for kept, wanted in zip(hit[0], token, strict=True):
            if kept is not wanted:
                return None
        return hit[2]

    async def _render(
        self, key: str, fmt: Format, ctype: str, token: tuple[object, ...],
        page: ProjectPage, valid_until: float, source: Source,
    ) -> Rendered:
        # A 2,000-file page takes milliseconds to render and gzip: off the loop.
        rendered = await asyncio.to_thread(render_page, page, fmt, ctype, source)
        if self._keep_renders:
            self.memory.keep_rendered(key, ctype, (token, valid_until, rendered))
        return rendered

    def _visible(
        self, page: ProjectPage, config: Config, upstream: UpstreamSpec, now: float,
    ) -> tuple[ProjectPage, float]:
        # min_age is the upstream's own (it defaults to guard.min_age).
        shown, valid_until, hidden = visible(page, config, now, upstream.min_age)
        if hidden:
            self.metrics.count(self.metrics.min_age_hidden, amount=hidden)
        return shown, valid_until

    async def root_names(
        self, config: Config, view: View,
    ) -> list[NormalizedName]:
        """The view's private names, and the upstream names it has served."""
        group = self.group_of(view, config)
        names: set[NormalizedName] = set()
        for index in group.index_names:
            if index in self.stores:
                names.update(await self.stores[index].names())
        for member in group.upstream_members:
            mirror = self.mirrors.get(member.name)
            if mirror is not None:
                names.update(NormalizedName(n) for n in mirror.served_names)
        return sorted(names)

    # --- files -------------------------------------------------------------------

    async def file(
        self, name: NormalizedName, filename: str, config: Config, client: str,
        view: View, redirect: bool = False,
    ) -> StoredFile | RedirectFile | RemoteFile:
        """Where a file's bytes come from: a file already open, or a transfer
        to start; with redirect (a GET, storage.s3.redirect_ttl on), maybe a
        presigned URL. Only the member that answers the name in the view is
        asked. Raises NotFound, UpstreamUnavailable."""
        try:
            return await self._file(name, filename, config, client, view, redirect)
        except _BecamePrivate:
            return await self._file(name, filename, config, client, view, redirect)

    async def _file(
        self, name: NormalizedName, filename: str, config: Config, client: str,
        view: View, redirect: bool,
    ) -> StoredFile | RedirectFile | RemoteFile:
        is_meta = filename.endswith(METADATA_SUFFIX)
        dist_name = filename[: -len(METADATA_SUFFIX)] if is_meta else filename
        if self._stores_unsure(name, view, config):
            await self._ask_stores(name, view, config)
        resolution = self.resolve(name, view, config, client)
        if isinstance(resolution, Private):
            store = self.stores[resolution.index.name]
            page = await store.page(name)
            entry = page.file(dist_name) if page is not None else None
            if entry is None and store.records.remote:
                # Listed on a page another replica served a moment ago, before
                # this one's feed moved: ask the bucket before a 404.
                page = await store.page(name, fresh=True)
                entry = page.file(dist_name) if page is not None else None
            if entry is None or (is_meta and not entry.has_metadata):
                raise NotFound(f"No file {filename} in private project {name}")
            hashes = entry.metadata_hashes if is_meta else entry.hashes
            stored = await store.open_file(name, filename, (hashes or {}).get("sha256"),
                                           redirect)
            if stored is None:  # deleted since the page was read
                raise NotFound(f"No file {filename} in private project {name}")
            return stored
        # A name that became private or reserved after its files were cached is
        # refused here, before the cache is consulted.
        self._refuse(resolution)
        assert isinstance(resolution, Upstreams)
        mirror, listed = await self._answering_page(name, dist_name, resolution, config, view)
        entry = listed.file(dist_name)
        min_age = mirror.settings(config).min_age
        if entry is None or too_young(entry, name, config, time.time(), min_age):
            raise NotFound(f"No file {dist_name} for {name} upstream")
        source = await mirror.file(name, filename, entry, config, redirect)
        if isinstance(source, RemoteFile):  # a cold file: its URL names the project
            await self._before_upstream(name, view, config)
        return source

    async def _answering_page(
        self, name: NormalizedName, filename: str, candidates: Upstreams, config: Config,
        view: View,
    ) -> tuple[Mirror, ProjectPage]:
        """The page of the upstream that answers the name, listing the file if it
        ever did. Upstream files never change once published, so a cached page
        that lists it will do, fresh or not."""
        for spec in candidates.candidates:
            mirror = self.mirrors.get(spec.name)
            if mirror is None:
                raise UpstreamUnavailable(f"Upstream {spec.name} needs a restart to be used")
            known = await mirror.known(name)
            if known is not None and known.page is not None and known.page.file(filename):
                return mirror, known.page
            await self._before_upstream(name, view, config)
            entry = await mirror.page(name, config)
            if entry.page is not None:
                return mirror, entry.page
        raise NotFound(f"No project named {name} upstream")

    async def flush(self) -> None:
        for mirror in self.mirrors.values():
            await mirror.flush()
