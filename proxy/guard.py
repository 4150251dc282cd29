"""The dependency-confusion rules as one pure function, plus the collision ledger.

decide() reads top to bottom like the README's rule list; it does no I/O. The
ledger remembers which blocked names also exist upstream (learned by a
background probe, never on the request's path).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import time
from dataclasses import dataclass
from typing import Literal

from packaging.utils import NormalizedName

from .config import Config
from .model import FileEntry

Rule = Literal["private", "reserved", "forward_off", "upstream"]


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule
    forward: bool


def matches_any(name: NormalizedName, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# Decisions are values: one instance each, not one per request.
_PRIVATE = Decision("private", forward=False)
_RESERVED = Decision("reserved", forward=False)
_FORWARD_OFF = Decision("forward_off", forward=False)
_UPSTREAM = Decision("upstream", forward=True)


def decide(name: NormalizedName, is_private: bool, config: Config) -> Decision:
    """Which source may answer for a normalized name."""
    # a. Private now, or ever: the private store alone answers.
    if is_private:
        return _PRIVATE
    # b. Reserved by pattern: never forwarded, even before anything is published.
    if config.guard.private_only and matches_any(name, config.guard.private_only):
        return _RESERVED
    # c. The admin toggle.
    if not config.upstream.forward:
        return _FORWARD_OFF
    # d. Upstream fallback.
    return _UPSTREAM


def parse_upload_time(text: str) -> float | None:
    """PEP 700 upload-time (ISO 8601, UTC) -> epoch seconds; None if unreadable."""
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def too_young(entry: FileEntry, name: NormalizedName, config: Config, now: float) -> bool:
    """guard.min_age: hide upstream files uploaded less than min_age ago.

    Files without an upload-time are kept: hiding them would hide all of an
    upstream that does not report it (PEP 503 HTML pages never do).
    """
    min_age = config.guard.min_age
    if min_age is None or entry.upload_time is None:
        return False
    if matches_any(name, config.guard.min_age_exempt):
        return False
    uploaded = parse_upload_time(entry.upload_time)
    return uploaded is not None and now - uploaded < min_age


def matures_at(entry: FileEntry, config: Config) -> float | None:
    if config.guard.min_age is None or entry.upload_time is None:
        return None
    uploaded = parse_upload_time(entry.upload_time)
    return None if uploaded is None else uploaded + config.guard.min_age


@dataclass(slots=True)
class Collision:
    name: str
    rule: str
    count: int
    first_seen: float
    last_seen: float


class CollisionLedger:
    """Blocked names that exist upstream, and what the probe learned about names."""

    def __init__(self, max_names: int = 100_000) -> None:
        self._exists: dict[str, tuple[bool, float]] = {}
        self._collisions: dict[tuple[str, str], Collision] = {}
        self._max = max_names

    def upstream_has(self, name: str, ttl: float) -> bool | None:
        """True/False when probed within ttl, None when unknown (probe needed)."""
        known = self._exists.get(name)
        if known is None or time.time() - known[1] > ttl:
            return None
        return known[0]

    def remember(self, name: str, exists: bool) -> None:
        if len(self._exists) >= self._max:
            self._exists.pop(next(iter(self._exists)))
        self._exists[name] = (exists, time.time())

    def record(self, name: str, rule: str) -> None:
        now = time.time()
        key = (name, rule)
        seen = self._collisions.get(key)
        if seen is None:
            if len(self._collisions) >= self._max:
                return
            self._collisions[key] = Collision(name, rule, 1, now, now)
        else:
            seen.count += 1
            seen.last_seen = now

    def collisions(self) -> list[Collision]:
        return sorted(self._collisions.values(), key=lambda c: (-c.count, c.name))
