"""Issue 10, items 2, 5, 6, 7 and 18: a hostile upstream's files and what reaches clients.

A FakeUpstream (or the bare Recorder below) plays the upstream against the real
proxy subprocess; the Recorder also plays hosts the proxy must never reach, and
its request log (with headers) says whether it was reached, and with what.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import http.server
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from yarl import URL

from proxy.answers import Rendered
from proxy.config import Upstream, build_config
from proxy.download import CHUNK
from proxy.mirror import MAX_PAGE_FILES
from proxy.model import FileEntry, ProjectPage
from proxy.page_memory import PageMemory, entry_bytes
from proxy.pagecache import CachedPage
from proxy.upstream import refusal
from proxy.web_simple import parse_range
from tests.conftest import MakeProxy
from tests.faults.helpers import (
    ADMIN,
    ADMIN_SECRET,
    auth_config,
    basic,
    cached_hashes,
    eventually,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file, wheel_metadata
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)

JSON_V1 = "application/vnd.pypi.simple.v1+json"


# --------------------------------------------------------------------------- tools


@dataclass
class Route:
    """What the Recorder answers for one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: the body ends when the connection does
    hold_at: int | None = None  # stop after this many bytes until Recorder.release is set
    flip_at: int | None = None  # flip this byte (a tampered file)


class Recorder:
    """A bare HTTP/1.0 server on a loopback address: every request is logged
    with its headers; answers come from routes (404 otherwise)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.holding = threading.Event()  # a body reached its hold_at
        self.release = threading.Event()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, *, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                recorder.requests.append((self.command, path, dict(self.headers.items())))
                route = recorder.routes.get(path, Route(b"no such path\n", status=404))
                data = route.body
                if route.flip_at is not None:
                    i = route.flip_at
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                try:
                    if route.hold_at is not None:
                        self.wfile.write(data[: route.hold_at])
                        self.wfile.flush()
                        recorder.holding.set()
                        recorder.release.wait(60)
                        data = data[route.hold_at :]
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    complete: bool


def fetch(url: str, method: str = "GET", headers: Mapping[str, str] | None = None,
          timeout: float = 60.0) -> Reply:
    """One request on a fresh connection; complete=False when the body was cut short."""
    parsed = URL(url)
    conn = http.client.HTTPConnection(parsed.host or "", parsed.port, timeout=timeout)
    try:
        conn.request(method, parsed.raw_path_qs, headers=dict(headers or {}))
        resp = conn.getresponse()
        complete = True
        try:
            body = resp.read()
        except (http.client.IncompleteRead, ConnectionError) as exc:
            body = exc.partial if isinstance(exc, http.client.IncompleteRead) else b""
            complete = False
        return Reply(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()},
                     body, complete)
    finally:
        conn.close()


def entry(filename: str, url: str, data: bytes, *, size: bool = True,
          metadata: bytes | None = None) -> dict[str, Any]:
    """A PEP 691 file entry whose sha256 is data's: only the host is hostile."""
    found: dict[str, Any] = {
        "filename": filename, "url": url,
        "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
    }
    if size:
        found["size"] = len(data)
    if metadata is not None:
        found["core-metadata"] = {"sha256": hashlib.sha256(metadata).hexdigest()}
    return found


