"""Which names the upstream lists, learned without ever naming one to it.

Collision detection asks "does upstream have this name?" of private and
reserved names, and asking for /simple/<name>/ would hand upstream the very
names the guard keeps in. So the answer comes from the upstream's project list
(its PEP 503/691 root, /simple/), fetched in the background with
If-None-Match, scanned as it streams and never held whole. The list is kept as
a sorted array of 64-bit blake2b digests of normalized names: 8 bytes a name
(PyPI's ~650k names: ~5 MB), plus ~45 bytes a name while a new list is sorted.
It is saved under data_dir, so a restart or a sibling worker need not fetch it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import functools
import hashlib
import html
import itertools
import logging
import os
import re
import sys
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
from packaging.utils import InvalidName, canonicalize_name

from .config import Config
from .fsutil import commit, temp_path
from .metrics import Metrics
from .registry import UpstreamSpec
from .simple_api import UPSTREAM_ACCEPT

log = logging.getLogger("indexguard.guard")

ListFormat = Literal["json", "html"]
# A hostile list cannot make the array grow past this (32 MB); PyPI has ~650k.
MAX_NAMES = 4_000_000
# After a failed fetch (no list at the root, an error, too big), ask again after this.
RETRY_AFTER_FAILURE = 300.0
# A 30 MB list on a slow link takes a while; the read gap is upstream.timeout.
FETCH_BUDGET = 600.0
_FEED_BYTES = 1 << 20  # bytes per hop to the scanning thread
_CARRY = 64 * 1024  # the longest token (an <a> tag, a JSON name) awaited across chunks
_HEADER_MAX = 4096
_JSON_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_JSON_PROJECTS = re.compile(rb'"projects"\s*:\s*\[')
_HTML_ANCHOR = re.compile(rb"<a\b[^>]*>([^<]*)</a\s*>", re.IGNORECASE)
_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e]{0,200}"')


class NamesUnavailable(Exception):
    """The upstream gave no usable project list; the message says why (one line)."""


def names_source(config: Config) -> UpstreamSpec | None:
    """The upstream whose project list tells collisions: the default group's
    first upstream member that every name may reach (no `names` filter), the
    public index that routed upstreams stand in front of; else the first
    upstream; None with no upstream. A config without `upstreams` has one, built
    from upstream.*. Never upstream.url once `upstreams` is given: it is no
    upstream then, and its default is the public PyPI."""
    registry = config.registry
    for member in registry.default_group.upstream_members:
        spec = registry.upstream(member.name)
        if member.names is None and spec is not None:
            return spec
    return registry.upstreams[0] if registry.upstreams else None


def _source_key(source: UpstreamSpec | None) -> str:
    return url_key(source.url) if source is not None else ""


def name_key(name: str) -> int:
    """The 64-bit digest a normalized name is kept as."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=8)  # asked on every blocked request, of one or two URLs
def url_key(url: str) -> str:
    """Which upstream a list belongs to, without keeping its URL (it may hold credentials)."""
    return hashlib.blake2b(url.encode(), digest_size=16).hexdigest()


class NameScanner:
    """Project names from an upstream root page fed in chunks. Pure; not thread-safe."""

    def __init__(self, fmt: ListFormat) -> None:
        self.format: ListFormat = fmt
        self._pattern = _JSON_NAME if fmt == "json" else _HTML_ANCHOR
        self._carry = b""
        self._keys: array[int] = array("Q")
        # A JSON answer must show its "projects" key: an error document or some
        # other JSON would otherwise read as "upstream has no names at all".
        self._listed = fmt == "html"

    def feed(self, chunk: bytes) -> None:
        """Raises NamesUnavailable past MAX_NAMES."""
        data = self._carry + chunk
        end = 0
        for match in self._pattern.finditer(data):
            self._add(match.group(1))
            end = match.end()
        if not self._listed and _JSON_PROJECTS.search(data):
            self._listed = True
        # Both patterns end in a delimiter (a closing quote, </a>), so a match is
        # never a prefix of a longer one; what follows the last match may be.
        self._carry = data[max(end, len(data) - _CARRY):]
        if len(self._keys) > MAX_NAMES:
            raise NamesUnavailable(f"upstream project list has more than {MAX_NAMES} names")

    def _add(self, raw: bytes) -> None:
        if self.format == "json":
            try:
                text = orjson.loads(b'"' + raw + b'"')
            except orjson.JSONDecodeError:
                return
        else:
            text = html.unescape(raw.decode("utf-8", errors="replace")).strip()
        if not isinstance(text, str) or len(text) > 200:
            return
        try:
            name = canonicalize_name(text, validate=True)
        except InvalidName:
            return
        self._keys.append(name_key(name))

    def finish(self) -> array[int]:
        """The sorted, distinct digests. Raises NamesUnavailable when no list was seen."""
        if not self._listed:
            raise NamesUnavailable("upstream root is JSON but not a PEP 691 project list")
        return sorted_unique(self._keys)


