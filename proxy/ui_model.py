"""What the web UI shows, as plain data: versions and files of a page, why a name
resolves where it does (from resolve.py's answer, in words), search, setup snippets.

Pure: no I/O, no HTML. web_ui.py gathers what the stores and mirrors already know
and renders these values through autoescaping templates.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

from .dists import guess_version
from .model import FileEntry, ProjectPage
from .patterns import first_match
from .registry import GroupSpec
from .resolve import ForwardOff, Missing, Private, Reserved, Resolution, Upstreams

# What the proxy knows of one upstream for a name, without asking it: its page,
# that it said "no such project", or nothing yet.
Known = Literal["page", "absent", "unknown"]
# Search answers at most this many names; a query at most this many characters.
MAX_RESULTS = 100
MAX_QUERY = 100


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file of the UI (CSS, script, icon), read once at start."""

    body: bytes
    content_type: str
    etag: str  # quoted: '"<16 hex digits of its sha256>"'


@dataclass(frozen=True, slots=True)
class FileView:
    filename: str
    size: int | None
    upload_time: str | None  # "2026-12-01 23:40 UTC", or None
    requires_python: str | None
    sha256: str | None
    yanked: bool
    yank_reason: str | None
    cached: bool | None  # upstream files: in the proxy's cache; None for private files