def page(name: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {"meta": {"api-version": "1.1"}, "name": name, "files": files}


def page_route(name: str, files: list[dict[str, Any]]) -> Route:
    return Route(orjson.dumps(page(name, files)), headers={"Content-Type": JSON_V1})


def canary(tmp_path: Path, size: int = 50_000) -> bytes:
    """Bytes only the test knows, in a file outside any data_dir."""
    path = tmp_path / "canary" / "secret.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"CANARY-" + hashlib.sha256(str(tmp_path).encode()).hexdigest().encode()
    path.write_bytes((data * (size // len(data) + 1))[:size])
    return path.read_bytes()


# --------------------------------------------------------------------------- item 2


def test_file_urls_and_redirect_hops_off_the_allow_list_are_never_fetched(
    make_proxy: MakeProxy, upstream: FakeUpstream, recorder: Recorder, tmp_path: Path,
) -> None:
    secret = canary(tmp_path)
    recorder.routes["/secret.whl"] = Route(secret)
    recorder.routes["/simple/hopped/"] = page_route("hopped", [])
    target = f"{recorder.base}/secret.whl"  # same host as upstream, another port
    files = {
        # A link straight at another port of the upstream's host.
        "direct-1.0-py3-none-any.whl": target,
        # The upstream's own origin, then a redirect off it (absolute, scheme-relative).
        "hop-1.0-py3-none-any.whl": f"{upstream.base}/files/hop.whl",
        "schemeless-1.0-py3-none-any.whl": f"{upstream.base}/files/schemeless.whl",
        # Not http at all.
        "local-1.0-py3-none-any.whl": (tmp_path / "canary" / "secret.bin").as_uri(),
    }
    upstream.script("/files/hop.whl", b"", status=302, headers={"Location": target})
    upstream.script("/files/schemeless.whl", b"", status=307,
                    headers={"Location": f"//{recorder.host}:{recorder.port}/secret.whl"})
    # Each its own sha256: one hash's transfers queue behind each other.
    upstream.script("/simple/evil/", page("evil", [
        entry(name, url, secret + name.encode()) for name, url in files.items()
    ]))
    # A page that redirects off the upstream's origin.
    upstream.script("/simple/hopped/", b"", status=301,
                    headers={"Location": f"{recorder.base}/simple/hopped/"})
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5}})
    assert fetch(f"{proxy.url}/simple/evil/").status == 200
    for name in files:
        for method in ("GET", "HEAD"):
            reply = fetch(f"{proxy.url}/files/evil/{name}", method)
            assert reply.status == 502, (name, method, reply.status)
            assert "not fetched" in reply.reason, (name, reply.reason)
            assert secret[:20] not in reply.body
    hopped = fetch(f"{proxy.url}/simple/hopped/")
    assert hopped.status == 502 and "file_hosts" in hopped.reason, hopped.reason
    assert recorder.requests == []  # never connected to, for any of them
    assert not cached_hashes(proxy.data_dir)


def test_file_hosts_lets_a_listed_host_serve_files(
    make_proxy: MakeProxy, upstream: FakeUpstream, recorder: Recorder, tmp_path: Path,
) -> None:
    data = canary(tmp_path)
    recorder.routes["/f/listed.whl"] = Route(data)
    upstream.script("/simple/cdn/", page("cdn", [
        entry("cdn-1.0-py3-none-any.whl", f"{recorder.base}/f/listed.whl", data),
    ]))
    proxy = make_proxy({"upstream": {
        "url": upstream.url, "file_hosts": [f"{recorder.host}:{recorder.port}"]}})
    reply = fetch(f"{proxy.url}/files/cdn/cdn-1.0-py3-none-any.whl")
    assert (reply.status, reply.body) == (200, data)
    assert [r[:2] for r in recorder.requests] == [("GET", "/f/listed.whl")]


def test_the_allow_list_in_process() -> None:
    pypi = build_config(None).upstream
    assert pypi.file_hosts == ("files.pythonhosted.org",)
    assert refusal(URL("https://files.pythonhosted.org/packages/a/b.whl"), pypi) is None
    assert refusal(URL("https://pypi.org/other/x.whl"), pypi) is None
    for bad in ("http://files.pythonhosted.org/p/b.whl",  # downgraded from https
                "https://files.pythonhosted.org:8443/p/b.whl",  # another port
                "https://files.pythonhosted.org.evil.example/p/b.whl",
                "https://127.0.0.1/x", "http://169.254.169.254/latest/meta-data/",
                "https://pypi.org:444/simple/", "file:///etc/passwd",
                "https://files.pythonhosted.org@127.0.0.1/x"):
        assert refusal(URL(bad), pypi) is not None, bad
    local = Upstream(url="http://127.0.0.1:3141/root/pypi/+simple/", file_hosts=("[::1]:80",))
    assert refusal(URL("http://127.0.0.1:3141/root/pypi/+f/a.whl"), local) is None
    assert refusal(URL("https://127.0.0.1:3141/x"), local) is not None
    assert refusal(URL("http://[::1]/x"), local) is None
    assert refusal(URL("http://[::1]:81/x"), local) is not None
    # Not the public PyPI: no file host unless configured.
    assert build_config({"upstream": {"url": "https://mirror.example/simple/"}}
                        ).upstream.file_hosts == ()


# --------------------------------------------------------------------------- item 5


def test_a_file_without_a_size_cannot_grow_tmp_past_the_cache_size(
    make_proxy: MakeProxy, recorder: Recorder, tmp_path: Path,
) -> None:
    limit = 2**20
    big = canary(tmp_path, 4 * limit)
    recorder.routes["/files/big.whl"] = Route(big, content_length=False)
    recorder.routes["/simple/nosize/"] = page_route("nosize", [
        entry("nosize-1.0-py3-none-any.whl", f"{recorder.base}/files/big.whl", big, size=False),
    ])
    proxy = make_proxy({"upstream": {"url": f"{recorder.base}/simple/", "timeout": 5},
                        "cache": {"max_bytes": limit}})
    reply = fetch(f"{proxy.url}/files/nosize/nosize-1.0-py3-none-any.whl")
    # Headers go out with the first byte (no size to wait for); the transfer is
    # cut at the limit, so the client sees a failed download.
    assert not (reply.status == 200 and reply.complete), (reply.status, len(reply.body))
    assert len(reply.body) <= limit + CHUNK
    tmp = proxy.data_dir / "tmp"
    assert eventually(lambda: not any(tmp.iterdir()))
    assert not cached_hashes(proxy.data_dir)
    log = proxy.log_text()
    assert "over the 1048576 bytes the proxy takes for it" in log


def test_a_page_size_over_the_cache_is_refused_before_fetching(
    make_proxy: MakeProxy, recorder: Recorder, tmp_path: Path,
) -> None:
    data = canary(tmp_path)
    listed = entry("huge-1.0-py3-none-any.whl", f"{recorder.base}/files/huge.whl", data)
    listed["size"] = 10**15
    recorder.routes["/simple/huge/"] = page_route("huge", [listed])
    recorder.routes["/files/huge.whl"] = Route(data)
    proxy = make_proxy({"upstream": {"url": f"{recorder.base}/simple/"},
                        "cache": {"max_bytes": 2**20}})
    reply = fetch(f"{proxy.url}/files/huge/huge-1.0-py3-none-any.whl")
    assert reply.status == 502 and "the proxy takes" in reply.reason, reply.reason
    assert ("GET", "/files/huge.whl") not in [r[:2] for r in recorder.requests]


def test_transfers_in_flight_hold_at_most_the_cache_size_between_them(
    make_proxy: MakeProxy, recorder: Recorder, tmp_path: Path,
) -> None:
    limit = 2**20
    first, second = canary(tmp_path, 700_000), canary(tmp_path, 600_000)[::-1]
    recorder.routes["/files/first.whl"] = Route(first, hold_at=1000)
    recorder.routes["/files/second.whl"] = Route(second)
    recorder.routes["/simple/pair/"] = page_route("pair", [
        entry("pair-1.0-py3-none-any.whl", f"{recorder.base}/files/first.whl", first),
        entry("pair-2.0-py3-none-any.whl", f"{recorder.base}/files/second.whl", second),
    ])
    proxy = make_proxy({"upstream": {"url": f"{recorder.base}/simple/", "timeout": 30},
                        "cache": {"max_bytes": limit}})
    base = f"{proxy.url}/files/pair/"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(fetch, base + "pair-1.0-py3-none-any.whl")
        assert recorder.holding.wait(20)
        refused = fetch(base + "pair-2.0-py3-none-any.whl")
        assert refused.status == 507 and "cache.max_bytes" in refused.reason, refused.reason
        recorder.release.set()
        assert (held.result().status, held.result().body) == (200, first)
    # Room again once the first is committed (a moment after its last byte
    # went out): the second comes through.
    answers: list[Reply] = []
    assert eventually(lambda: answers.append(fetch(base + "pair-2.0-py3-none-any.whl"))
                      or answers[-1].status != 507)
    assert (answers[-1].status, answers[-1].body) == (200, second)


def test_a_page_listing_too_many_files_is_refused_as_broken(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    anchors = "".join(f'<a href="/f/{i}.tar.gz">many-{i}.tar.gz</a>'
                      for i in range(MAX_PAGE_FILES + 1))
    upstream.script("/simple/many/", f"<html><body>{anchors}</body></html>")
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 60}})
    reply = fetch(f"{proxy.url}/simple/many/", timeout=120)
    assert reply.status == 502, reply.status
    assert "broken page" in reply.reason and "files listed" in reply.reason, reply.reason


