"""Self-tests of tests/support: artifacts, FakeUpstream, clients, ProxyServer (with a stub).

No proxy is involved; real pip, uv and twine talk to loopback servers only.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import clients
from tests.support.artifacts import build_sdist, build_wheel, sha256_file, wheel_metadata
from tests.support.server import ProxyServer, deep_merge, http_get
from tests.support.simple import JSON_V1, negotiate
from tests.support.upstream import FakeUpstream

PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)


def fetch(
    url: str, headers: Mapping[str, str] | None = None, method: str = "GET"
) -> tuple[int, Mapping[str, str], bytes]:
    """One request with http.client (no redirects, no proxies)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(
            method,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            headers=dict(headers or {}),
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.anchors: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.anchors.append(dict(attrs))


def html_files(body: bytes) -> dict[str, dict[str, Any]]:
    parser = _Anchors()
    parser.feed(body.decode())
    out: dict[str, dict[str, Any]] = {}
    for a in parser.anchors:
        url, _, frag = (a["href"] or "").partition("#")
        meta = a.get("data-core-metadata")
        out[url.rsplit("/", 1)[-1]] = {
            "url": url,
            "sha256": frag.removeprefix("sha256="),
            "requires-python": a.get("data-requires-python"),
            "yanked": a.get("data-yanked"),
            "metadata": None if meta is None else meta.removeprefix("sha256="),
        }
    return out


@pytest.fixture
def populated(upstream: FakeUpstream, artifacts_dir: Path) -> FakeUpstream:
    """demo-pkg 1.0 (needs dep-b), 2.0 (Python >=4, '<' to check escaping), 3.0 (yanked)."""
    upstream.add(build_wheel(artifacts_dir, "Demo.Pkg", "1.0", requires_dist=["dep-b>=1"]))
    upstream.add(build_wheel(artifacts_dir, "Demo.Pkg", "2.0", requires_python=">=4,<5"))
    upstream.add(build_wheel(artifacts_dir, "Demo.Pkg", "3.0"), yanked="broken <build>")
    upstream.add(build_sdist(artifacts_dir, "Demo.Pkg", "1.0"), upload_time=None)
    upstream.add(build_wheel(artifacts_dir, "dep_b", "1.5", extra_bytes=200_000))
    return upstream


# ----------------------------------------------------------------- artifacts
def test_wheel_layout_and_record(artifacts_dir: Path) -> None:
    whl = build_wheel(artifacts_dir, "My.Cool-Pkg", "1.0.0", extra_bytes=50_000)
    assert whl.name == "my_cool_pkg-1.0.0-py3-none-any.whl"
    assert whl.stat().st_size > 50_000  # random bytes do not compress
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        record = zf.read("my_cool_pkg-1.0.0.dist-info/RECORD").decode().splitlines()
        for line in record:
            path, digest, size = line.rsplit(",", 2)
            if path.endswith("RECORD"):
                continue
            data = zf.read(path)
            assert size == str(len(data))
            assert digest.startswith("sha256=") and "=" not in digest[7:]
    assert "my_cool_pkg/__init__.py" in names
    assert b"Name: My.Cool-Pkg" in wheel_metadata(whl)
    assert len(sha256_file(whl)) == 64


# ----------------------------------------------------------------- real clients
@pytest.mark.parametrize("html_only", [False, True], ids=["json", "html"])
def test_pip_installs_from_fake_upstream(
    populated: FakeUpstream, tmp_path: Path, html_only: bool
) -> None:
    populated.html_only = html_only
    target = tmp_path / "target"
    result = clients.pip_install(
        populated.url, target, "demo.pkg", extra=["--only-binary", ":all:"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # 2.0 needs Python 4 and 3.0 is yanked: pip must pick 1.0 plus its dependency.
    assert clients.installed_version(target, "demo-pkg") == "1.0"
    assert clients.installed_version(target, "dep-b") == "1.5"
    assert (target / "demo_pkg" / "__init__.py").read_text() == '__version__ = "1.0"\n'
    files = [path for _, path in populated.file_requests()]
    assert "/files/demo_pkg-1.0-py3-none-any.whl.metadata" in files  # PEP 658 used
    assert "/files/demo_pkg-1.0-py3-none-any.whl" in files


def test_uv_installs_from_fake_upstream(populated: FakeUpstream, tmp_path: Path) -> None:
    python = clients.uv_venv(tmp_path / "venv")
    result = clients.uv_install(populated.url, python, "demo-pkg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert clients.installed_version(tmp_path / "venv", "demo-pkg") == "1.0"
    assert clients.installed_version(python, "dep_b") == "1.5"
    assert ("GET", "/simple/demo-pkg/") in populated.page_requests("Demo.Pkg")


def test_uploads_reach_a_loopback_sink(artifacts_dir: Path) -> None:
    seen: list[tuple[str | None, bytes]] = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append((self.headers.get("Authorization"), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/legacy/"
        files = [
            build_wheel(artifacts_dir, "up-pkg", "1.0"),
            build_sdist(artifacts_dir, "up-pkg", "1.0"),
        ]
        for upload in (clients.twine_upload, clients.uv_publish):
            result = upload(url, files, "__token__", "s3cret")
            assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert len(seen) == 4
    for auth, body in seen:
        assert auth == "Basic X190b2tlbl9fOnMzY3JldA=="  # __token__:s3cret
        assert b'name=":action"' in body and b"file_upload" in body


# ----------------------------------------------------------------- pages
def test_json_and_html_pages_agree(populated: FakeUpstream) -> None:
    status, headers, body = fetch(populated.url + "demo-pkg/", {"Accept": PIP_ACCEPT})
    assert status == 200 and headers["content-type"] == JSON_V1
    doc = json.loads(body)
    assert doc["meta"] == {"api-version": "1.1"} and doc["name"] == "demo-pkg"
    assert doc["versions"] == ["1.0", "2.0", "3.0"]
    status, headers, html_body = fetch(populated.url + "demo-pkg/", {"Accept": "text/html"})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"&gt;=4,&lt;5" in html_body  # data-requires-python is escaped
    anchors = html_files(html_body)
    assert set(anchors) == {f["filename"] for f in doc["files"]}
    for f in doc["files"]:
        a = anchors[f["filename"]]
        assert f["url"] == a["url"] and f["url"].startswith(populated.base + "/files/")
        assert f["hashes"]["sha256"] == a["sha256"]
        assert f["requires-python"] == a["requires-python"]
        assert f["yanked"] == (a["yanked"] if a["yanked"] is not None else False)
        assert f["core-metadata"] == f["dist-info-metadata"]
        meta = f["core-metadata"]
        assert (meta["sha256"] if meta else None) == a["metadata"]
        status, _, data = fetch(f["url"])
        assert status == 200 and len(data) == f["size"]
        assert hashlib.sha256(data).hexdigest() == f["hashes"]["sha256"]
        if meta:
            _, _, mdata = fetch(f["url"] + ".metadata")
            assert hashlib.sha256(mdata).hexdigest() == meta["sha256"]
    sdist = next(f for f in doc["files"] if f["filename"].endswith(".tar.gz"))
    assert "upload-time" not in sdist and sdist["core-metadata"] is False
    wheel = next(f for f in doc["files"] if f["filename"].startswith("demo_pkg-3.0"))
    assert wheel["yanked"] == "broken <build>" and wheel["upload-time"].endswith("Z")


def test_page_protocol_details(populated: FakeUpstream) -> None:
    status, headers, _ = fetch(populated.url + "Demo_PKG/")
    assert status == 301 and headers["location"] == "/simple/demo-pkg/"
    assert fetch(populated.url + "nope/")[0] == 404
    assert fetch(populated.base + "/files/nope-1.0.tar.gz")[0] == 404
    status, headers, _ = fetch(populated.url + "demo-pkg/", {"Accept": PIP_ACCEPT})
    etag = headers["etag"]
    again = fetch(populated.url + "demo-pkg/", {"Accept": PIP_ACCEPT, "If-None-Match": etag})
    assert again[0] == 304 and again[2] == b""
    # The HTML page is another representation with another ETag.
    assert fetch(populated.url + "demo-pkg/", {"If-None-Match": etag})[0] == 200
    status, headers, body = fetch(populated.url, {"Accept": JSON_V1})
    assert [p["name"] for p in json.loads(body)["projects"]] == ["demo-pkg", "dep-b"]
    populated.html_only = True
    status, headers, _ = fetch(populated.url + "demo-pkg/", {"Accept": PIP_ACCEPT})
    assert headers["content-type"].startswith("text/html")
    status, headers, body = fetch(populated.file_url("dep_b-1.5-py3-none-any.whl"), method="HEAD")
    assert status == 200 and int(headers["content-length"]) > 200_000 and body == b""


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "text/html"),
        ("*/*", "text/html"),
        (PIP_ACCEPT, JSON_V1),
        ("application/vnd.pypi.simple.latest+json", JSON_V1),
        ("application/vnd.pypi.simple.v1+html", "application/vnd.pypi.simple.v1+html"),
        (f"{JSON_V1};q=0, text/html", "text/html"),
    ],
)
def test_negotiation(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


# ----------------------------------------------------------------- faults
def test_status_fault_and_times(populated: FakeUpstream) -> None:
    url = populated.url + "demo-pkg/"
    populated.fault("status", code=503)
    assert fetch(url)[0] == 503
    populated.fault("status", path_prefix="/simple/", code=429, retry_after=1, times=1)
    status, headers, _ = fetch(url)
    assert status == 429 and headers["retry-after"] == "1"
    assert fetch(url)[0] == 503  # the one-shot fault is used up; the global one stays
    populated.fault(None)
    assert fetch(url)[0] == 200


def test_tamper_flips_bytes_keeping_length(populated: FakeUpstream, artifacts_dir: Path) -> None:
    name = "dep_b-1.5-py3-none-any.whl"
    original = (artifacts_dir / name).read_bytes()
    populated.fault("tamper", path_prefix="/files/")
    status, _, data = fetch(populated.file_url(name))
    assert status == 200 and len(data) == len(original) and data != original
    assert hashlib.sha256(data).hexdigest() != hashlib.sha256(original).hexdigest()
    populated.clear_faults()
    assert fetch(populated.file_url(name))[2] == original


@pytest.mark.parametrize("kind", ["truncate", "bad_length", "reset"])
def test_broken_bodies(populated: FakeUpstream, kind: str) -> None:
    populated.fault(kind, path_prefix="/files/")
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        fetch(populated.file_url("dep_b-1.5-py3-none-any.whl"))
    # Pages are unaffected by a fault scoped to /files/.
    assert fetch(populated.url + "dep-b/")[0] == 200


def test_garbage_redirect_loop_and_slow(populated: FakeUpstream) -> None:
    url = populated.url + "demo-pkg/"
    populated.fault("garbage")
    status, headers, body = fetch(url, {"Accept": JSON_V1})
    assert status == 200 and headers["content-type"] == JSON_V1
    with pytest.raises(ValueError):
        json.loads(body)
    populated.fault("redirect_loop")
    status, headers, _ = fetch(url)
    assert status == 302 and headers["location"] == "/simple/demo-pkg/"
    populated.fault("slow", seconds=0.5)
    began = time.monotonic()
    assert fetch(url)[0] == 200
    assert time.monotonic() - began >= 0.5
    populated.fault("slow", seconds=5)
    with pytest.raises(TimeoutError):
        parts = urlsplit(url)
        conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=0.3)
        try:
            conn.request("GET", parts.path)
            conn.getresponse()
        finally:
            conn.close()


# ----------------------------------------------------------------- lifecycle
def test_stop_refuses_and_restart_keeps_port(populated: FakeUpstream) -> None:
    url, port = populated.url, populated.port
    populated.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    populated.start()
    assert populated.url == url
    assert fetch(url + "demo-pkg/")[0] == 200


def test_request_log(populated: FakeUpstream) -> None:
    populated.clear_requests()
    fetch(populated.url + "dep-b/")
    fetch(populated.file_url("dep_b-1.5-py3-none-any.whl"), method="HEAD")
    assert populated.requests == [
        ("GET", "/simple/dep-b/"),
        ("HEAD", "/files/dep_b-1.5-py3-none-any.whl"),
    ]
    assert populated.page_requests("DEP_B") == [("GET", "/simple/dep-b/")]
    assert populated.file_requests() == [("HEAD", "/files/dep_b-1.5-py3-none-any.whl")]


def test_context_manager_stops() -> None:
    with FakeUpstream() as fake:
        port = fake.port
        assert (
            urllib.request.build_opener(urllib.request.ProxyHandler({}))
            .open(fake.url, timeout=5)
            .status
            == 200
        )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ----------------------------------------------------------------- ProxyServer
STUB = """
import http.server, signal, sys, yaml
path = sys.argv[sys.argv.index("--config") + 1]
cfg = yaml.safe_load(open(path))
if cfg.get("fail"):
    print("bad config", flush=True)
    sys.exit(3)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok" if self.path == "/-/health" else b"nope"
        self.send_response(200 if self.path == "/-/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
srv = http.server.HTTPServer((cfg["listen"]["host"], cfg["listen"]["port"]), H)
def hup(*_):
    print("reloaded", yaml.safe_load(open(path))["upstream"]["forward"], flush=True)
def term(*_):
    print("terminating", flush=True)
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, term)
srv.serve_forever()
"""


@pytest.fixture
def stub_command(tmp_path: Path) -> list[str]:
    script = tmp_path / "stub_proxy.py"
    script.write_text(STUB)
    return [sys.executable, str(script)]


def test_proxy_server_lifecycle(tmp_path: Path, stub_command: list[str]) -> None:
    server = ProxyServer(tmp_path / "p", {"upstream": {"forward": True}}, command=stub_command)
    assert server.config["upstream"]["url"].startswith("http://127.0.0.1:")
    with server:
        assert http_get(server.url + "/-/health")[0] == 200
        assert server.index_url == server.url + "/simple/"
        assert server.rss_bytes() > 1_000_000
        server.update_config({"upstream": {"forward": False}})
        server.sighup()
        deadline = time.monotonic() + 10
        while "reloaded False" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reloaded False" in server.log_text()
    assert server.returncode == 0 and "terminating" in server.log_text()
    # Same port again after a restart; kill() is a hard stop.
    server.start()
    assert server.kill() == -9


def test_proxy_server_start_failure_shows_log(tmp_path: Path, stub_command: list[str]) -> None:
    server = ProxyServer(tmp_path / "p", {"fail": True}, command=stub_command)
    with pytest.raises(RuntimeError, match="bad config"):
        server.start(timeout=10)


def test_deep_merge() -> None:
    base: dict[str, Any] = {"a": {"b": 1, "c": [1]}, "d": 2}
    merged = deep_merge(base, {"a": {"b": 5}, "e": None})
    assert merged == {"a": {"b": 5, "c": [1]}, "d": 2, "e": None}
    assert base["a"]["b"] == 1


def test_make_proxy_fixture_builds_stub(make_proxy: Any, stub_command: list[str]) -> None:
    server = make_proxy({"log": {"level": "info"}}, command=stub_command)
    assert server.config["log"] == {"level": "info"}
    assert http_get(server.url + "/-/health")[0] == 200
