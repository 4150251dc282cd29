"""YAML configuration -> frozen dataclasses; every problem reported as "key.path: what".

Unknown keys are errors. No I/O beyond reading the one file; nothing global.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import yaml

from .patterns import class_end, witness
from .registry import (
    LEGACY_UPSTREAM,
    NAME,
    NAME_RULE,
    GroupSpec,
    IndexSpec,
    Layout,
    Legacy,
    Member,
    RawAlias,
    Registry,
    UpstreamSpec,
    assemble,
)

# metrics: read /metrics when anonymous_read is off (it names private projects).
SCOPES = ("read", "write", "admin", "metrics")
COLLISION_POLICIES = ("reject", "warn", "allow")
LOG_LEVELS = ("debug", "info", "warning", "error")
STORAGE_BACKENDS = ("local", "s3")
PUBLIC_PYPI = "https://pypi.org/simple/"
# Where the public PyPI's pages point for files (upstream.file_hosts' default for it).
PUBLIC_PYPI_FILES = "files.pythonhosted.org"

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(Exception):
    """Every problem found, each as 'key.path: what is wrong'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Characters of a PEP 503 normalized project name.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    # Peers whose X-Forwarded-For names the client (reverse proxies, load balancers).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Open client connections per worker; None: derived from the fd limit at start.
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    # Without credentials: safe to log and to build URLs from.
    url: str = PUBLIC_PYPI
    forward: bool = True
    index_ttl: float = 600.0
    negative_ttl: float = 60.0
    # Well under pip's own 15 s: a hanging upstream must cost less than the
    # client's patience, so the stale page still reaches it.
    timeout: float = 5.0
    # After the upstream fails (timeout, refused, 5xx): how long it counts as
    # down for every name; stale pages answer at once, other names get 502.
    backoff: float = 15.0
    # Hosts besides the upstream's own origin that files (and redirects) may
    # come from: "host" (its scheme's default port) or "host:port", lowercased.
    file_hosts: tuple[str, ...] = (PUBLIC_PYPI_FILES,)
    # (user, password) from the userinfo of the configured url; sent to the
    # upstream's own origin only. Never printed: kept out of repr.
    credentials: tuple[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Cache:
    max_bytes: int = 20 * 2**30
    memory_pages: int = 2048
    # Parsed and rendered pages kept in memory, in bytes (estimated); a page
    # bigger than this is served but not kept.
    memory_bytes: int = 256 * 2**20


@dataclass(frozen=True, slots=True)
class Limits:
    max_upload: int = 5 * 2**30
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    sha256: str
    scopes: frozenset[str]
    expires: dt.date | None = None
    # fnmatch patterns on index names: where write and admin apply, and which
    # /i/<index>/ views read covers. Default: every index.
    indexes: tuple[str, ...] = ("*",)
    # fnmatch patterns on group names: which groups read covers. Default: all.
    groups: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class TrustedPublisher:
    """A CI identity allowed to trade its OIDC ID token for a short upload token."""

    name: str
    # The exact `iss` of its ID tokens; https (http only for a loopback host).
    issuer: str
    # The one `aud` its ID tokens must carry.
    audience: str
    # Claim -> value; every one must equal the token's (as text).
    claims: Mapping[str, str]
    # Where it may publish, and which normalized names (fnmatch patterns).
    index: str
    projects: tuple[str, ...]
    # The ID token itself is also accepted for reads (username __oidc__).
    read: bool = False
    # Groups those reads cover (fnmatch patterns on group names).
    groups: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Auth:
    anonymous_read: bool = True
    realm: str = "indexguard"
    tokens: tuple[Token, ...] = ()
    trusted_publishers: tuple[TrustedPublisher, ...] = ()
    # What GET /_/oidc/audience answers, and every publisher's default audience.
    oidc_audience: str = "indexguard"
    # HMAC key of minted upload tokens, shared by replicas; None: data_dir/oidc-mint.key.
    signing_key_file: Path | None = None
    # Seconds a minted upload token lives (PyPI: 900, the most allowed).
    mint_lifetime: float = 900.0


@dataclass(frozen=True, slots=True)
class Guard:
    private_only: tuple[str, ...] = ()
    upload_collision: str = "warn"
    allow_shadow: tuple[str, ...] = ()
    min_age: float | None = None
    min_age_exempt: tuple[str, ...] = ()
    # The upstream's project list (collision detection): how long it holds, how big it may be.
    names_ttl: float = 6 * 3600.0
    names_max_bytes: int = 128 * 2**20


@dataclass(frozen=True, slots=True)
class Log:
    level: str = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class S3:
    bucket: str = ""
    # Prepended to every key ("prod/"): several deployments may share a bucket.
    prefix: str = ""
    # None: AWS itself; an http(s) URL for MinIO, SeaweedFS, moto.
    endpoint_url: str | None = None
    region: str | None = None
    # Seconds a presigned URL for a file GET is valid; 0: files stream through
    # the replica (the default).
    redirect_ttl: int = 0


@dataclass(frozen=True, slots=True)
class Storage:
    # local: everything under data_dir (one host); s3: replicas share a bucket.
    backend: str = "local"
    s3: S3 = field(default_factory=S3)


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    workers: int = 1
    data_dir: Path = Path("./data")
    upstream: Upstream = field(default_factory=Upstream)
    cache: Cache = field(default_factory=Cache)
    limits: Limits = field(default_factory=Limits)
    auth: Auth = field(default_factory=Auth)
    guard: Guard = field(default_factory=Guard)
    log: Log = field(default_factory=Log)
    storage: Storage = field(default_factory=Storage)
    source: str = "<embedded default>"
    # The keys indexes, upstreams, groups and gitlab as given (all absent: today's shape).
    layout: Layout = field(default_factory=Layout)
    # Derived from layout, upstream and guard, also after dataclasses.replace():
    # what is left out takes today's shape (index default, upstream pypi, group default).
    registry: Registry = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        registry = assemble(legacy(self.upstream, self.guard), self.layout, [])
        object.__setattr__(self, "registry", registry)

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


def parse_size(value: object) -> int:
    """'20GiB' -> bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 20GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = _NUMBER_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 512MiB or 20GiB, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: object) -> float:
    """'3d' -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 3d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _NUMBER_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"expected a duration such as 30s, 10m or 3d, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


T = TypeVar("T")


class _Reader:
    """Walks a mapping, converts values, and collects every problem with its path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def section(self, data: Mapping[str, Any], path: str, known: set[str]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            self.problems.append(f"{path}: expected a mapping, got {type(data).__name__}")
            return {}
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.problems.append(f"{where}: unknown key")
        return data

    def get(
        self, data: Mapping[str, Any], path: str, key: str, default: T,
        convert: Callable[[Any], T],
    ) -> T:
        if key not in data:
            return default
        try:
            return convert(data[key])
        except (ValueError, TypeError) as exc:
            self.problems.append(f"{path}{key}: {exc}")
            return default


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}, got {value!r}")
        return value
    return convert


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)
    return convert


def _split(text: str) -> SplitResult | None:
    """The URL's parts; None when it does not parse or its port is no number."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return None
    return parts


def _url(value: Any) -> str:
    text = _str(value)
    parts = _split(text)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {redact_url(text)!r}")
    return text if text.endswith("/") else text + "/"


def redact_url(url: str) -> str:
    """The URL with any userinfo (credentials) replaced by ***: safe to print."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{tail}"


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without userinfo, (user, password) or None); percent-escapes decoded."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    bare = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return bare, (unquote(user), unquote(password))


def _is_public_pypi(url: str) -> bool:
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port or 443, parts.path) == (
        "https", "pypi.org", 443, "/simple/")


def _file_hosts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of host names (host or host:port)")
    hosts = []
    for item in value:
        host = _host_port(item)
        if host is None:
            raise ValueError(f"expected a host name or host:port, got {item!r}")
        hosts.append(host)
    return tuple(hosts)


def _host_port(item: Any) -> str | None:
    """'Files.Example.org.' -> 'files.example.org'; 'h:8443' and '[::1]:8443' kept
    with their port. None for anything else (a URL, a path, userinfo, a bad port)."""
    if not isinstance(item, str) or not item or any(c in item for c in "/@?#\\ \t"):
        return None
    try:
        parts = urlsplit(f"//{item}")
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    if not host or (port is not None and not 0 < port < 65536):
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


def _optional_duration(value: Any) -> float | None:
    return None if value is None else _positive_duration(value)


def _optional(convert: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else convert(value)


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _str_list(value):
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address or a network such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


def normalize_pattern(pattern: str) -> str:
    """An fnmatch pattern over project names, normalized as PEP 503 normalizes
    names: lowercase, each run of '-', '_', '.' one '-'; '*', '?' and [...] kept.

    So `Corp_*`, `internal.*` and `ACME-*` match what their authors mean.
    Raises ValueError saying why a pattern can never match a normalized name.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char in "*?":
            out.append(char)
            i += 1
        elif char == "[":
            end = class_end(pattern, i)
            if end < 0:
                raise ValueError(f"{pattern!r}: '[' is never closed")
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            members = (body[1:] if negate else body).lower()
            odd = sorted(set(members) - _NAME_CHARS)
            if odd:
                raise ValueError(
                    f"{pattern!r}: [{body}] holds {''.join(odd)!r}; normalized names have "
                    "only a-z, 0-9 and '-'"
                )
            out.append("[" + ("!" if negate else "") + members + "]")
            i = end + 1
        elif char in "-_.":
            while i < n and pattern[i] in "-_.":
                i += 1
            out.append("-")
        else:
            lower = char.lower()
            if lower not in _NAME_CHARS:
                raise ValueError(
                    f"{pattern!r} can never match a project name: {char!r} is in no "
                    "normalized name (a-z, 0-9 and '-' only)"
                )
            out.append(lower)
            i += 1
    normalized = "".join(out)
    if normalized.startswith("-") or normalized.endswith("-"):
        raise ValueError(
            f"{pattern!r} can never match a project name: names never start or end "
            "with '-', '_' or '.'"
        )
    return normalized


def _patterns(r: _Reader, data: Mapping[str, Any], path: str, key: str) -> tuple[str, ...]:
    """A list of name patterns, each normalized; each bad one reported with its index."""
    if key not in data:
        return ()
    try:
        items = _str_list(data[key])
    except ValueError as exc:
        r.problems.append(f"{path}{key}: {exc}")
        return ()
    patterns = []
    for i, item in enumerate(items):
        try:
            pattern = normalize_pattern(item)
        except ValueError as exc:
            r.problems.append(f"{path}{key}[{i}]: {exc}")
            continue
        if witness(pattern) is None:  # e.g. [-]: only '-', which no name is
            r.problems.append(f"{path}{key}[{i}]: {item!r} can never match a project name")
            continue
        patterns.append(pattern)
    return tuple(patterns)


def _tokens(r: _Reader, raw: Any, registry: Registry) -> tuple[Token, ...]:
    if not isinstance(raw, list):
        r.problems.append("auth.tokens: expected a list")
        return ()
    tokens: list[Token] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"auth.tokens[{i}]."
        entry = r.section(item, f"auth.tokens[{i}]",
                          {"name", "sha256", "scopes", "expires", "indexes", "groups"})
        if not entry:
            continue
        name = r.get(entry, path, "name", "", _str)
        digest = r.get(entry, path, "sha256", "", _sha256_hex)
        scopes = r.get(entry, path, "scopes", frozenset[str](), _scopes)
        expires = r.get(entry, path, "expires", None, _date)
        indexes = _name_patterns(r, entry, path, "indexes",
                                 [i.name for i in registry.indexes], "index")
        groups = _name_patterns(r, entry, path, "groups",
                                [g.name for g in registry.groups], "group")
        for key in ("name", "sha256", "scopes"):
            if key not in entry:
                r.problems.append(f"{path}{key}: required")
        if name in seen or name == "__token__":
            r.problems.append(f"{path}name: {name!r} is reserved or used twice")
        seen.add(name)
        if name and digest and scopes:
            tokens.append(Token(name=name, sha256=digest, scopes=scopes, expires=expires,
                                indexes=indexes, groups=groups))
    return tuple(tokens)


# Claims that pin a publisher to one CI project or repository. A publisher
# must name one: without, any project on a shared issuer (github.com's is
# everyone's) could publish.
IDENTITY_CLAIMS = frozenset({
    "sub", "project_path", "project_id", "namespace_path", "namespace_id", "repository",
    "repository_id", "repository_owner", "repository_owner_id", "job_workflow_ref",
})
_LOOPBACK_HOSTS = ("localhost", "::1")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in _LOOPBACK_HOSTS


def _issuer(value: Any) -> str:
    """An OIDC issuer: https, or http on a loopback host (tests, a local issuer)."""
    text = _str(value)
    parts = _split(text)
    if parts is None or not parts.hostname or parts.query or parts.fragment or "@" in text:
        raise ValueError(f"expected an issuer URL such as https://gitlab.example.com, "
                         f"got {redact_url(text)!r}")
    if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback(parts.hostname)):
        raise ValueError(f"{text!r}: an issuer must be https (http only on a loopback host)")
    return text