def _pypi_like(n: int, *, hashes: int = 1) -> CachedPage:
    """As a parsed PyPI page holds it: every string its own object."""
    files = tuple(
        FileEntry(
            filename=f"pkg-{i}.0-cp312-cp312-manylinux_2_17_x86_64.whl",
            hashes={"sha256": f"{i:064x}", **{f"x{k}": f"{i + k:064x}"
                                              for k in range(hashes - 1)}},
            requires_python=f">=3.{i % 10}", metadata_hashes={"sha256": f"{i + 1:064x}"},
            size=i, upload_time=f"2024-01-01T00:00:{i % 60:02}.000000Z",
            origin=f"https://files.pythonhosted.org/packages/ab/cd/{i:064x}/pkg-{i}.whl",
        ) for i in range(n))
    return CachedPage(ProjectPage("pkg", files, ()), time.time())


@pytest.mark.parametrize("hashes", [1, 20])
def test_the_page_memory_estimate_is_close_to_what_pages_hold(hashes: int) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        entry_ = _pypi_like(5000, hashes=hashes)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.7 * held <= entry_bytes(entry_) <= 1.6 * held, (entry_bytes(entry_), held)


def test_page_memory_is_bounded_in_bytes_and_skips_what_cannot_fit() -> None:
    small, big = _pypi_like(10), _pypi_like(2000)
    budget = 3 * entry_bytes(small) + entry_bytes(small) // 2
    assert entry_bytes(big) > budget
    memory = PageMemory(max_names=1000, max_bytes=budget)
    memory.put("big", big)
    assert memory.get("big") is None and memory.bytes == 0  # bigger than the budget
    for i in range(10):
        memory.put(f"p{i}", small)
        assert memory.bytes <= budget
    assert len(memory) == 3 and memory.get("p9") is small and memory.get("p0") is None
    # Replacing an entry drops renderings made from the old one.
    rendered = Rendered(b"x" * 1000, None, '"e"', "text/html", "upstream")
    memory.keep_rendered("p9", "text/html", ((small,), float("inf"), rendered))
    assert memory.rendered("p9", "text/html") is not None
    memory.put("p9", _pypi_like(10))
    assert memory.rendered("p9", "text/html") is None
    assert memory.bytes <= budget