def sorted_unique(keys: array[int]) -> array[int]:
    out: array[int] = array("Q")
    previous = -1
    for key in sorted(keys):
        if key != previous:
            out.append(key)
            previous = key
    return out


@dataclass(frozen=True, slots=True)
class NameList:
    keys: array[int]  # sorted, distinct
    upstream: str  # url_key() of the upstream it came from
    etag: str | None
    fetched_at: float  # when upstream last confirmed it (the file's mtime)
    format: ListFormat

    def has(self, name: str) -> bool:
        key = name_key(name)
        i = bisect.bisect_left(self.keys, key)
        return i < len(self.keys) and self.keys[i] == key


# --- the copy under data_dir (blocking: call these off the loop) ---------------------


def save_list(path: Path, tmp_dir: Path, names: NameList) -> float:
    """Write atomically; returns the file's mtime, which is the list's fetched_at."""
    header = orjson.dumps({
        "v": 1, "upstream": names.upstream, "etag": names.etag, "format": names.format,
        "count": len(names.keys), "byteorder": sys.byteorder,
    }) + b"\n"
    tmp = temp_path(tmp_dir, ".names")
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            names.keys.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_mtime


def load_list(path: Path, upstream: str) -> NameList | None:
    """The saved list of that upstream; None when missing, another upstream's, or damaged."""
    try:
        with open(path, "rb") as fh:
            mtime = os.fstat(fh.fileno()).st_mtime
            header: Any = orjson.loads(fh.readline(_HEADER_MAX))
            if not isinstance(header, dict) or header.get("v") != 1:
                return None
            count, etag, fmt = header.get("count"), header.get("etag"), header.get("format")
            if (
                header.get("upstream") != upstream or not isinstance(count, int)
                or not 0 <= count <= MAX_NAMES or fmt not in ("json", "html")
                or not (etag is None or isinstance(etag, str))
            ):
                return None
            keys: array[int] = array("Q")
            keys.fromfile(fh, count)
            if fh.read(1):
                return None
    except (OSError, EOFError, ValueError, orjson.JSONDecodeError):
        return None
    if header.get("byteorder") != sys.byteorder:
        keys.byteswap()
    if any(a >= b for a, b in itertools.pairwise(keys)):
        return None
    return NameList(keys, upstream, etag, mtime, fmt)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _touch(path: Path) -> float:
    """Mark the saved list confirmed now; its mtime is its fetched_at."""
    try:
        os.utime(path)
        return path.stat().st_mtime
    except OSError:  # never saved (disk full): the copy in memory holds
        return time.time()


def _safe_etag(value: str | None) -> str | None:
    """An ETag to send back later, or None for one that is not a plain quoted string."""
    return value if value is not None and _ETAG.fullmatch(value) else None


# --- the service ---------------------------------------------------------------------------