def _audience(value: Any) -> str:
    text = _str(value)
    if len(text) > 200 or not text.isprintable():
        raise ValueError("expected printable text of at most 200 characters")
    return text


def _claims(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError("expected a mapping of claim names to values, such as "
                         "{project_path: acme/platform}")
    claims: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"claim name {key!r} is not a string")
        if isinstance(item, bool):  # GitLab sends ref_protected as the text "true"
            item = "true" if item else "false"
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str) or not item:
            raise ValueError(f"claim {key}: expected a string, got {item!r}")
        claims[key] = item
    if not IDENTITY_CLAIMS & set(claims):
        raise ValueError("must pin a project or repository: give one of "
                         + ", ".join(sorted(IDENTITY_CLAIMS)))
    return claims


def _mint_lifetime(value: Any) -> float:
    seconds = _positive_duration(value)
    if seconds > 900:
        raise ValueError("at most 15m (PyPI's lifetime): a stolen upload token must die soon")
    return seconds


def _publishers(
    r: _Reader, raw: Any, registry: Registry, audience: str,
) -> tuple[TrustedPublisher, ...]:
    if not isinstance(raw, list):
        r.problems.append("auth.trusted_publishers: expected a list")
        return ()
    found: list[TrustedPublisher] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"auth.trusted_publishers[{i}]"
        path = where + "."
        entry = r.section(item, where, {"name", "issuer", "audience", "claims", "index",
                                        "projects", "read", "groups"})
        if not entry:
            continue
        before = len(r.problems)
        for key in ("name", "issuer", "claims", "projects"):
            if key not in entry:
                r.problems.append(f"{path}{key}: required")
        name = r.get(entry, path, "name", "", _registry_name)
        if name and name in seen:
            r.problems.append(f"{path}name: {name!r} is used twice")
        seen.add(name)
        index = r.get(entry, path, "index", registry.first_index.name, _str)
        if registry.index(index) is None:
            r.problems.append(f"{path}index: no index named {index!r} (there are: "
                              f"{', '.join(i.name for i in registry.indexes)})")
        publisher = TrustedPublisher(
            name=name,
            issuer=r.get(entry, path, "issuer", "", _issuer),
            audience=r.get(entry, path, "audience", audience, _audience),
            claims=MappingProxyType(r.get(entry, path, "claims", {}, _claims)),
            index=index,
            projects=_patterns(r, entry, path, "projects"),
            read=r.get(entry, path, "read", False, _bool),
            groups=_name_patterns(r, entry, path, "groups",
                                  [g.name for g in registry.groups], "group"),
        )
        if "projects" in entry and not publisher.projects and len(r.problems) == before:
            r.problems.append(f"{path}projects: list at least one name pattern (acme-*)")
        if len(r.problems) == before:
            found.append(publisher)
    return tuple(found)