# --------------------------------------------------------------------------- item 6


def test_a_range_on_a_file_still_arriving_never_returns_unverified_bytes(
    make_proxy: MakeProxy, recorder: Recorder, tmp_path: Path,
) -> None:
    good = canary(tmp_path, 3 * 2**20)
    # Tampered in its second half, held after its first: the transfer is in
    # flight, with the first half (unchanged, so plausible) already in the proxy.
    recorder.routes["/files/t.whl"] = Route(good, hold_at=len(good) // 2,
                                            flip_at=len(good) * 3 // 4)
    recorder.routes["/simple/tampered/"] = page_route("tampered", [
        entry("tampered-1.0-py3-none-any.whl", f"{recorder.base}/files/t.whl", good),
    ])
    proxy = make_proxy({"upstream": {"url": f"{recorder.base}/simple/", "timeout": 30}})
    url = f"{proxy.url}/files/tampered/tampered-1.0-py3-none-any.whl"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        whole = pool.submit(fetch, url)
        assert recorder.holding.wait(20)
        ranged = pool.submit(fetch, url, "GET", {"Range": "bytes=0-9"})
        # Answered before the rest arrived would mean unverified bytes went out.
        early = eventually(ranged.done, timeout=2.0)
        recorder.release.set()
        got = ranged.result()
        assert not early, (got.status, got.body)
        assert got.status == 502 and "sha256" in got.reason, (got.status, got.reason)
        assert good[:10] not in got.body
        cut = whole.result()
        assert not cut.complete and len(cut.body) < len(good)
    assert not cached_hashes(proxy.data_dir)


# --------------------------------------------------------------------------- item 7

USER, PASSWORD = "ci-reader", "upstream-pw-5b1e0c77d2"


def _leaks(text: str | bytes) -> list[str]:
    raw = text.decode(errors="replace") if isinstance(text, bytes) else text
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return [s for s in (PASSWORD, token) if s in raw]


def test_files_from_an_authenticated_upstream_come_through(
    make_proxy: MakeProxy, artifacts_dir: Path,
) -> None:
    with FakeUpstream(require_auth=(USER, PASSWORD)) as guarded:
        wheel = build_wheel(artifacts_dir, "guarded", "1.0")
        guarded.add(wheel)
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{guarded.port}/simple/"
        proxy = make_proxy({"upstream": {"url": url, "timeout": 5}, **auth_config()})
        assert fetch(f"{proxy.url}/simple/guarded/").status == 200
        reply = fetch(f"{proxy.url}/files/guarded/{wheel.name}")
        assert reply.status == 200, reply.reason
        assert hashlib.sha256(reply.body).hexdigest() == sha256_file(wheel)
        meta = fetch(f"{proxy.url}/files/guarded/{wheel.name}.metadata")
        assert (meta.status, meta.body) == (200, wheel_metadata(wheel))
        # The credentials are nowhere a reader of the proxy can look.
        admin = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
        for path in ("/-/health", "/metrics", "/-/guard"):
            answer = fetch(proxy.url + path, headers=admin)
            assert answer.status == 200 and not _leaks(answer.body), path
        proxy.stop()
        assert not _leaks(proxy.log_text())
        assert "starting" in proxy.log_text()


def test_credentials_never_leave_the_upstream_origin(
    make_proxy: MakeProxy, recorder: Recorder, tmp_path: Path,
) -> None:
    data = canary(tmp_path)
    recorder.routes["/cdn/a.whl"] = Route(data)
    with FakeUpstream(require_auth=(USER, PASSWORD)) as guarded:
        guarded.script("/files/moved.whl", b"", status=302,
                       headers={"Location": f"{recorder.base}/cdn/a.whl"})
        guarded.script("/simple/split/", page("split", [
            entry("split-1.0-py3-none-any.whl", f"{recorder.base}/cdn/a.whl", data),
            entry("split-2.0-py3-none-any.whl", f"{guarded.base}/files/moved.whl",
                  data + b"2"),
        ]))
        recorder.routes["/cdn/a.whl"] = Route(data)
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{guarded.port}/simple/"
        proxy = make_proxy({"upstream": {
            "url": url, "file_hosts": [f"{recorder.host}:{recorder.port}"], "timeout": 5}})
        direct = fetch(f"{proxy.url}/files/split/split-1.0-py3-none-any.whl")
        assert (direct.status, direct.body) == (200, data)
        # Redirected from the upstream (which got the credentials) to the file
        # host (which must not): the hash then fails, which is fine here.
        fetch(f"{proxy.url}/files/split/split-2.0-py3-none-any.whl")
        assert ("GET", "/files/moved.whl") in guarded.requests
    assert [r[:2] for r in recorder.requests] == [("GET", "/cdn/a.whl")] * 2
    for _method, _path, headers in recorder.requests:
        assert "authorization" not in {k.lower() for k in headers}, headers
    proxy.stop()
    assert not _leaks(proxy.log_text())


def test_config_errors_never_print_the_credentials() -> None:
    with pytest.raises(Exception) as info:
        build_config({"upstream": {"url": f"ftp://{USER}:{PASSWORD}@x/simple/"}})
    assert not _leaks(str(info.value))
    config = build_config({"upstream": {"url": f"https://{USER}:{PASSWORD}@x.example/s/"}})
    assert config.upstream.url == "https://x.example/s/"
    assert config.upstream.credentials == (USER, PASSWORD)
    assert not _leaks(repr(config))


# --------------------------------------------------------------------------- item 18


@pytest.fixture
def served(make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path
           ) -> tuple[ProxyServer, dict[str, Path]]:
    wheels = {k: build_wheel(artifacts_dir, "heads", v) for k, v in
              (("cached", "1.0"), ("cold", "2.0"), ("ranged", "3.0"), ("gone", "4.0"))}
    for path in wheels.values():
        upstream.add(path)
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5}, **auth_config()})
    private = build_wheel(artifacts_dir, "inhouse", "1.0")
    assert upload(proxy.url, private, "inhouse", "1.0").status == 200
    wheels["private"] = private
    return proxy, wheels


