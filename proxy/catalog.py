"""What the web UI may show, gathered from what the reader's stores and mirrors
already hold: a project as a group resolves it, the newest private projects, the
files min_age holds back. Never asks an upstream for a page or a file.

Knows nothing of HTTP or HTML: web_ui.py authorizes, renders and answers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.utils import NormalizedName

from .answers import visible
from .config import Config
from .description import Description, Renderings, render_metadata
from .dists import METADATA_SUFFIX
from .errors import NotFound
from .guard import matures_at
from .mirror import Mirror
from .model import ProjectPage
from .reader import Reader, View
from .registry import GroupSpec
from .resolve import Private, Upstreams, resolve
from .storage import LocalFile, RedirectFile, StoredFile, StreamedFile
from .store import PrivateStore
from .ui_model import Explanation, Known, VersionView, explain, newest_upload, versions_of

# The upstream names (most recently served first) looked at for files held back
# by min_age on the guard page: each is a page-cache read.
MAX_GUARD_NAMES = 200


@dataclass(frozen=True, slots=True)
class HeldBack:
    """An upstream file min_age hides from clients until `until` (epoch seconds)."""

    project: str
    upstream: str
    filename: str
    until: float | None


@dataclass(frozen=True, slots=True)
class Project:
    name: NormalizedName
    why: Explanation
    source: str | None  # "private" or "upstream <name>"; None: nothing to show
    versions: tuple[VersionView, ...]
    held_back: tuple[HeldBack, ...]
    description: Description | None


@dataclass(frozen=True, slots=True)
class PrivateProject:
    name: NormalizedName
    index: str
    uploaded: str  # the newest PEP 700 upload-time of its files, "" when none
    latest: str  # its newest release, "" when it has no files


class Catalog:
    def __init__(self, reader: Reader, renderings: Renderings) -> None:
        self.reader = reader
        self.renderings = renderings

    async def project(
        self, name: NormalizedName, view: View, config: Config,
    ) -> Project:
        """The name as the view resolves it, with what the proxy knows of it.
        Raises NotFound for a view the config does not have."""
        reader = self.reader
        group = reader.group_of(view, config)
        stores = reader.stores
        held = {i: i in stores and stores[i].is_private(name) for i in group.index_names}
        # resolve.py's own rule list, called as the reader calls it, but without
        # counting a guard decision or feeding the collision ledger: a person
        # looking at a page is no client asking for the name.
        resolution = resolve(name, group, config.registry, lambda i: held.get(i, False),
                             config.upstream.forward)
        page: ProjectPage | None = None
        cached: dict[str, bool] | None = None
        known: dict[str, Known] = {}
        source = None
        held_back: tuple[HeldBack, ...] = ()
        description = None
        if isinstance(resolution, Private):
            store = stores[resolution.index.name]
            page = await store.page(name)
            if page is not None:
                source = "private"
                description = await self._description(store, page)
        elif isinstance(resolution, Upstreams):
            found, known = await self._known_upstream(name, resolution)
            if found is not None:
                mirror, upstream_page = found
                page, held_back = _shown(name, upstream_page, config, mirror)
                source = f"upstream {mirror.name}"
                cached = await asyncio.to_thread(_cached, mirror, page)
        also = [i for i in group.index_names if held.get(i)][1:]
        why = explain(name, resolution, group, known, also, reader.ledger.known(name, config))
        versions = versions_of(page, cached) if page is not None else ()
        return Project(name, why, source, versions, held_back, description)

    async def _known_upstream(
        self, name: NormalizedName, resolution: Upstreams,
    ) -> tuple[tuple[Mirror, ProjectPage] | None, dict[str, Known]]:
        """The walk over what each candidate upstream last said (memory or disk,
        however old), stopping where the simple API's walk would: at the first
        page, or at the first upstream the proxy knows nothing of."""
        known: dict[str, Known] = {}
        for spec in resolution.candidates:
            mirror = self.reader.mirrors.get(spec.name)
            entry = await mirror.known(name) if mirror is not None else None
            if mirror is None or entry is None:
                known[spec.name] = "unknown"
                return None, known
            if entry.page is None:
                known[spec.name] = "absent"
                continue
            known[spec.name] = "page"
            return (mirror, entry.page), known
        return None, known

    async def _description(self, store: PrivateStore, page: ProjectPage) -> Description | None:
        """The newest unyanked release's description, from its wheel's METADATA (the
        stored PEP 658 file; sdists have none); rendered once per metadata file."""
        name = page.name
        with_meta = ProjectPage(name, tuple(f for f in page.files if f.has_metadata))
        releases = versions_of(with_meta)
        if not releases:
            return None
        release = next((v for v in releases if not v.yanked), releases[0])
        entry = with_meta.file(release.files[0].filename)
        assert entry is not None and entry.metadata_hashes is not None
        # A metadata file's bytes never change under its sha256: the key. Stored
        # files always have one (publish.py); the fallback is for older stores.
        key = entry.metadata_hashes.get("sha256") or f"{name}/{entry.filename}"
        found, description = self.renderings.get(key)
        if found:
            return description
        # Read from the store as the reader does, but not through Reader.file():
        # that would count a guard decision (and maybe a collision) per page view.
        opened = await store.open_file(name, entry.filename + METADATA_SUFFIX,
                                       entry.metadata_hashes.get("sha256"))
        if opened is None:  # deleted meanwhile
            return None
        raw = await _read_all(opened)
        description = await asyncio.to_thread(render_metadata, raw)
        self.renderings.put(key, description)
        return description

    async def newest_private(
        self, indexes: Iterable[str], limit: int,
    ) -> tuple[list[PrivateProject], int]:
        """The private projects of these indexes, newest upload first: at most
        limit of them, and how many there are in all."""
        found: list[tuple[str, NormalizedName, str, ProjectPage]] = []
        for index in indexes:
            store = self.reader.stores.get(index)
            if store is None:
                continue
            for held in await store.names():
                page = await store.page(held)
                if page is not None:
                    found.append((newest_upload(page), held, index, page))
        found.sort(key=lambda p: (p[0], p[1]), reverse=True)
        shown = []
        for uploaded, held, index, page in found[:limit]:
            releases = versions_of(page)  # only for those shown: it sorts every file
            shown.append(PrivateProject(held, index, uploaded,
                                        releases[0].version if releases else ""))
        return shown, len(found)

    async def held_back(self, group: GroupSpec, config: Config) -> list[HeldBack]:
        """Files min_age hides now, among the upstream names the group's upstreams
        served most recently (what the proxy holds of them; nothing is fetched)."""
        out: list[HeldBack] = []
        for member in group.upstream_members:
            mirror = self.reader.mirrors.get(member.name)
            if mirror is None:
                continue
            for served in itertools.islice(reversed(mirror.served_names), MAX_GUARD_NAMES):
                entry = await mirror.known(NormalizedName(served))
                if entry is not None and entry.page is not None:
                    out.extend(_shown(NormalizedName(served), entry.page, config, mirror)[1])
        return out


async def _read_all(opened: StoredFile | RedirectFile) -> bytes:
    """A stored metadata file's bytes: at most 16 MiB (publish.py bounds the
    METADATA it stores), from this host's copy or streamed from the store."""
    if isinstance(opened, LocalFile):
        def read() -> bytes:
            with opened.file as fh:
                return fh.read(opened.size)
        return await asyncio.to_thread(read)
    if isinstance(opened, StreamedFile):
        return b"".join([chunk async for chunk in opened.read(0, opened.size)])
    return b""  # a redirect is only handed out when asked for


def _shown(
    name: NormalizedName, page: ProjectPage, config: Config, mirror: Mirror,
) -> tuple[ProjectPage, tuple[HeldBack, ...]]:
    """The page as pip sees it now (answers.visible: min_age applied), and the
    files it holds back."""
    min_age = mirror.settings(config).min_age
    shown, _until, hidden = visible(page, config, time.time(), min_age)
    if not hidden:
        return shown, ()
    kept = {f.filename for f in shown.files}
    return shown, tuple(HeldBack(name, mirror.name, f.filename, matures_at(f, min_age))
                        for f in page.files if f.filename not in kept)


def _cached(mirror: Mirror, page: ProjectPage) -> dict[str, bool]:
    """Which of the page's files the proxy's cache holds (a stat each; blocking)."""
    found: dict[str, bool] = {}
    for entry in page.files:
        sha = entry.sha256
        if sha is None or sha in found:
            continue
        try:
            found[sha] = os.path.isfile(mirror.artifacts.path_for(sha))
        except NotFound:  # not 64 lowercase hex digits: never names a file
            found[sha] = False
    return found