def _name_patterns(
    r: _Reader, entry: Mapping[str, Any], path: str, key: str, names: list[str], kind: str,
) -> tuple[str, ...]:
    """A token's patterns on index or group names (default: all); each must
    match a configured name, so a typo is refused instead of locking a token out."""
    if key not in entry:
        return ("*",)
    patterns: tuple[str, ...] = r.get(entry, path, key, (), _str_list)
    for j, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            r.problems.append(f"{path}{key}[{j}]: {pattern!r} matches no {kind} "
                              f"(there are: {', '.join(names)})")
    return patterns


def _sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError("expected the 64-digit hex sha256 of the secret")
    return value.lower()


def _scopes(value: Any) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected a list of scopes from {', '.join(SCOPES)}")
    scopes = frozenset(str(s).strip() for s in items)
    unknown = scopes - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}; use {', '.join(SCOPES)}")
    return scopes


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}") from None


# --- indexes, upstreams, groups, gitlab: read here, tied together by registry.assemble ---

def legacy(upstream: Upstream, guard: Guard) -> Legacy:
    """What upstream.* and guard.* give the registry: upstream pypi, the reserved
    patterns of every group, the global forwarding toggle."""
    return Legacy(
        upstream=UpstreamSpec(
            name=LEGACY_UPSTREAM, url=upstream.url, credentials=upstream.credentials,
            file_hosts=upstream.file_hosts, index_ttl=upstream.index_ttl,
            negative_ttl=upstream.negative_ttl, timeout=upstream.timeout,
            backoff=upstream.backoff, min_age=guard.min_age,
        ),
        reserved=guard.private_only,
        forward=upstream.forward,
    )