def _file_url(proxy: ProxyServer, wheel: Path) -> str:
    project = "inhouse" if wheel.name.startswith("inhouse") else "heads"
    return f"{proxy.url}/files/{project}/{wheel.name}"


def test_a_suffix_range_of_zero_bytes_is_416_for_every_kind_of_file(
    served: tuple[ProxyServer, dict[str, Path]],
) -> None:
    proxy, wheels = served
    assert fetch(_file_url(proxy, wheels["cached"])).status == 200
    assert eventually(lambda: sha256_file(wheels["cached"]) in cached_hashes(proxy.data_dir))
    for kind in ("cached", "cold", "private"):
        size = wheels[kind].stat().st_size
        for method in ("GET", "HEAD"):
            reply = fetch(_file_url(proxy, wheels[kind]), method, {"Range": "bytes=-0"})
            assert reply.status == 416, (kind, method, reply.status)
            assert reply.headers["content-range"] == f"bytes */{size}"
            assert reply.body == b""


def _same(head: Reply, get: Reply) -> None:
    ignore = {"date", "server", "connection", "keep-alive"}
    h = {k: v for k, v in head.headers.items() if k not in ignore}
    g = {k: v for k, v in get.headers.items() if k not in ignore}
    assert (head.status, h) == (get.status, g)
    assert head.body == b""


