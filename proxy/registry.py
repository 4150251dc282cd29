"""The registry model: private indexes, upstreams, the groups clients read, GitLab aliases.

Frozen values and the checks that tie them together (names, references, "private
first", overlapping `owns`). Pure: config.py reads the YAML; nothing here does I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

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
    not_found: frozenset[int] = frozenset({404})
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

    @property
    def index_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members if m.kind == "index")

    @property
    def upstream_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "upstream")


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


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern the normalized name matches (fnmatch, case-sensitive)."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


# --- patterns as automata: which normalized names can a pattern match? -------------

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-"
_ANY = frozenset(_ALPHABET)
# One step of a glob: a set of characters, or None for '*'.
_Step = frozenset[str] | None
# Where the walk is: a position in each pattern, and the name automaton's state.
_State = tuple[tuple[int, ...], int]


def _steps(pattern: str) -> tuple[_Step, ...]:
    """A glob as fnmatch reads it: '*', '?', [classes] (their members asked of
    fnmatch itself, so ranges and '!' mean what they mean there), literals."""
    steps: list[_Step] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        end = _class_end(pattern, i) if char == "[" else -1
        if char == "*":
            steps.append(None)
        elif char == "?":
            steps.append(_ANY)
        elif end > 0:
            cls = pattern[i:end + 1]
            steps.append(frozenset(c for c in _ALPHABET if fnmatch.fnmatchcase(c, cls)))
            i = end
        else:  # a literal; an unclosed '[' is one too, as in fnmatch
            steps.append(frozenset(char) & _ANY)
        i += 1
    return tuple(steps)


def _class_end(pattern: str, start: int) -> int:
    """Index of the ']' closing the class opened at start, as fnmatch reads it; -1 if none."""
    j = start + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


def _name_state(state: int, char: str) -> int:
    """PEP 503 normalized names as an automaton: 0 start, 1 after a letter or
    digit (accepting), 2 after '-'; -1: no name continues this way."""
    if char != "-":
        return 1
    return 2 if state == 1 else -1


def witness(*patterns: str) -> str | None:
    """A normalized project name that every pattern matches, or None if there is none.

    Exact, not a heuristic: a breadth-first walk over the product of the
    patterns (as automata) and the shape of a normalized name (letters, digits,
    single '-' between them). Polynomial in the patterns' lengths.
    """
    programs = [_steps(p) for p in patterns]
    ends = tuple(len(p) for p in programs)
    start: _State = (tuple(0 for _ in programs), 0)
    came_from: dict[_State, tuple[_State, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        positions, shape = state
        if shape == 1 and positions == ends:
            return _spell(state, came_from)
        successors: list[tuple[_State, str]] = []
        for k, pos in enumerate(positions):  # a '*' may match nothing
            if pos < ends[k] and programs[k][pos] is None:
                successors.append((((*positions[:k], pos + 1, *positions[k + 1:]), shape), ""))
        for char in _ALPHABET:
            moved = _consume(programs, positions, char)
            next_shape = _name_state(shape, char)
            if moved is not None and next_shape >= 0:
                successors.append(((moved, next_shape), char))
        for successor, char in successors:
            if successor not in came_from:
                came_from[successor] = (state, char)
                queue.append(successor)
    return None


def _consume(
    programs: list[tuple[_Step, ...]], positions: tuple[int, ...], char: str,
) -> tuple[int, ...] | None:
    moved = []
    for program, pos in zip(programs, positions, strict=True):
        if pos == len(program):
            return None
        step = program[pos]
        if step is None:
            moved.append(pos)  # '*' takes the character and stays
        elif char in step:
            moved.append(pos + 1)
        else:
            return None
    return tuple(moved)


def _spell(state: _State, came_from: Mapping[_State, tuple[_State, str] | None]) -> str:
    chars = []
    link = came_from[state]
    while link is not None:
        state, char = link
        chars.append(char)
        link = came_from[state]
    return "".join(reversed(chars))


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