def _layout(r: _Reader, top: Mapping[str, Any], defaults: UpstreamSpec) -> Layout:
    def upstream_spec(item: Mapping[str, Any], path: str) -> UpstreamSpec:
        return _upstream_spec(r, item, path, defaults)

    projects, gitlab_groups = _gitlab(r, top.get("gitlab"))
    return Layout(
        indexes=_entries(r, top, "indexes", lambda item, path: _index_spec(r, item, path)),
        upstreams=_entries(r, top, "upstreams", upstream_spec),
        groups=_entries(r, top, "groups", lambda item, path: _group_spec(r, item, path)),
        projects=projects,
        gitlab_groups=gitlab_groups,
    )


def _entries(
    r: _Reader, top: Mapping[str, Any], key: str,
    read: Callable[[Mapping[str, Any], str], T],
) -> tuple[T, ...] | None:
    """A list of mappings, each read at its own path; None when the key is absent."""
    raw = top.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list):
        r.problems.append(f"{key}: expected a list")
        return None
    # Every entry keeps its place, even a broken one (named ""): the checks
    # in registry.assemble() report paths by position.
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            r.problems.append(f"{key}[{i}]: expected a mapping, got {type(item).__name__}")
            item = _BROKEN
        entries.append(read(item, f"{key}[{i}]"))
    return tuple(entries)