def test_head_answers_what_get_would(
    served: tuple[ProxyServer, dict[str, Path]], upstream: FakeUpstream,
) -> None:
    proxy, wheels = served
    assert fetch(_file_url(proxy, wheels["cached"])).status == 200
    assert eventually(lambda: sha256_file(wheels["cached"]) in cached_hashes(proxy.data_dir))
    upstream.fault("status", path_prefix=f"/files/{wheels['gone'].name}", code=404)
    cases: list[tuple[Path, str, dict[str, str]]] = [
        (wheels["cold"], "", {}),  # HEAD first: uncached, then GET
        (wheels["cold"], ".metadata", {}),  # no size on the page
        (wheels["ranged"], "", {"Range": "bytes=5-20"}),
        (wheels["gone"], "", {}),  # upstream lost it
        (wheels["cached"], "", {}),
        (wheels["cached"], "", {"Range": "bytes=-7"}),
        (wheels["cached"], ".metadata", {"Range": "bytes=3-"}),
        (wheels["private"], "", {}),
        (wheels["private"], ".metadata", {"Range": "bytes=0-0"}),
        (wheels["private"], "", {"If-None-Match": f'"{sha256_file(wheels["private"])}"'}),
    ]
    for wheel, suffix, headers in cases:
        url = _file_url(proxy, wheel) + suffix
        _same(fetch(url, "HEAD", headers), fetch(url, "GET", headers))


