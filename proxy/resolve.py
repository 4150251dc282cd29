"""Which member of a group answers for a name: the resolution rules as one pure function.

resolve() reads top to bottom like the README's resolution list. Beside it, the
step of the upstream walk per answer, and the checks of token patterns and
`owns`. No I/O: the caller says which indexes hold the name and does the fetching.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from .errors import quoted
from .patterns import first_match
from .registry import GroupSpec, IndexSpec, Registry, UpstreamSpec


@dataclass(frozen=True, slots=True)
class Private:
    """Rule 1: this index has, or ever had, the name; its page alone answers."""

    index: IndexSpec
    rule: ClassVar[str] = "private"


@dataclass(frozen=True, slots=True)
class Reserved:
    """Rule 2: a reserved name is never forwarded; 404 with the reason."""

    name: str
    group: str
    pattern: str
    rule: ClassVar[str] = "reserved"

    @property
    def reason(self) -> str:
        return (f"{self.name} is reserved for private packages ({quoted(self.pattern)} "
                f"in group {self.group})")


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Rule 3: ask these upstreams in order, each step decided by next_step()."""

    candidates: tuple[UpstreamSpec, ...]
    rule: ClassVar[str] = "upstream"


@dataclass(frozen=True, slots=True)
class ForwardOff:
    """Rule 3, with forwarding off (in the group or everywhere): 404 with the reason."""

    name: str
    group: str
    everywhere: bool  # upstream.forward is false, not just the group's toggle
    rule: ClassVar[str] = "forward_off"

    @property
    def reason(self) -> str:
        where = "" if self.everywhere else f" for group {self.group}"
        return f"No private project named {self.name}; forwarding upstream is off{where}"


@dataclass(frozen=True, slots=True)
class Missing:
    """Rule 4: no index holds the name and no upstream may be asked: 404."""

    name: str
    group: str
    rule: ClassVar[str] = "not_found"

    @property
    def reason(self) -> str:
        return f"No project named {self.name} in group {self.group}"


Resolution = Private | Reserved | Upstreams | ForwardOff | Missing


def resolve(
    name: str, group: GroupSpec, registry: Registry, held: Callable[[str], bool], forward: bool,
) -> Resolution:
    """Which member of the group answers for a normalized name.

    held(index) says whether that index has, or ever had, the name; forward is
    upstream.forward. Nobody's token enters here: hiding an index or a group
    from a token can never make a name fall through to an upstream.
    """
    # 1. The first member index that has, or ever had, the name answers alone.
    for index in group.index_names:
        spec = registry.index(index)
        if spec is not None and held(index):
            return Private(spec)
    # 2. A reserved name: 404, never forwarded, even before anything is published.
    pattern = first_match(name, group.reserved)
    if pattern is not None:
        return Reserved(name, group.name, pattern)
    # 3. The upstream members in order, skipping those whose names filter
    #    rejects the name, and only while forwarding is on.
    candidates = tuple(
        upstream for member in group.upstream_members
        if member.admits(name) and (upstream := registry.upstream(member.name)) is not None
    )
    if candidates and not (forward and group.forward):
        return ForwardOff(name, group.name, everywhere=not forward)
    if candidates:
        return Upstreams(candidates)
    # 4. Nothing may answer: 404.
    return Missing(name, group.name)


Step = Literal["answer", "next", "fail"]


def next_step(status: int | None, upstream: UpstreamSpec) -> Step:
    """What one upstream's answer means for the walk over Upstreams.candidates.

    status is the final HTTP status, or None when there was no usable answer
    (timeout, refused, cut, a page that does not parse). "next": the upstream
    does not host the name (its not_found list: 404, or 403 for the PyTorch
    index), ask the next one. "answer": this page answers alone. "fail": stop
    the walk; serve this upstream's stale page if there is one, else 502. Never
    the next upstream: an outage of the PyTorch index must not resolve torch
    from PyPI. A remembered not_found (negative_ttl) counts as "next", an
    upstream in backoff as None.
    """
    if status is None:
        return "fail"
    if status in upstream.not_found:
        return "next"
    if 200 <= status < 300 or status == 304:
        return "answer"
    # 401, 429, 5xx, a 4xx it does not list as "no such project": like uv, stop.
    return "fail"


def names_held_twice(
    group: GroupSpec, held_by: Mapping[str, Collection[str]],
) -> dict[str, tuple[str, ...]]:
    """For /-/guard: names that two or more of the group's indexes hold, each
    with those indexes in member order (the first answers; the others are hidden).

    held_by maps an index name to the names it has, or ever had.
    """
    holders: dict[str, list[str]] = {}
    for index in group.index_names:
        for name in held_by.get(index, ()):
            holders.setdefault(name, []).append(index)
    return {name: tuple(indexes) for name, indexes in sorted(holders.items())
            if len(indexes) > 1}


def owner_of(name: str, registry: Registry) -> IndexSpec | None:
    """The index whose `owns` matches the name (at most one: check-config
    refuses overlaps); None when no index owns it, so any may publish it."""
    for index in registry.indexes:
        if first_match(name, index.owns) is not None:
            return index
    return None


class Grant(Protocol):
    """What a token grants: config.Token has these, and so may auth's identity."""

    @property
    def name(self) -> str: ...
    @property
    def scopes(self) -> frozenset[str]: ...
    @property
    def indexes(self) -> tuple[str, ...]: ...
    @property
    def groups(self) -> tuple[str, ...]: ...


def _covers(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def may_write(grant: Grant, index: str) -> bool:
    """Upload to the index: the write scope, and the index in the token's indexes."""
    return "write" in grant.scopes and _covers(grant.indexes, index)


def may_admin(grant: Grant, index: str) -> bool:
    """Yank, delete, release in the index: the admin scope, and the index in its indexes."""
    return "admin" in grant.scopes and _covers(grant.indexes, index)


def may_read_index(grant: Grant, index: str) -> bool:
    """Read the index alone at /i/<index>/: the read scope, and the index in its indexes."""
    return "read" in grant.scopes and _covers(grant.indexes, index)


def may_read_group(grant: Grant, group: str) -> bool:
    """Read the group (/simple/, /g/<group>/, GitLab aliases): read, and the group in its groups."""
    return "read" in grant.scopes and _covers(grant.groups, group)


def upload_refusal(grant: Grant, index: str, name: str, registry: Registry) -> str | None:
    """Why this token may not upload this normalized name to this index (403), or None."""
    if not may_write(grant, index):
        return f"Token {grant.name} may not upload to index {index}"
    owner = owner_of(name, registry)
    if owner is not None and owner.name != index:
        return f"{name} belongs to index {owner.name} (its owns); upload it there"
    return None