# Stands in for an entry that is not a mapping (already reported).
_BROKEN: Mapping[str, Any] = MappingProxyType({})


def _name(r: _Reader, data: Mapping[str, Any], path: str) -> str:
    """An entry's required name; "" when it is missing or bad (reported)."""
    if data is _BROKEN:
        return ""
    if "name" not in data:
        r.problems.append(f"{path}.name: required")
        return ""
    return r.get(data, f"{path}.", "name", "", _registry_name)


def _one(r: _Reader, value: Any, path: str, default: T, convert: Callable[[Any], T]) -> T:
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        r.problems.append(f"{path}: {exc}")
        return default


def _registry_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"expected a name of {NAME_RULE}, got {value!r}")
    return value


def _index_spec(r: _Reader, data: Mapping[str, Any], path: str) -> IndexSpec:
    s = r.section(data, path, {"name", "owns"})
    return IndexSpec(_name(r, s, path), _patterns(r, s, f"{path}.", "owns"))


def _upstream_spec(
    r: _Reader, data: Mapping[str, Any], path: str, d: UpstreamSpec,
) -> UpstreamSpec:
    s = r.section(data, path, {"name", "url", "not_found", "file_hosts", "index_ttl",
                               "negative_ttl", "timeout", "backoff", "min_age"})
    name, p = _name(r, s, path), f"{path}."
    if "url" not in s and name:
        r.problems.append(f"{p}url: required")
    url, credentials = split_credentials(r.get(s, p, "url", "", _url))
    return UpstreamSpec(
        name=name, url=url, credentials=credentials,
        file_hosts=r.get(s, p, "file_hosts",
                         (PUBLIC_PYPI_FILES,) if _is_public_pypi(url) else (), _file_hosts),
        not_found=r.get(s, p, "not_found", d.not_found, _statuses),
        index_ttl=r.get(s, p, "index_ttl", d.index_ttl, parse_duration),
        negative_ttl=r.get(s, p, "negative_ttl", d.negative_ttl, parse_duration),
        timeout=r.get(s, p, "timeout", d.timeout, _positive_duration),
        backoff=r.get(s, p, "backoff", d.backoff, parse_duration),
        min_age=r.get(s, p, "min_age", d.min_age, _optional_duration),
    )