@dataclass(frozen=True, slots=True)
class VersionView:
    version: str
    files: tuple[FileView, ...]
    yanked: bool  # every file of the release is yanked (PEP 592 yanks releases)
    yank_reason: str | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where a name resolves, in words; `answering` names the member that answers."""

    kind: Literal["private", "upstream", "reserved", "forward_off", "missing", "unknown"]
    sentence: str
    answering: str | None = None  # "index:<name>" or "upstream:<name>"
    notes: tuple[str, ...] = ()


def wants_html(accept: str | None) -> bool:
    """A browser's Accept names text/html (or XHTML) with a q above 0. curl's
    "*/*", pip's and uv's types, or no header at all keep today's text answer."""
    if not accept:
        return False
    for part in accept.split(",")[:32]:
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in ("text/html", "application/xhtml+xml"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


def version_key(version: str) -> tuple[int, Version | str]:
    """Newest first when sorted in reverse; versions that do not parse sort last."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, version)


def upload_time_text(stamp: str | None) -> str | None:
    """PEP 700 upload-time as people read it, to the minute, in UTC."""
    if not stamp:
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def size_text(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover (the loop returns)


def file_view(entry: FileEntry, cached: bool | None = None) -> FileView:
    reason = entry.yanked if isinstance(entry.yanked, str) else None
    return FileView(entry.filename, entry.size, upload_time_text(entry.upload_time),
                    entry.requires_python, entry.sha256, bool(entry.yanked), reason, cached)


def versions_of(
    page: ProjectPage, cached: Mapping[str, bool] | None = None,
) -> tuple[VersionView, ...]:
    """The page's files grouped by release, newest release first. cached maps a
    sha256 to whether the proxy holds that file (upstream pages only)."""
    by_version: dict[str, list[FileView]] = {}
    for entry in page.files:
        version = guess_version(entry.filename, page.name) or "unknown"
        is_cached = None if cached is None else cached.get(entry.sha256 or "", False)
        by_version.setdefault(version, []).append(file_view(entry, is_cached))
    views = []
    for version in sorted(by_version, key=version_key, reverse=True):
        files = tuple(sorted(by_version[version], key=lambda f: f.filename))
        yanked = all(f.yanked for f in files)
        reason = next((f.yank_reason for f in files if f.yank_reason), None) if yanked else None
        views.append(VersionView(version, files, yanked, reason))
    return tuple(views)


def newest_upload(page: ProjectPage) -> str:
    """The latest upload-time of the page's files ("" when none says): ISO 8601
    stamps of one format sort as text."""
    return max((f.upload_time or "" for f in page.files), default="")


def explain(
    name: str, resolution: Resolution, group: GroupSpec, known: Mapping[str, Known],
    also_held: Sequence[str] = (), exists_upstream: bool | None = None,
) -> Explanation:
    """Why the name resolves where it does in the group, from resolve()'s answer
    and what the proxy already knows of each candidate upstream (known: upstream
    name -> Known). The walk is resolve.next_step's: the first upstream that has a
    page answers; one that said "not found" is passed; one the proxy knows
    nothing of is where the walk would ask next."""
    collision = ("blocked collision: the same name exists upstream"
                 if exists_upstream else None)
    if isinstance(resolution, Private):
        notes = [f"also in index {index}, whose files are hidden: only the first "
                 f"index in the group answers" for index in also_held]
        if collision:
            notes.append(f"{collision}; it is never forwarded")
        return Explanation("private", f"private in index {resolution.index.name}",
                           f"index:{resolution.index.name}", tuple(notes))
    if isinstance(resolution, Reserved):
        return Explanation(
            "reserved", f"reserved by {resolution.pattern} in group {resolution.group}: "
            "never forwarded", None, (collision,) if collision else ())
    if isinstance(resolution, ForwardOff):
        return Explanation("forward_off", resolution.reason)
    if isinstance(resolution, Missing):
        return Explanation("missing", resolution.reason)
    assert isinstance(resolution, Upstreams)
    passed: list[str] = []
    for spec in resolution.candidates:
        route = _route(name, group, spec.name)
        state = known.get(spec.name, "unknown")
        if state == "absent":
            passed.append(spec.name)
            continue
        skipped = (f"; {', '.join(passed)} said it has no such project" if passed else "")
        if state == "page":
            return Explanation("upstream", f"from upstream {spec.name}{route}{skipped}",
                               f"upstream:{spec.name}")
        return Explanation(
            "unknown", f"would be asked of upstream {spec.name}{route}{skipped}; "
            "the proxy has not fetched it yet (an install fetches it)",
            f"upstream:{spec.name}")
    return Explanation("missing", f"no upstream of group {group.name} has {name} "
                       f"({', '.join(passed)} said so)")


def _route(name: str, group: GroupSpec, upstream: str) -> str:
    for member in group.upstream_members:
        if member.name == upstream and member.names is not None:
            pattern = first_match(name, member.names)
            if pattern is not None:
                return f" (routed by {pattern})"
    return ""


def search(query: str, names: Iterable[str], limit: int = MAX_RESULTS) -> list[str]:
    """Names containing the query, normalized like names (Foo_Bar finds foo-bar):
    those starting with it first, then the rest, each alphabetically."""
    needle = normalize_query(query)
    if not needle:
        return []
    prefix: list[str] = []
    inside: list[str] = []
    for name in names:
        if name.startswith(needle):
            prefix.append(name)
        elif needle in name:
            inside.append(name)
    return (sorted(prefix) + sorted(inside))[:limit]


def normalize_query(query: str) -> str:
    """A search query as a name would be normalized (PEP 503), at most MAX_QUERY
    characters; runs of '-', '_' and '.' become one '-', but a leading or
    trailing one is kept, so "-lib" still finds "acme-lib"."""
    text = query.strip()[:MAX_QUERY]
    if not text:
        return ""
    core = text.strip("-_.")
    lead = "-" if text[0] in "-_." else ""
    trail = "-" if text[-1] in "-_." and core else ""
    return lead + (canonicalize_name(core) if core else "") + trail


@dataclass(frozen=True, slots=True)
class Snippet:
    key: str  # an HTML id: [a-z-]+
    title: str
    text: str


def setup_snippets(base: str, simple: str, upload: str, needs_token: bool) -> tuple[Snippet, ...]:
    """How to point pip, uv and poetry at a group, and twine and uv publish at an
    index. base is this server's URL as the browser reached it; simple and upload
    the paths (from base) of the group's index and of the upload URL; needs_token:
    reading takes credentials (auth.anonymous_read: false)."""
    index_url = base + simple
    upload_url = base + upload
    pip_url = _with_token(index_url) if needs_token else index_url
    uv_auth = ("# credentials: UV_INDEX_INDEXGUARD_USERNAME=__token__ and\n"
               "# UV_INDEX_INDEXGUARD_PASSWORD=<token> in the environment\n"
               if needs_token else "")
    poetry_auth = ("# credentials: poetry config http-basic.indexguard __token__ <token>\n"
                   if needs_token else "")
    return (
        Snippet("pip-conf", "pip.conf", f"[global]\nindex-url = {pip_url}\n"),
        Snippet("pip-env", "PIP_INDEX_URL", f"export PIP_INDEX_URL={pip_url}\n"),
        Snippet("uv-index", "uv: [[tool.uv.index]] in pyproject.toml",
                f'[[tool.uv.index]]\nname = "indexguard"\nurl = "{index_url}"\n'
                f"default = true\n{uv_auth}"),
        Snippet("poetry", "poetry: [[tool.poetry.source]] in pyproject.toml",
                f'[[tool.poetry.source]]\nname = "indexguard"\nurl = "{index_url}"\n'
                f'priority = "primary"\n{poetry_auth}'),
        Snippet("pypirc", ".pypirc for twine",
                "[distutils]\nindex-servers = indexguard\n\n[indexguard]\n"
                f"repository = {upload_url}\nusername = __token__\n"
                "password = <a token with the write scope>\n"),
        Snippet("uv-publish", "uv publish",
                f"uv publish --publish-url {upload_url} \\\n"
                f"  --check-url {index_url} \\\n"
                '  --username __token__ --password "$INDEXGUARD_TOKEN" dist/*\n'),
    )


def install_snippets(
    name: NormalizedName, version: str, index_url: str, needs_token: bool,
) -> tuple[Snippet, ...]:
    """pip and uv, pinned to one release of the project, through this index."""
    pin = f"{name}=={version}"
    url = _with_token(index_url) if needs_token else index_url
    return (
        Snippet("install-pip", "pip", f"pip install --index-url {url} {pin}\n"),
        Snippet("install-uv", "uv", f"uv pip install --index-url {url} {pin}\n"),
    )


def _with_token(url: str) -> str:
    """The URL with a placeholder for a token (pip and uv take credentials in it;
    any user name works with our tokens as __token__)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://__token__:<token>@{rest}"
