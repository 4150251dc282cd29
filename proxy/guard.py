"""The guard's policy beside the resolution rules (resolve.py): the min_age cooldown,
and the collision ledger.

The ledger remembers which blocked names also exist upstream (learned from the
upstream's project list, never by naming them upstream, never on a request's path).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import time
from dataclasses import dataclass
from types import EllipsisType

from packaging.utils import NormalizedName

from .config import Config
from .metrics import Metrics
from .model import FileEntry
from .upstream_names import UpstreamNames, names_source

guard_log = logging.getLogger("indexguard.guard")

def matches_any(name: NormalizedName, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def parse_upload_time(text: str) -> float | None:
    """PEP 700 upload-time (ISO 8601, UTC) -> epoch seconds; None if unreadable."""
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def too_young(
    entry: FileEntry, name: NormalizedName, config: Config, now: float,
    min_age: float | EllipsisType | None = ...,
) -> bool:
    """guard.min_age: hide upstream files uploaded less than min_age ago.

    min_age: the upstream's own (upstreams[].min_age, which defaults to
    guard.min_age); left out, guard.min_age. Files without an upload-time are
    kept: hiding them would hide all of an upstream that does not report it
    (PEP 503 HTML pages never do).
    """
    if isinstance(min_age, EllipsisType):
        min_age = config.guard.min_age
    if min_age is None or entry.upload_time is None:
        return False
    if matches_any(name, config.guard.min_age_exempt):
        return False
    uploaded = parse_upload_time(entry.upload_time)
    return uploaded is not None and now - uploaded < min_age


def matures_at(entry: FileEntry, min_age: float | None) -> float | None:
    if min_age is None or entry.upload_time is None:
        return None
    uploaded = parse_upload_time(entry.upload_time)
    return None if uploaded is None else uploaded + min_age


@dataclass(slots=True)
class Collision:
    name: str
    rule: str
    count: int
    first_seen: float
    last_seen: float


class CollisionLedger:
    """Blocked names that exist upstream, and what is known of names upstream.

    Knowledge comes from the upstream's project list (UpstreamNames) and from
    pages fetched for forwarded names, never from asking upstream about a
    private or reserved name. Requests seen before the list arrives are
    counted when it does.
    """

    def __init__(self, names: UpstreamNames, metrics: Metrics, max_names: int = 100_000) -> None:
        self.names = names
        self._metrics = metrics
        self._exists: dict[str, tuple[bool, float]] = {}
        self._collisions: dict[tuple[str, str], Collision] = {}
        self._pending: dict[tuple[str, str], int] = {}
        self._max = max_names
        names.on_update(self._settle_pending)

    def known(self, name: str, config: Config) -> bool | None:
        """Whether upstream has the name, from what is in memory; None when unknown."""
        seen = self._exists.get(name)
        if seen is not None and time.time() - seen[1] <= config.upstream.index_ttl:
            return seen[0]
        return self.names.lookup(name, config)

    async def upstream_has(self, name: str, config: Config) -> bool | None:
        """known(), waiting (within upstream.timeout) for the upstream's list if
        there is none yet; None when upstream cannot say now."""
        found = self.known(name, config)
        if found is None:
            await self.names.wait_for_list(config)
            found = self.known(name, config)
        return found

    def remember(self, name: str, exists: bool, upstream: str, config: Config) -> None:
        """What a page fetch of a forwarded name from this upstream found. A page
        anywhere means the name exists upstream; "not upstream" is taken only from
        the upstream whose project list the guard reads (names_source): a routed
        index's 403 says nothing of PyPI, and would let an upload of a PyPI name
        through under upload_collision: reject."""
        if not exists:
            source = names_source(config)
            if source is None or source.name != upstream:
                return
        if len(self._exists) >= self._max:
            self._exists.pop(next(iter(self._exists)))
        self._exists[name] = (exists, time.time())

    def observe(self, name: str, rule: str, config: Config) -> None:
        """A request for a blocked name; counted as a collision if upstream has it.
        On the request's path: no I/O, no waiting."""
        found = self.known(name, config)
        if found:
            self._record(name, rule)
        elif found is None:
            key = (name, rule)
            if key in self._pending or len(self._pending) < self._max:
                self._pending[key] = self._pending.get(key, 0) + 1

    def _settle_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for (name, rule), count in pending.items():
            if self.names.listed(name):
                self._record(name, rule, count)

    def _record(self, name: str, rule: str, count: int = 1) -> None:
        now = time.time()
        key = (name, rule)
        seen = self._collisions.get(key)
        if seen is None:
            if len(self._collisions) >= self._max:
                return
            self._collisions[key] = Collision(name, rule, count, now, now)
        else:
            seen.count += count
            seen.last_seen = now
        self._metrics.blocked_collisions.labels(rule, name).inc(count)
        guard_log.warning("blocked name collision", extra={"project": name, "rule": rule})

    def collisions(self) -> list[Collision]:
        return sorted(self._collisions.values(), key=lambda c: (-c.count, c.name))