def _statuses(value: Any) -> frozenset[int]:
    if (not isinstance(value, list) or not value
            or not all(type(v) is int and 400 <= v <= 499 for v in value)):
        raise ValueError(f"expected a list of 4xx statuses such as [403, 404], got {value!r}")
    return frozenset(value)


def _group_spec(r: _Reader, data: Mapping[str, Any], path: str) -> GroupSpec:
    s = r.section(data, path, {"name", "members", "reserved", "forward"})
    name, p = _name(r, s, path), f"{path}."
    raw = s.get("members", [])
    if not isinstance(raw, list):
        r.problems.append(f"{p}members: expected a list of {{index: NAME}} or "
                          "{upstream: NAME, names: [...]}")
        raw = []
    return GroupSpec(
        name=name,
        members=tuple(_member(r, item, f"{p}members[{k}]") for k, item in enumerate(raw)),
        reserved=_patterns(r, s, p, "reserved"),
        forward=r.get(s, p, "forward", True, _bool),
    )


def _member(r: _Reader, item: Any, path: str) -> Member:
    kinds = [k for k in ("index", "upstream") if isinstance(item, Mapping) and k in item]
    if len(kinds) != 1:
        r.problems.append(f"{path}: expected {{index: NAME}} or {{upstream: NAME, names: [...]}}")
        return Member("index", "")
    s = r.section(item, path, {"index", "upstream", "names"})
    if kinds == ["index"]:
        if "names" in s:
            r.problems.append(f"{path}.names: only upstream members take names (an index "
                              "answers for every name it has)")
        return Member("index", r.get(s, f"{path}.", "index", "", _str))
    names = _patterns(r, s, f"{path}.", "names") if "names" in s else None
    if s.get("names") == []:
        r.problems.append(f"{path}.names: list at least one pattern, or leave names out to "
                          "ask this upstream about every name")
    return Member("upstream", r.get(s, f"{path}.", "upstream", "", _str), names)


def _gitlab(r: _Reader, raw: Any) -> tuple[tuple[RawAlias, ...], tuple[tuple[str, str], ...]]:
    if raw is None:
        return (), ()
    s = r.section(raw, "gitlab", {"projects", "groups"})
    projects: list[RawAlias] = []
    for ident, value in _mapping(r, s, "projects").items():
        where = f"gitlab.projects.{ident}"
        if isinstance(value, Mapping):
            entry = r.section(value, where, {"index", "group"})
            if "index" not in entry:
                r.problems.append(f"{where}.index: required")
            projects.append(RawAlias(
                ident, r.get(entry, f"{where}.", "index", "", _str),
                r.get(entry, f"{where}.", "group", None, _str)))
        else:
            projects.append(RawAlias(ident, _one(r, value, where, "", _str)))
    groups = [(ident, _one(r, value, f"gitlab.groups.{ident}", "", _str))
              for ident, value in _mapping(r, s, "groups").items()]
    return tuple(projects), tuple(groups)