class UpstreamNames:
    """The upstream's project list: asked in the background, never on a request's path.

    lookup() answers from memory at once; wait_for_list() lets a caller that
    must know (an upload under upload_collision) wait, within upstream.timeout,
    for a fetch to finish. Fetching happens only while forwarding is on.
    """

    def __init__(self, path: Path, tmp_dir: Path, metrics: Metrics, user_agent: str) -> None:
        self._path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._tmp_dir = tmp_dir
        self._metrics = metrics
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._list: NameList | None = None
        self._task: asyncio.Task[None] | None = None
        self._tried: tuple[str, bool, float] | None = None  # upstream, forward, when
        self._problem: str | None = None  # why the last attempt found no list
        self._listeners: list[Callable[[], None]] = []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": self._user_agent}, trust_env=True,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def on_update(self, callback: Callable[[], None]) -> None:
        """Call back (on the loop) whenever a list arrives."""
        self._listeners.append(callback)

    def lookup(self, name: str, config: Config) -> bool | None:
        """Whether the list holds the normalized name; None without a list.

        Starts a refresh in the background when the list is missing or older
        than guard.names_ttl.
        """
        current = self._current(config)
        self._maybe_refresh(config, current)
        return None if current is None else current.has(name)

    def listed(self, name: str) -> bool:
        """Whether the list in hand (the one just installed, for on_update) holds the name."""
        return self._list is not None and self._list.has(name)

    async def wait_for_list(self, config: Config) -> None:
        """Wait, at most the upstream's timeout, for the refresh in flight (starting one if due)."""
        self._maybe_refresh(config, self._current(config))
        task = self._task
        source = names_source(config)
        if task is not None and not task.done() and source is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), source.timeout)

    def report(self, config: Config) -> dict[str, object]:
        """For /-/guard: whether collisions can be detected, and from what (asking
        starts a refresh when one is due, so the answer is not "not_fetched" twice)."""
        current = self._current(config)
        self._maybe_refresh(config, current)
        fetching = self._task is not None and not self._task.done()
        if current is not None:
            state = "ok"
        elif fetching:
            state = "fetching"
        elif self._problem is not None:
            state = "unavailable"
        else:
            state = "not_fetched"
        return {
            "state": state,
            "count": len(current.keys) if current is not None else 0,
            "fetched_at": current.fetched_at if current is not None else None,
            "format": current.format if current is not None else None,
            "last_error": self._problem,
        }

    def _current(self, config: Config) -> NameList | None:
        names = self._list
        if names is None or names.upstream != _source_key(names_source(config)):
            return None
        return names

    def _maybe_refresh(self, config: Config, current: NameList | None) -> None:
        if self._task is not None and not self._task.done():
            return
        now = time.time()
        if current is not None and now - current.fetched_at < config.guard.names_ttl:
            return
        source = names_source(config)
        if source is None:  # no upstream: no name can collide with one
            return
        upstream, forward = url_key(source.url), config.upstream.forward
        # With no list at all, uploads under upload_collision: reject wait on it:
        # ask again as soon as the upstream's outage backoff allows.
        retry = (source.backoff if current is None
                 else min(RETRY_AFTER_FAILURE, config.guard.names_ttl))
        if self._tried is not None and self._tried[:2] == (upstream, forward) and (
            now - self._tried[2] < retry
        ):
            return
        self._tried = (upstream, forward, now)
        self._task = asyncio.create_task(self._refresh(config))

    async def _refresh(self, config: Config) -> None:
        source = names_source(config)
        if source is None:
            return
        upstream = url_key(source.url)
        try:
            if await self._adopt_saved(config, upstream) or not config.upstream.forward:
                return
            # One fetch for all workers: the others wait, then read its copy.
            async with self._exclusive():
                if await self._adopt_saved(config, upstream):
                    return
                await self._fetch(config, source, upstream)
        except NamesUnavailable as exc:
            self._problem = str(exc)
            log.warning("no upstream project list; collisions cannot be detected",
                        extra={"reason": self._problem})
        except OSError as exc:
            self._problem = f"project list not readable or writable here: {exc.strerror}"
            log.warning("upstream project list", extra={"reason": self._problem})
        except Exception:
            # A bug: logged with its traceback, and never raised into an upload
            # waiting in wait_for_list().
            self._problem = "internal error reading the project list"
            log.exception("upstream project list")

    async def _adopt_saved(self, config: Config, upstream: str) -> bool:
        """Take a newer saved list (an earlier run's, a sibling worker's); True when
        the list in hand is now fresh."""
        current = self._current(config)
        mtime = await asyncio.to_thread(_mtime, self._path)
        if mtime is not None and (current is None or mtime > current.fetched_at):
            saved = await asyncio.to_thread(load_list, self._path, upstream)
            if saved is not None:
                self._install(saved)
                current = saved
        return current is not None and time.time() - current.fetched_at < config.guard.names_ttl

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        fd = await asyncio.to_thread(os.open, self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + FETCH_BUDGET + 60
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never blocks
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break  # the holder is stuck: fetch anyway
                    await asyncio.sleep(0.25)
            yield
        finally:
            os.close(fd)  # and with it the lock

    async def _fetch(self, config: Config, source: UpstreamSpec, upstream: str) -> None:
        """Raises NamesUnavailable."""
        if self._session is None:
            raise NamesUnavailable("the proxy is shutting down")
        current = self._current(config)
        headers = {"Accept": UPSTREAM_ACCEPT, "Accept-Encoding": "gzip"}
        if current is not None and current.etag:
            headers["If-None-Match"] = current.etag
        timeout = aiohttp.ClientTimeout(total=FETCH_BUDGET, connect=source.timeout,
                                        sock_read=source.timeout)
        limit = config.guard.names_max_bytes
        outcome = "error"
        try:
            # No redirects: the list comes from the upstream's url itself, nowhere else.
            credentials = source.credentials  # the upstream's own origin only
            async with self._session.get(
                source.url, headers=headers, timeout=timeout, allow_redirects=False,
                auth=aiohttp.BasicAuth(*credentials) if credentials else None,
            ) as resp:
                if resp.status == 304 and current is not None:
                    outcome = "not_modified"
                    fetched_at = await asyncio.to_thread(_touch, self._path)
                    self._install(replace(current, fetched_at=fetched_at))
                    return
                if resp.status != 200:
                    outcome = "not_found" if resp.status in (404, 410) else "error"
                    raise NamesUnavailable(f"upstream answered {resp.status} for its project list")
                if (resp.content_length or 0) > limit:
                    raise NamesUnavailable(
                        f"upstream project list is over guard.names_max_bytes ({limit})")
                ctype = resp.headers.get("Content-Type", "").lower()
                scanner = NameScanner("json" if "json" in ctype else "html")
                await _scan(resp, scanner, limit)
                keys = await asyncio.to_thread(scanner.finish)
                etag = _safe_etag(resp.headers.get("ETag"))
                outcome = "ok"
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise NamesUnavailable(f"upstream project list failed: {reason}") from None
        finally:
            self._metrics.upstream_requests.labels("names", outcome, source.name).inc()
        fresh = NameList(keys, upstream, etag, time.time(), scanner.format)
        try:
            fresh = replace(fresh, fetched_at=await asyncio.to_thread(
                save_list, self._path, self._tmp_dir, fresh))
        except OSError as exc:  # kept in memory all the same
            log.warning("upstream project list not saved", extra={"reason": exc.strerror})
        self._install(fresh)
        log.info("upstream project list", extra={"names": len(keys), "format": fresh.format})

    def _install(self, names: NameList) -> None:
        self._list = names
        self._problem = None
        for callback in self._listeners:
            callback()


async def _scan(resp: aiohttp.ClientResponse, scanner: NameScanner, limit: int) -> None:
    """Feed the body to the scanner off the loop, a MiB at a time, up to limit bytes."""
    pending = bytearray()
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise NamesUnavailable(
                f"upstream project list is over guard.names_max_bytes ({limit})")
        pending += chunk
        if len(pending) >= _FEED_BYTES:
            await asyncio.to_thread(scanner.feed, bytes(pending))
            pending.clear()
    await asyncio.to_thread(scanner.feed, bytes(pending))