def test_metadata_from_upstream_is_capped(
    make_proxy: MakeProxy, recorder: Recorder, upstream: FakeUpstream,
) -> None:
    bomb = b"Metadata-Version: 2.1\nName: bomb\n" + b"X" * (17 * 2**20)
    wheel = b"not really a wheel"
    listed = entry("bomb-1.0-py3-none-any.whl", f"{upstream.base}/files/bomb.whl", wheel,
                   metadata=bomb)
    upstream.script("/simple/bomb/", page("bomb", [listed]))
    upstream.script("/files/bomb.whl.metadata", bomb, content_type="text/plain")
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 10}})
    reply = fetch(f"{proxy.url}/files/bomb/bomb-1.0-py3-none-any.whl.metadata")
    assert reply.status == 502 and "the proxy takes" in reply.reason, reply.reason
    # No length given: cut at the cap, never the whole thing.
    recorder.routes["/files/bomb.whl.metadata"] = Route(bomb, content_length=False)
    recorder.routes["/simple/bomb/"] = page_route("bomb", [
        entry("bomb-1.0-py3-none-any.whl", f"{recorder.base}/files/bomb.whl", wheel,
              metadata=bomb)])
    other = make_proxy({"upstream": {"url": f"{recorder.base}/simple/", "timeout": 10}})
    cut = fetch(f"{other.url}/files/bomb/bomb-1.0-py3-none-any.whl.metadata")
    assert not (cut.status == 200 and cut.complete) and len(cut.body) < len(bomb)


def test_eviction_never_turns_a_listed_file_into_a_404(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    # Three files, room for two and a half: every cold fetch evicts one that
    # other clients are being sent to at that very moment.
    wheels = [build_wheel(artifacts_dir, "churn", f"1.{i}", extra_bytes=200_000)
              for i in range(3)]
    for path in wheels:
        upstream.add(path)
    size = max(w.stat().st_size for w in wheels)
    proxy = make_proxy({"upstream": {"url": upstream.url},
                        "cache": {"max_bytes": size * 5 // 2},
                        "log": {"level": "warning", "access_log": False}})
    assert fetch(f"{proxy.url}/simple/churn/").status == 200
    urls = [f"{proxy.url}/files/churn/{w.name}" for w in wheels]

    def hammer(k: int) -> list[int]:
        statuses = []
        deadline = time.monotonic() + 10
        i = k
        while time.monotonic() < deadline:
            statuses.append(fetch(urls[i % 3], "HEAD" if i % 5 == 0 else "GET").status)
            i += 1
        return statuses

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [s for batch in pool.map(hammer, range(8)) for s in batch]
    assert statuses.count(404) == 0, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(200) > len(statuses) * 0.9


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("header", "total", "expected"), [
    ("bytes=0-9", 100, (0, 10)), ("bytes=-10", 100, (90, 100)), ("bytes=90-", 100, (90, 100)),
    ("bytes=-1000", 100, (0, 100)), ("bytes=5-5000", 100, (5, 100)), ("BYTES=1-1", 100, (1, 2)),
    ("bytes=-0", 100, None), ("bytes=100-", 100, None), ("bytes=9-3", 100, None),
    ("bytes=-", 100, None), ("pages=1-2", 100, None), ("bytes=0-1,5-6", 100, None),
    ("bytes=\u0661-2", 100, None), ("bytes=-5", 0, None), ("bytes=0-0", 0, None),
])
def test_parse_range(header: str, total: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, total) == expected