def _mapping(r: _Reader, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """gitlab.projects or gitlab.groups, keyed by id as text (YAML reads 42 as a number)."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        r.problems.append(f"gitlab.{key}: expected a mapping of GitLab ids to names")
        return {}
    ids = {}
    for ident, target in value.items():
        if isinstance(ident, bool) or not isinstance(ident, str | int):  # `yes:` is True
            r.problems.append(f"gitlab.{key}.{ident}: expected a numeric id or a path; "
                              "quote it")
        else:
            ids[str(ident)] = target
    return ids


def build_config(raw: Any, source: str = "<embedded default>") -> Config:
    """Validate a parsed YAML document. Raises ConfigError listing every problem."""
    problems: list[str] = []
    r = _Reader(problems)
    if raw is None:
        raw = {}
    top = r.section(raw, "", {
        "listen", "workers", "data_dir", "upstream", "cache", "limits", "auth", "guard", "log",
        "indexes", "upstreams", "groups", "gitlab", "storage",
    })
    d = Config()
    storage = _storage(r, top)

    s = r.section(top.get("listen", {}), "listen",
                  {"host", "port", "trusted_proxies", "max_connections"})
    listen = Listen(
        host=r.get(s, "listen.", "host", d.listen.host, _str),
        port=r.get(s, "listen.", "port", d.listen.port, _int_range(0, 65535)),
        trusted_proxies=r.get(s, "listen.", "trusted_proxies", (), _networks),
        max_connections=r.get(s, "listen.", "max_connections", None,
                              _optional(_int_range(1, 1_000_000))),
    )
    s = r.section(top.get("upstream", {}), "upstream",
                  {"url", "forward", "index_ttl", "negative_ttl", "timeout", "backoff",
                   "file_hosts"})
    url, credentials = split_credentials(r.get(s, "upstream.", "url", d.upstream.url, _url))
    upstream = Upstream(
        url=url,
        credentials=credentials,
        file_hosts=r.get(s, "upstream.", "file_hosts",
                         d.upstream.file_hosts if _is_public_pypi(url) else (), _file_hosts),
        forward=r.get(s, "upstream.", "forward", d.upstream.forward, _bool),
        index_ttl=r.get(s, "upstream.", "index_ttl", d.upstream.index_ttl, parse_duration),
        negative_ttl=r.get(s, "upstream.", "negative_ttl", d.upstream.negative_ttl,
                           parse_duration),
        timeout=r.get(s, "upstream.", "timeout", d.upstream.timeout, _positive_duration),
        backoff=r.get(s, "upstream.", "backoff", d.upstream.backoff, parse_duration),
    )
    s = r.section(top.get("cache", {}), "cache", {"max_bytes", "memory_pages", "memory_bytes"})
    cache = Cache(
        max_bytes=r.get(s, "cache.", "max_bytes", d.cache.max_bytes, parse_size),
        memory_pages=r.get(s, "cache.", "memory_pages", d.cache.memory_pages,
                           _int_range(0, 1_000_000)),
        memory_bytes=r.get(s, "cache.", "memory_bytes", d.cache.memory_bytes, parse_size),
    )
    s = r.section(top.get("limits", {}), "limits", {"max_upload", "idle_timeout"})
    limits = Limits(
        max_upload=r.get(s, "limits.", "max_upload", d.limits.max_upload, parse_size),
        idle_timeout=r.get(s, "limits.", "idle_timeout", d.limits.idle_timeout,
                           _positive_duration),
    )
    s = r.section(top.get("guard", {}), "guard", {
        "private_only", "upload_collision", "allow_shadow", "min_age", "min_age_exempt",
        "names_ttl", "names_max_bytes",
    })
    guard = Guard(
        private_only=_patterns(r, s, "guard.", "private_only"),
        upload_collision=r.get(s, "guard.", "upload_collision", d.guard.upload_collision,
                               _choice(COLLISION_POLICIES)),
        allow_shadow=_patterns(r, s, "guard.", "allow_shadow"),
        min_age=r.get(s, "guard.", "min_age", None, _optional_duration),
        min_age_exempt=_patterns(r, s, "guard.", "min_age_exempt"),
        names_ttl=r.get(s, "guard.", "names_ttl", d.guard.names_ttl, _positive_duration),
        names_max_bytes=r.get(s, "guard.", "names_max_bytes", d.guard.names_max_bytes,
                              parse_size),
    )
    raw_upstream = top.get("upstream") or {}
    if top.get("upstreams") is not None:
        for key in ("url", "file_hosts"):
            if isinstance(raw_upstream, Mapping) and key in raw_upstream:
                problems.append(f"upstream.{key}: give it per upstream under upstreams: "
                                "(upstream.* holds only their defaults once upstreams: is given)")
    base = legacy(upstream, guard)
    layout = _layout(r, top, base.upstream)
    registry = assemble(base, layout, problems)
    s = r.section(top.get("auth", {}), "auth", {
        "anonymous_read", "realm", "tokens", "trusted_publishers", "oidc_audience",
        "signing_key_file", "mint_lifetime",
    })
    audience = r.get(s, "auth.", "oidc_audience", d.auth.oidc_audience, _audience)
    key_file = r.get(s, "auth.", "signing_key_file", None, _optional(_str))
    auth = Auth(
        anonymous_read=r.get(s, "auth.", "anonymous_read", d.auth.anonymous_read, _bool),
        realm=r.get(s, "auth.", "realm", d.auth.realm, _realm),
        tokens=(_tokens(r, s["tokens"], registry)
                if "tokens" in s and s["tokens"] is not None else ()),
        trusted_publishers=(_publishers(r, s["trusted_publishers"], registry, audience)
                            if s.get("trusted_publishers") is not None else ()),
        oidc_audience=audience,
        signing_key_file=Path(key_file) if key_file else None,
        mint_lifetime=r.get(s, "auth.", "mint_lifetime", d.auth.mint_lifetime, _mint_lifetime),
    )
    s = r.section(top.get("log", {}), "log", {"level", "access_log"})
    log = Log(
        level=r.get(s, "log.", "level", d.log.level, _choice(LOG_LEVELS)),
        access_log=r.get(s, "log.", "access_log", d.log.access_log, _bool),
    )
    workers = r.get(top, "", "workers", d.workers, _int_range(0, 256))
    data_dir = r.get(top, "", "data_dir", str(d.data_dir), _str)
    if problems:
        raise ConfigError(problems)
    return Config(
        listen=listen, workers=workers, data_dir=Path(data_dir), upstream=upstream,
        cache=cache, limits=limits, auth=auth, guard=guard, log=log, source=source,
        layout=layout, storage=storage,
    )


def _storage(r: _Reader, top: Mapping[str, Any]) -> Storage:
    s = r.section(top.get("storage", {}), "storage", {"backend", "s3"})
    backend = r.get(s, "storage.", "backend", "local", _choice(STORAGE_BACKENDS))
    raw = s.get("s3")
    if raw is None:
        if backend == "s3":
            r.problems.append("storage.s3: required with storage.backend: s3 (bucket, region)")
        return Storage(backend)
    b = r.section(raw, "storage.s3",
                  {"bucket", "prefix", "endpoint_url", "region", "redirect_ttl"})
    s3 = S3(
        bucket=r.get(b, "storage.s3.", "bucket", "", _bucket),
        prefix=r.get(b, "storage.s3.", "prefix", "", _key_prefix),
        endpoint_url=r.get(b, "storage.s3.", "endpoint_url", None, _optional(_endpoint)),
        region=r.get(b, "storage.s3.", "region", None, _optional(_str)),
        redirect_ttl=r.get(b, "storage.s3.", "redirect_ttl", 0, _int_range(0, 3600)),
    )
    if backend == "s3" and not s3.bucket:
        r.problems.append("storage.s3.bucket: required with storage.backend: s3")
    return Storage(backend, s3)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(value: Any) -> str:
    if not isinstance(value, str) or not _BUCKET.fullmatch(value):
        raise ValueError("expected an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
    return value


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or value.startswith("/") or "\x00" in value:
        raise ValueError("expected a key prefix such as 'prod/' (no leading '/')")
    if ".." in value.split("/") or len(value) > 512:
        raise ValueError("expected a key prefix such as 'prod/' (no '..' part, at most 512)")
    return value


def _endpoint(value: Any) -> str:
    url = _url(value)
    if "@" in urlsplit(url).netloc:
        raise ValueError("credentials come from the AWS chain (environment, profile, "
                         "role), never from endpoint_url")
    return url.rstrip("/")


def _realm(value: Any) -> str:
    text = _str(value)
    if '"' in text or "\\" in text or not text.isprintable():
        raise ValueError("must be printable and contain no quotes or backslashes")
    return text


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML's implicit timestamps.

    PyYAML turns `2027-02-30` into a date while parsing and raises a bare
    ValueError for an impossible one, far from any key. As plain strings, dates
    reach _date(), which reports them as `key.path: what is wrong`.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a YAML file; None gives the embedded default.

    Raises ConfigError (unreadable file, not UTF-8, bad YAML, or invalid
    values), and nothing else: serve, check-config and a SIGHUP reload all
    report it as one line per problem.
    """
    if path is None:
        return build_config({})
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})"
        ]) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {one_line_yaml(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from None
    return build_config(raw, source=str(path))


def one_line_yaml(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())
