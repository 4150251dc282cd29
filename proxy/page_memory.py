"""Upstream pages and rendered pages kept in memory, bounded in names and in bytes.

One budget for both, least recently used name out first: a rendering keeps its
page alive, so both are counted where they are held.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

from .answers import Rendered
from .model import FileEntry
from .pagecache import CachedPage

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


Kept = tuple[tuple[object, ...], float, Rendered]


class _Held:
    """What memory holds for one name: its upstream entry and its renderings."""

    __slots__ = ("cost", "entry", "renders")

    def __init__(self) -> None:
        self.entry: CachedPage | None = None
        self.renders: dict[str, Kept] = {}
        self.cost = 0


def _rendered_bytes(rendered: Rendered) -> int:
    return 300 + len(rendered.body) + len(rendered.gzipped or b"")


class PageMemory:
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

    def rendered(self, name: str, ctype: str) -> Kept | None:
        held = self._names.get(name)
        kept = held.renders.get(ctype) if held is not None else None
        if kept is not None:
            self._names.move_to_end(name)
        return kept

    def keep_rendered(self, name: str, ctype: str, kept: Kept) -> None:
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
