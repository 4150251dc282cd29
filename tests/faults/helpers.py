"""Shared pieces of the fault suite: raw HTTP over loopback, uploads, store audits.

Raw http.client everywhere: the tests need to see exactly what the proxy sent
(a status, a cut connection, a short body), never a retried or repaired answer.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tests.support.artifacts import sha256_file
from tests.support.forms import multipart, upload_fields
from tests.support.server import ProxyServer

JSON_V1 = "application/vnd.pypi.simple.v1+json"
WRITER, WRITER_SECRET = "ci", "ig_fault-suite-writer-secret-7f3a9c"
ADMIN, ADMIN_SECRET = "ops", "ig_fault-suite-admin-secret-c41d02"
EXPIRED, EXPIRED_SECRET = "old", "ig_fault-suite-expired-secret-99e1b"
SECRETS = (WRITER_SECRET, ADMIN_SECRET, EXPIRED_SECRET)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def auth_config() -> dict[str, Any]:
    """Tokens for the suite: a writer, an admin, and one that expired long ago."""
    return {
        "auth": {
            "anonymous_read": True,
            "tokens": [
                {"name": WRITER, "sha256": sha256_hex(WRITER_SECRET),
                 "scopes": ["read", "write"]},
                {"name": ADMIN, "sha256": sha256_hex(ADMIN_SECRET),
                 "scopes": ["read", "write", "admin"]},
                {"name": EXPIRED, "sha256": sha256_hex(EXPIRED_SECRET),
                 "scopes": ["read", "write"], "expires": "2001-01-01"},
            ],
        },
    }


def basic(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


@dataclass
class Answer:
    """What came back: status, headers (lower-case names), the body read, and
    whether the body was complete (False: the connection was cut short)."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    elapsed: float


def call(
    url: str,
    method: str = "GET",
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
    source: str | None = None,
) -> Answer:
    """One request on a fresh connection. Raises OSError only when no status line came."""
    scheme, rest = url.split("://", 1)
    assert scheme == "http"
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    started = time.monotonic()
    conn = http.client.HTTPConnection(
        host, int(port), timeout=timeout,
        source_address=(source, 0) if source else None,
    )
    try:
        conn.request(method, "/" + path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        chunks: list[bytes] = []
        complete = True
        try:
            while True:
                chunk = resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, http.client.IncompleteRead):
                chunks.append(exc.partial)
            complete = False
        data = b"".join(chunks)
        length = resp.getheader("Content-Length")
        if length is not None and len(data) != int(length):
            complete = False
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data,
                      complete, time.monotonic() - started)
    finally:
        conn.close()


def upload(
    proxy_url: str, wheel: Path, name: str, version: str, *,
    user: str = WRITER, secret: str = WRITER_SECRET, timeout: float = 60.0,
    source: str | None = None,
) -> Answer:
    content = wheel.read_bytes()
    body, ctype = multipart(upload_fields(name, version, content), (wheel.name, content))
    return call(proxy_url + "/", "POST", body=body, timeout=timeout, source=source,
                headers={"Content-Type": ctype, "Authorization": basic(user, secret)})


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample over series matching labels (0 when absent)."""
    text = call(proxy.url + "/metrics").body.decode()
    total = 0.0
    pattern = re.compile(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+(\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def temp_files(root: Path) -> list[Path]:
    """Temp files of the proxy's atomic writes anywhere below root."""
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


@dataclass
class StoreAudit:
    """The private store as found on disk."""

    listed: dict[str, str]  # "project/filename" -> sha256 recorded in index.json
    problems: list[str]  # a listed file missing, or of the wrong size or sha256
    unlisted: list[str]  # files under files/ that no index.json lists


def audit_store(data_dir: Path) -> StoreAudit:
    audit = StoreAudit({}, [], [])
    private = data_dir / "private"
    if not private.exists():
        return audit
    for project in sorted(p for p in private.iterdir() if p.is_dir()):
        index = project / "index.json"
        names: set[str] = set()
        if index.exists():
            data = orjson.loads(index.read_bytes())
            for entry in data.get("files", []):
                filename = entry["filename"]
                names.add(filename)
                path = project / "files" / filename
                want = entry["hashes"]["sha256"]
                if not path.is_file():
                    audit.problems.append(f"{project.name}: listed {filename} is missing")
                    continue
                if entry.get("size") is not None and path.stat().st_size != entry["size"]:
                    audit.problems.append(f"{project.name}: {filename} has the wrong size")
                if sha256_file(path) != want:
                    audit.problems.append(f"{project.name}: {filename} does not match its sha256")
                audit.listed[f"{project.name}/{filename}"] = want
        files = project / "files"
        if files.exists():
            for path in files.iterdir():
                if path.name.removesuffix(".metadata") not in names:
                    audit.unlisted.append(f"{project.name}/{path.name}")
    return audit


def audit_cache(data_dir: Path) -> tuple[int, list[str]]:
    """(committed artifacts, problems): each must hash to its own name."""
    root = data_dir / "cache" / "files"
    count = 0
    problems: list[str] = []
    if not root.exists():
        return 0, problems
    for path in root.rglob("*"):
        if path.is_file():
            count += 1
            if path.name.startswith("."):
                problems.append(f"cache: stray {path.name}")
            elif sha256_file(path) != path.name:
                problems.append(f"cache: {path.name} does not hash to its name")
    return count, problems


def cached_hashes(data_dir: Path) -> set[str]:
    root = data_dir / "cache" / "files"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def eventually(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


def port_refuses(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
