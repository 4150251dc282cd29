"""The read path in one place: private first -> guard -> upstream (mirror.py) -> stale.

Reader.rendered() answers a project page, Reader.file() a file; both raise the
errors of errors.py. Rendered pages are kept in memory with their ETag and a
gzip copy (page_memory.py), so a warm page costs a dict lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time

from packaging.utils import NormalizedName

from .answers import LocalFile, RemoteFile, Rendered, Source, render_page, visible
from .cache import open_sized
from .config import Config
from .dists import METADATA_SUFFIX
from .errors import NotFound
from .guard import CollisionLedger, Decision, decide, too_young
from .metrics import Metrics
from .mirror import Mirror
from .model import ProjectPage
from .page_memory import PageMemory
from .simple_api import Format
from .store import PrivateStore

guard_log = logging.getLogger("indexguard.guard")


class Reader:
    def __init__(
        self, store: PrivateStore, mirror: Mirror, memory: PageMemory,
        ledger: CollisionLedger, metrics: Metrics, keep_renders: bool,
    ) -> None:
        self.store = store
        self.mirror = mirror
        self.memory = memory
        self.ledger = ledger
        self.metrics = metrics
        self._keep_renders = keep_renders

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

    @staticmethod
    def _refuse_unless_forwarded(name: NormalizedName, decision: Decision) -> None:
        if decision.rule == "reserved":
            raise NotFound(f"{name} is reserved for private packages (guard.private_only)")
        if decision.rule == "forward_off":
            raise NotFound(f"No private project named {name}; forwarding upstream is off")

    # --- pages -------------------------------------------------------------------

    async def rendered(
        self, name: NormalizedName, fmt: Format, ctype: str, config: Config, client: str,
    ) -> Rendered:
        """The page for a name in one format. Raises NotFound, UpstreamUnavailable."""
        decision = self.decide(name, config, client)
        now = time.time()
        if decision.rule == "private":
            private = await self.store.page(name)
            if private is None:  # released between the check and the read
                raise NotFound(f"No project named {name}")
            return self._remembered(name, ctype, (private,), now) or await self._render(
                name, fmt, ctype, (private,), private, float("inf"), "private"
            )
        mirror = self.mirror
        self._refuse_unless_forwarded(name, decision)
        # The warm path makes no coroutine call: a fresh entry in memory, and
        # its page already rendered for this format.
        entry = mirror.fresh_in_memory(name, config, now) or await mirror.page(
            name, config, (fmt, ctype)
        )
        upstream_page = entry.page
        if upstream_page is None:
            raise NotFound(f"No project named {name} upstream")
        mirror.note_served(name)
        # The visible page depends on the entry and on the guard settings (min_age);
        # it is kept under the mirror's key (the same for every group that reads it).
        token = (entry, config.guard)
        key = mirror.key(name)
        hit = self._remembered(key, ctype, token, now)
        if hit is not None:
            return hit
        page, valid_until = self._visible(upstream_page, config, now)
        return await self._render(key, fmt, ctype, token, page, valid_until, "upstream")

    def _remembered(
        self, key: str, ctype: str, token: tuple[object, ...], now: float,
    ) -> Rendered | None:
        """The page rendered earlier, while `token`'s objects are the same ones."""
        hit = self.memory.rendered(key, ctype)
        if (
            hit is not None and now < hit[1] and len(hit[0]) == len(token)
            and all(a is b for a, b in zip(hit[0], token, strict=True))
        ):
            return hit[2]
        return None

    async def _render(
        self, key: str, fmt: Format, ctype: str, token: tuple[object, ...],
        page: ProjectPage, valid_until: float, source: Source,
    ) -> Rendered:
        # A 2,000-file page takes milliseconds to render and gzip: off the loop.
        rendered = await asyncio.to_thread(render_page, page, fmt, ctype, source)
        if self._keep_renders:
            self.memory.keep_rendered(key, ctype, (token, valid_until, rendered))
        return rendered

    def _visible(self, page: ProjectPage, config: Config, now: float) -> tuple[ProjectPage, float]:
        shown, valid_until, hidden = visible(page, config, now)
        if hidden:
            self.metrics.count(self.metrics.min_age_hidden, amount=hidden)
        return shown, valid_until

    async def root_names(self) -> list[NormalizedName]:
        private = await self.store.names()
        names = set(private) | {NormalizedName(n) for n in self.mirror.served_names}
        return sorted(names)

    # --- files -------------------------------------------------------------------

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
        listed = await self.mirror.page_for_file(name, dist_name, config)
        entry = listed.file(dist_name)
        if entry is None or too_young(entry, name, config, time.time()):
            raise NotFound(f"No file {dist_name} for {name} upstream")
        return await self.mirror.file(name, filename, entry, config)

    async def flush(self) -> None:
        await self.mirror.flush()
