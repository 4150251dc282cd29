"""The registry model: private indexes, upstreams, the groups clients read, GitLab aliases.

Frozen values and the checks that tie them together (names, references, "private
first", overlapping `owns`). Pure: config.py reads the YAML; nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from .patterns import first_match, witness

# Index, upstream and group names: they appear in URLs (/i/<index>/, /g/<group>/)
# and in metric labels, so they are short and need no escaping anywhere.
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
NAME_RULE = "a-z, 0-9 and '-', not starting with '-', at most 64 characters"
# The names a config without indexes/upstreams/groups gets: today's one index,
# one upstream and the group served at /simple/.
LEGACY_INDEX = "default"
LEGACY_UPSTREAM = "pypi"
DEFAULT_GROUP = "default"

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A private store that accepts uploads."""

    name: str
    # Normalized fnmatch patterns: only this index may publish names matching them.
    owns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One upstream simple index; the fields config.Upstream has, per upstream."""

    name: str
    # Without credentials: safe to log and to build URLs from.
    url: str
    # Hosts besides the upstream's own origin that its files and redirects may
    # come from: "host" or "host:port", lowercased.
    file_hosts: tuple[str, ...] = ()
    # Statuses meaning "no such project": the walk moves on to the next upstream.
    # PyPI says 404; the PyTorch index says 403 for names it does not host.
    not_found: frozenset[int] = frozenset({404, 410})
    index_ttl: float = 600.0
    negative_ttl: float = 60.0
    timeout: float = 5.0
    backoff: float = 15.0
    # Upstream files younger than this (PEP 700 upload-time) are hidden; None: off.
    min_age: float | None = None
    # (user, password) from the configured url's userinfo; sent to this
    # upstream's own origin only. Never printed: kept out of repr.
    credentials: tuple[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of a group's ordered member list."""

    kind: Literal["index", "upstream"]
    name: str
    # Upstream members only: normalized patterns of the names asked of it; None: all.
    names: tuple[str, ...] | None = None

    def admits(self, name: str) -> bool:
        return self.names is None or first_match(name, self.names) is not None


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What clients read: members walked in order, private indexes first."""

    name: str
    members: tuple[Member, ...]
    # Never forwarded upstream: guard.private_only first, then the group's own.
    reserved: tuple[str, ...] = ()
    # The group's forwarding toggle; upstream.forward: false still stops all.
    forward: bool = True
    # Derived from members once: resolve() reads them on every request.
    index_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    upstream_members: tuple[Member, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_names",
                           tuple(m.name for m in self.members if m.kind == "index"))
        object.__setattr__(self, "upstream_members",
                           tuple(m for m in self.members if m.kind == "upstream"))


@dataclass(frozen=True, slots=True)
class ProjectAlias:
    index: str  # where uploads to the project go
    group: str  # what reads through the project see


@dataclass(frozen=True, slots=True)
class GitlabAliases:
    """GitLab ids (digits, or paths such as acme/platform, lowercased) -> our names."""

    projects: Mapping[str, ProjectAlias] = field(default_factory=dict, hash=False)
    groups: Mapping[str, str] = field(default_factory=dict, hash=False)

    def project(self, ident: str) -> ProjectAlias | None:
        # GitLab finds paths regardless of case.
        return self.projects.get(ident.lower())

    def group(self, ident: str) -> str | None:
        return self.groups.get(ident.lower())


@dataclass(frozen=True, slots=True)
class Registry:
    indexes: tuple[IndexSpec, ...]
    upstreams: tuple[UpstreamSpec, ...]
    groups: tuple[GroupSpec, ...]
    gitlab: GitlabAliases = field(default_factory=GitlabAliases)
    _index: dict[str, IndexSpec] = field(init=False, repr=False, compare=False)
    _upstream: dict[str, UpstreamSpec] = field(init=False, repr=False, compare=False)
    _group: dict[str, GroupSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lookups by name stay O(1) on every request; first of a name wins
        # (duplicates never pass assemble()).
        for attr, items in (("_index", self.indexes), ("_upstream", self.upstreams),
                            ("_group", self.groups)):
            by_name: dict[str, object] = {}
            for item in items:
                by_name.setdefault(item.name, item)
            object.__setattr__(self, attr, by_name)

    def index(self, name: str) -> IndexSpec | None:
        return self._index.get(name)

    def upstream(self, name: str) -> UpstreamSpec | None:
        return self._upstream.get(name)

    def group(self, name: str) -> GroupSpec | None:
        return self._group.get(name)

    @property
    def default_group(self) -> GroupSpec:
        """The group served at /simple/: the one named `default`, else the first."""
        return self._group.get(DEFAULT_GROUP) or self.groups[0]

    @property
    def first_index(self) -> IndexSpec:
        """Where `/` and `/legacy/` uploads go, as today."""
        return self.indexes[0]

    def groups_with(self, index: str) -> tuple[GroupSpec, ...]:
        return tuple(g for g in self.groups if index in g.index_names)


# --- assembly: defaults for what the config leaves out, and every cross-reference -----

@dataclass(frozen=True, slots=True)
class Legacy:
    """What today's keys give every registry: the upstream built from upstream.*,
    guard.private_only (reserved in every group) and upstream.forward."""

    upstream: UpstreamSpec
    reserved: tuple[str, ...] = ()
    forward: bool = True


@dataclass(frozen=True, slots=True)
class RawAlias:
    """A gitlab.projects entry as read: group None means "the first group with the index"."""

    ident: str
    index: str
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Layout:
    """The registry keys as the config file gives them; None: the key is absent."""

    indexes: tuple[IndexSpec, ...] | None = None
    upstreams: tuple[UpstreamSpec, ...] | None = None
    # Each group's own reserved patterns; guard.private_only is added by assemble().
    groups: tuple[GroupSpec, ...] | None = None
    projects: tuple[RawAlias, ...] = ()
    gitlab_groups: tuple[tuple[str, str], ...] = ()


def assemble(legacy: Legacy, layout: Layout, problems: list[str]) -> Registry:
    """The registry, with today's shape for whatever is None; every broken
    reference appended to problems as "key.path: what is wrong".

    Entries named "" were already reported by the reader and are not checked again.
    """
    indexes, upstreams, groups = layout.indexes, layout.upstreams, layout.groups
    if indexes is None:
        indexes = (IndexSpec(LEGACY_INDEX),)
    elif not indexes:
        problems.append("indexes: list at least one index (uploads go to the first)")
    if upstreams is None:
        upstreams = (legacy.upstream,)
        _check_unique("indexes", [i.name for i in indexes], {
            legacy.upstream.name: "the upstream built from upstream.* (list upstreams: to "
                                  "name it otherwise)"}, problems)
    else:
        _check_unique("indexes", [i.name for i in indexes], {}, problems)
        _check_unique("upstreams", [u.name for u in upstreams],
                      {i.name: f"indexes[{k}]" for k, i in enumerate(indexes)}, problems)
    index_names = {i.name for i in indexes}
    _check_owns(indexes, problems)
    if groups is None:
        # Every index, then every upstream: private first, as today.
        groups = (GroupSpec(
            DEFAULT_GROUP,
            tuple(Member("index", i.name) for i in indexes)
            + tuple(Member("upstream", u.name) for u in upstreams),
            legacy.reserved, legacy.forward,
        ),)
    else:
        if not groups:
            problems.append("groups: list at least one group (the first is served at /simple/ "
                            "unless one is named default)")
        _check_unique("groups", [g.name for g in groups], {}, problems)
        for i, group in enumerate(groups):
            if group.name:
                _check_members(f"groups[{i}].members", group, index_names,
                               {u.name for u in upstreams}, problems)
        groups = tuple(GroupSpec(g.name, g.members, _union(legacy.reserved, g.reserved),
                                 g.forward) for g in groups)
    registry = Registry(indexes, upstreams, groups)
    gitlab = _gitlab(registry, layout.projects, layout.gitlab_groups, problems)
    return Registry(indexes, upstreams, groups, gitlab)


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + second))


def _check_unique(
    path: str, names: list[str], taken: Mapping[str, str], problems: list[str],
) -> None:
    seen = dict(taken)
    for i, name in enumerate(names):
        if not name:
            continue
        if name in seen:
            problems.append(f"{path}[{i}].name: {name!r} is already the name of {seen[name]}")
        seen.setdefault(name, f"{path}[{i}]")


def _check_owns(indexes: tuple[IndexSpec, ...], problems: list[str]) -> None:
    """Two indexes overlap when one normalized name matches a pattern of each:
    then neither alone could own it. Exact (see witness), so `acme-*` and
    `*-tools` overlap on `acme-tools`, while `acme-*` and `acme` do not."""
    for j, later in enumerate(indexes):
        for b, pattern in enumerate(later.owns):
            for i, earlier in enumerate(indexes[:j]):
                for a, other in enumerate(earlier.owns):
                    both = witness(pattern, other)
                    if both is not None:
                        problems.append(
                            f"indexes[{j}].owns[{b}]: {pattern!r} overlaps {other!r} of index "
                            f"{earlier.name!r} (indexes[{i}].owns[{a}]): both match {both!r}"
                        )


def _check_members(
    path: str, group: GroupSpec, indexes: set[str], upstreams: set[str], problems: list[str],
) -> None:
    if not group.members:
        problems.append(f"{path}: a group needs at least one member")
    seen: set[tuple[str, str]] = set()
    upstream_seen = False
    for k, member in enumerate(group.members):
        where = f"{path}[{k}].{member.kind}"
        if not member.name:
            continue
        known = indexes if member.kind == "index" else upstreams
        if member.name not in known:
            problems.append(f"{where}: no {member.kind} is named {member.name!r}")
        if (member.kind, member.name) in seen:
            problems.append(f"{where}: {member.name!r} is listed twice")
        seen.add((member.kind, member.name))
        if member.kind == "upstream":
            upstream_seen = True
        elif upstream_seen:
            # A private name must never be answered by an upstream first.
            problems.append(f"{where}: index {member.name!r} comes after an upstream; list "
                            "every index before the upstreams (private first)")


_GITLAB_ID = re.compile(r"[0-9]+|[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def gitlab_id_problem(ident: str, project: bool) -> str | None:
    """Why ident is not a GitLab project (or group) id or full path; None if it is one."""
    if _GITLAB_ID.fullmatch(ident) and (not project or ident.isdigit() or "/" in ident):
        return None
    shape = "acme/platform" if project else "acme or acme/sub"
    return f"expected a numeric id or a full path such as {shape}, got {ident!r}"


def _gitlab(
    registry: Registry, projects: tuple[RawAlias, ...],
    groups: tuple[tuple[str, str], ...], problems: list[str],
) -> GitlabAliases:
    aliases: dict[str, ProjectAlias] = {}
    for raw in projects:
        where = f"gitlab.projects.{raw.ident}"
        bad_id = gitlab_id_problem(raw.ident, project=True)
        if bad_id:
            problems.append(f"{where}: {bad_id}")
        if bad_id or not raw.index:
            continue
        if registry.index(raw.index) is None:
            problems.append(f"{where}: no index is named {raw.index!r}")
            continue
        group = _alias_group(where, raw, registry, problems)
        if group is not None:
            _put(aliases, raw.ident, ProjectAlias(raw.index, group), where, problems)
    group_aliases: dict[str, str] = {}
    for ident, group_name in groups:
        where = f"gitlab.groups.{ident}"
        bad_id = gitlab_id_problem(ident, project=False)
        if bad_id:
            problems.append(f"{where}: {bad_id}")
        elif group_name and registry.group(group_name) is None:
            problems.append(f"{where}: no group is named {group_name!r}")
        elif group_name:
            _put(group_aliases, ident, group_name, where, problems)
    return GitlabAliases(aliases, group_aliases)


def _alias_group(
    where: str, raw: RawAlias, registry: Registry, problems: list[str],
) -> str | None:
    if raw.group is None:
        containing = registry.groups_with(raw.index)
        if not containing:
            problems.append(f"{where}: index {raw.index!r} is in no group; give "
                            "{index: ..., group: ...}")
            return None
        return containing[0].name
    group = registry.group(raw.group)
    if group is None:
        problems.append(f"{where}.group: no group is named {raw.group!r}")
        return None
    if raw.index not in group.index_names:
        # Reads through the project would never see what is uploaded to it.
        problems.append(f"{where}.group: group {raw.group!r} does not list index {raw.index!r}")
        return None
    return group.name


def _put(into: dict[str, V], ident: str, value: V, where: str, problems: list[str]) -> None:
    key = ident.lower()
    if key in into:
        problems.append(f"{where}: {ident!r} is given twice (GitLab paths ignore case)")
    else:
        into[key] = value
