"""Issue 6.5: hostile input. Fuzzed uploads and names/paths on every route (never a
500, never a file outside data_dir, never a changed stored file), oversized and
slow requests cut off, and the auth rules: per-client rate limit, expired tokens,
no secret ever in the logs.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    ADMIN,
    ADMIN_SECRET,
    EXPIRED,
    EXPIRED_SECRET,
    SECRETS,
    WRITER,
    WRITER_SECRET,
    Answer,
    audit_store,
    auth_config,
    basic,
    call,
    eventually,
    multipart,
    temp_files,
    upload,
    upload_fields,
)
from tests.support.artifacts import build_wheel
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(240)

IDLE = 3.0  # limits.idle_timeout for these proxies
SLACK = 3.0
# Marks every hostile file name, so that a file created from one is found anywhere.
MARK = "pwn" + uuid.uuid4().hex[:10]

CONFUSABLES = [
    "\uff0e\uff0e\uff0f",  # fullwidth ../
    "\u2024\u2024/",  # one-dot leaders
    "..\u2215",  # division slash
    "..\u2044",  # fraction slash
    "\u2025",  # two-dot leader
    "..\uff3c",  # fullwidth backslash
    "\u0441\u0440\u0443",  # Cyrillic lookalikes
    "a\u200bb",  # zero-width space
    "\u202e",  # right-to-left override
]


def _nasty(outside: Path) -> list[str]:
    return [
        "..", ".", "../", "../..", f"../../outside/{MARK}.whl", f"../{MARK}-1.0-py3-none-any.whl",
        f"{outside}/{MARK}-1.0-py3-none-any.whl", f"/tmp/{MARK}-1.0-py3-none-any.whl",
        f"..\\..\\{MARK}.whl", f"{MARK}\x00.whl", f"{MARK}-1.0-py3-none-any.whl\x00.txt",
        "%2e%2e%2f", "%252e%252e%252f", "..%2f..%2f", "%00", "\x00", "/", "//", "\\",
        f"{MARK}\r\nX-Injected: yes", f'{MARK}"; filename="../../{MARK}.whl',
        "\r\n\r\n", f"{MARK}\nContent-Type: text/html", "a" * 300, "", " ", "~", "$HOME",
        "${jndi:ldap://127.0.0.1:9/x}", "' OR 1=1 --", "<script>alert(1)</script>",
        "CON", "NUL.whl", "index.json", ".lock", ".tmp-x", "files", "http:x", "https://x/",
        "javascript:x", "?a=b", "#frag", "victim-pkg/../../x",
        *CONFUSABLES, *(c + MARK for c in CONFUSABLES),
    ]


def hostile(outside: Path) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_nasty(outside)),
        st.text(max_size=40),
        st.lists(st.sampled_from(["..", "/", "\\", "%2f", "\x00", ".", MARK, "\uff0e", "a"]),
                 max_size=8).map("".join),
    )


@pytest.fixture
def victim(make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
           tmp_path: Path) -> tuple[ProxyServer, Path, dict[Path, bytes]]:
    """A proxy with one stored private file, and a snapshot of everything it stores."""
    upstream.add(build_wheel(artifacts_dir / "up", "public-pkg", "1.0"))
    config: dict[str, Any] = auth_config()
    config["upstream"] = {"url": upstream.url, "timeout": 5}
    config["limits"] = {"max_upload": "16MiB", "idle_timeout": IDLE}
    config["log"] = {"level": "info"}
    proxy = make_proxy(config)
    wheel = build_wheel(artifacts_dir, "victim-pkg", "1.0")
    assert upload(proxy.url, wheel, "victim-pkg", "1.0").status == 200
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("outside data_dir\n")
    # .generation is the store's change counter, not stored data: it moves with
    # every write attempt, kept or refused.
    snapshot = {p: p.read_bytes() for p in (proxy.data_dir / "private").rglob("*")
                if p.is_file() and p.name != ".generation"}
    return proxy, outside, snapshot


def _entries(index: bytes) -> dict[str, Any]:
    return {f["filename"]: f for f in orjson.loads(index)["files"]}


def _assert_untouched(proxy: ProxyServer, outside: Path, snapshot: dict[Path, bytes],
                      tmp_path: Path) -> None:
    for path, data in snapshot.items():
        if path.name == "index.json":
            # A well-formed upload of a new file may add an entry; none may change.
            before, now = _entries(data), _entries(path.read_bytes())
            assert {k: now.get(k) for k in before} == before, f"index changed: {path}"
            for filename in set(now) - set(before):
                assert "/" not in filename and MARK not in filename, filename
        else:
            assert path.read_bytes() == data, f"stored file changed: {path}"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    marked = list(tmp_path.rglob(f"*{MARK}*"))
    marked += [p for p in Path("/tmp").glob(f"*{MARK}*")]
    assert not marked, marked
    # The proxy's own directory holds its config, its log and data_dir, nothing else.
    assert {p.name for p in proxy.tmp_path.iterdir()} <= {"config.yaml", "server.log", "data"}
    audit = audit_store(proxy.data_dir)
    assert not audit.problems and not audit.unlisted, audit
    assert eventually(lambda: not temp_files(proxy.data_dir))


def _no_server_error(answer: Answer, what: object) -> None:
    assert answer.status < 500 or answer.status == 507, (what, answer.status, answer.body[:300])
    assert "x-injected" not in answer.headers, what


# About 7 ms a case for uploads and 3 ms for paths on the CI machine.
FUZZ_UPLOADS = settings(
    max_examples=1500, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_PATHS = settings(FUZZ_UPLOADS, max_examples=2500)


def test_fuzzed_uploads_never_500_never_escape_never_change_a_stored_file(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], artifacts_dir: Path, tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    proxy, outside, snapshot = victim
    wheel_bytes = build_wheel(artifacts_dir / "w", "victim-pkg", "1.0",
                              module_text="x = 2\n").read_bytes()
    auth = basic(WRITER, WRITER_SECRET)
    tried = [0]

    # Mostly well-formed, so that most cases get past the multipart parser to
    # the form's checks: the values are what is hostile.
    part_header = st.one_of(st.just(""), st.sampled_from([
        "Content-Type: application/octet-stream\r\n", "Content-Transfer-Encoding: base64\r\n",
        "Content-Type: multipart/mixed; boundary=zz\r\n", "Content-Length: 99999999\r\n",
        "Content-Disposition: attachment\r\n", "X-Injected: yes\r\n",
    ]))

    @st.composite
    def bodies(draw: Callable[..., Any]) -> tuple[bytes, str]:
        """A multipart body: a plausible twine form with hostile values, or worse."""

        def rarely() -> bool:
            # One time in five: the checks run in turn, and a case should often
            # get past most of them with one hostile thing left.
            return bool(draw(st.sampled_from([False, False, False, False, True])))

        def either(valid: str) -> str:
            return str(draw(hostile(outside))) if rarely() else valid

        filename = draw(st.one_of(
            st.just("victim_pkg-1.0-py3-none-any.whl"), hostile(outside),
            hostile(outside).map(lambda s: s + "-1.0-py3-none-any.whl"),
            hostile(outside).map(lambda s: "victim_pkg-1.0-py3-none-any.whl" + s),
        ))
        content = draw(st.one_of(st.just(wheel_bytes), st.binary(max_size=2048)))
        fields = [
            (":action", either("file_upload")), ("protocol_version", "1"),
            ("metadata_version", either("2.1")),
            ("name", either("victim-pkg")), ("version", either("1.0")),
            ("filetype", either("bdist_wheel")), ("pyversion", "py3"),
            ("sha256_digest", either(hashlib.sha256(content).hexdigest())),
        ]
        extra = draw(st.lists(st.tuples(hostile(outside), hostile(outside)), max_size=3)
                     ) if rarely() else []
        fields = draw(st.permutations(fields + extra))
        odd_parts = rarely()
        boundary = draw(st.sampled_from(["x", "a" * 70, "--", "b\"q", "\u00e9"])
                        ) if rarely() else uuid.uuid4().hex
        out: list[bytes] = []
        for key, value in fields:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n'
                       .encode("utf-8", "surrogatepass")
                       + (draw(part_header).encode() if odd_parts else b"")
                       + b"\r\n" + value.encode("utf-8", "surrogatepass") + b"\r\n")
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="content"; '
                   f'filename="{filename}"\r\n'.encode("utf-8", "surrogatepass")
                   + (draw(part_header).encode() if odd_parts else b"")
                   + b"\r\n" + content + b"\r\n")
        out.append(f"--{boundary}--\r\n".encode("utf-8", "surrogatepass"))
        body = b"".join(out)
        mangle = draw(st.sampled_from(["cut", "junk", "raw"])) if rarely() else "none"
        if mangle == "cut":
            body = body[: draw(st.integers(0, len(body)))]
        elif mangle == "junk":
            at = draw(st.integers(0, len(body)))
            body = body[:at] + draw(st.binary(max_size=200)) + body[at:]
        elif mangle == "raw":
            body = draw(st.binary(max_size=4096))
        ctype = draw(st.sampled_from([
            f'multipart/form-data; boundary="{boundary}"', "multipart/form-data",
            "application/x-www-form-urlencoded", "text/plain", "multipart/mixed; boundary=x",
        ])) if rarely() else f"multipart/form-data; boundary={boundary}"
        try:
            ctype.encode("latin-1")
        except UnicodeEncodeError:
            ctype = "multipart/form-data; boundary=" + quote(boundary)
        return body, ctype

    @FUZZ_UPLOADS
    @given(bodies(), st.sampled_from(["/", "/legacy/"]))
    def fuzz(request: tuple[bytes, str], path: str) -> None:
        body, ctype = request
        tried[0] += 1
        answer = call(proxy.url + path, "POST", body=body, timeout=30,
                      headers={"Content-Type": ctype, "Authorization": auth})
        _no_server_error(answer, (path, ctype, body[:200]))

    fuzz()
    _assert_untouched(proxy, outside, snapshot, tmp_path)
    assert "unhandled error" not in proxy.log_text()
    assert "Traceback" not in proxy.log_text()
    figures["fuzz: multipart upload cases"] = tried[0]


ROUTES = [
    ("GET", "/simple/{a}/", None),
    ("GET", "/simple/{a}", None),
    ("HEAD", "/simple/{a}/", None),
    ("GET", "/files/{a}/{b}", None),
    ("HEAD", "/files/{a}/{b}", None),
    ("GET", "/files/victim-pkg/{b}", None),
    ("POST", "/-/yank/{a}/{b}", ADMIN),
    ("POST", "/-/unyank/{a}/{b}", ADMIN),
    ("DELETE", "/-/files/{a}/{b}", ADMIN),
    ("DELETE", "/-/files/victim-pkg/{b}", ADMIN),
    ("DELETE", "/-/projects/{a}", ADMIN),
    ("POST", "/-/yank/victim-pkg/{b}", ADMIN),
    ("GET", "/-/guard?{a}={b}", ADMIN),
    ("GET", "/{a}/{b}", None),
]


def _segment(text: str, style: str) -> str:
    if style == "quoted":
        return quote(text, safe="")
    if style == "double":
        return quote(quote(text, safe=""), safe="")
    # "raw": as typed, only what http.client cannot send at all is escaped.
    return "".join(
        ch if 32 < ord(ch) < 127 and ch not in "?#" else quote(ch, safe="") for ch in text
    )


def test_fuzzed_names_and_paths_on_every_route(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    proxy, outside, snapshot = victim
    admin = basic(ADMIN, ADMIN_SECRET)
    config_text = proxy.config_path.read_text()
    tried = [0]

    @FUZZ_PATHS
    @given(st.sampled_from(ROUTES), hostile(outside), hostile(outside),
           st.sampled_from(["quoted", "double", "raw"]))
    def fuzz(route: tuple[str, str, str | None], a: str, b: str, style: str) -> None:
        method, template, user = route
        path = template.format(a=_segment(a, style), b=_segment(b, style))
        headers = {"Authorization": admin} if user else {}
        tried[0] += 1
        answer = call(proxy.url + path, method, headers=headers, timeout=30)
        _no_server_error(answer, (method, path))
        assert b"outside data_dir" not in answer.body, path
        assert b"sha256:" not in answer.body or path.startswith("/-/guard"), path
        assert config_text.encode() not in answer.body, path

    fuzz()
    _assert_untouched(proxy, outside, snapshot, tmp_path)
    assert "unhandled error" not in proxy.log_text()
    figures["fuzz: name/path cases over every route"] = tried[0]


TRAVERSALS = [
    "..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "..%2f..%2f..%2fetc%2fpasswd",
    "..%2f..%2fconfig.yaml", "%2e%2e%2f%2e%2e%2fconfig.yaml", "..%5c..%5cconfig.yaml",
    "%252e%252e%252fconfig.yaml", "..%00", "%00", "..%c0%af..%c0%afconfig.yaml",
    "%ef%bc%8e%ef%bc%8e%ef%bc%8fconfig.yaml", "....%2f%2fconfig.yaml",
]


def test_path_traversal_in_every_url_route(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    proxy, outside, snapshot = victim
    admin = basic(ADMIN, ADMIN_SECRET)
    targets = {
        "../config.yaml": proxy.config_path.read_bytes(),
        "index.json": (proxy.data_dir / "private" / "victim-pkg" / "index.json").read_bytes(),
    }
    seen = 0
    for method, template, user in ROUTES:
        for t in TRAVERSALS:
            for a, b in ((t, "config.yaml"), ("victim-pkg", t), (t, t),
                         ("victim-pkg", t + "%2findex.json"), (t, "..%2findex.json")):
                path = template.format(a=a, b=b)
                answer = call(proxy.url + path, method, timeout=30,
                              headers={"Authorization": admin} if user else {})
                seen += 1
                _no_server_error(answer, (method, path))
                for secret in targets.values():
                    assert secret not in answer.body, path
    assert seen >= len(ROUTES) * len(TRAVERSALS) * 5
    _assert_untouched(proxy, outside, snapshot, tmp_path)
    figures["fuzz: fixed traversal requests over every route"] = seen


def test_digest_fields_that_are_not_ascii_hex_are_400(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], artifacts_dir: Path, tmp_path: Path,
) -> None:
    """Found by the upload fuzz: hmac.compare_digest raises TypeError on non-ASCII str."""
    proxy, outside, snapshot = victim
    wheel = build_wheel(artifacts_dir / "d", "victim-pkg", "2.0")
    content = wheel.read_bytes()
    for digest in ("\u0080", "\u00e9" * 64, "\uff10" * 64):
        fields = [(k, digest if k == "sha256_digest" else v)
                  for k, v in upload_fields("victim-pkg", "2.0", content)]
        body, ctype = multipart(fields, (wheel.name, content))
        answer = call(proxy.url + "/", "POST", body=body, headers={
            "Content-Type": ctype, "Authorization": basic(WRITER, WRITER_SECRET)})
        assert answer.status == 400, (digest, answer.status, answer.body)
    _assert_untouched(proxy, outside, snapshot, tmp_path)


def test_names_that_are_not_project_names_never_reach_upstream(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], upstream: FakeUpstream,
) -> None:
    """Found by the path fuzz: a name is pasted into the upstream URL unquoted, so
    'javascript:x' makes a non-HTTP URL (502), and '?a=b' or '%2e%2e' make the
    proxy fetch the upstream's root index (on PyPI, tens of megabytes) or '/'."""
    proxy, _outside, _snapshot = victim
    upstream.clear_requests()
    for raw in ("javascript%3Ax", "%3Fa%3Db", "%252e%252e", "a%2523b", "%2525", "http%3Ax"):
        for path in (f"/simple/{raw}/", f"/files/{raw}/x-1.0.tar.gz"):
            answer = call(proxy.url + path)
            assert answer.status == 404, (path, answer.status, answer.body)
    assert upstream.requests == [], upstream.requests


def test_huge_fields_and_too_many_fields_are_refused(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], tmp_path: Path,
) -> None:
    proxy, outside, snapshot = victim
    auth = basic(WRITER, WRITER_SECRET)
    rss_before = proxy.rss_bytes()
    fields = [*upload_fields("victim-pkg", "2.0", b"x"), ("description", "d" * (10 * 2**20))]
    body, ctype = multipart(fields, ("victim_pkg-2.0-py3-none-any.whl", b"x"))
    answer = call(proxy.url + "/", "POST", body=body, timeout=60,
                  headers={"Content-Type": ctype, "Authorization": auth})
    assert answer.status == 400, answer.status

    many = [(f"f{i}", "v") for i in range(100_000)]
    body, ctype = multipart([*upload_fields("victim-pkg", "2.0", b"x"), *many], None)
    answer = call(proxy.url + "/", "POST", body=body, timeout=60,
                  headers={"Content-Type": ctype, "Authorization": auth})
    assert answer.status == 400, answer.status
    assert b"Too many form fields" in answer.body
    assert proxy.rss_bytes() - rss_before < 64 * 2**20  # neither was held in memory
    _assert_untouched(proxy, outside, snapshot, tmp_path)


def _raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes; return what came back before the server closed (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionError, TimeoutError):
                return got
            if not chunk:
                return got
            got += chunk


def test_oversized_request_line_and_headers_are_refused(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]],
) -> None:
    proxy, _outside, _snapshot = victim
    cases = {
        "long request line": b"GET /simple/" + b"a" * 100_000 + b"/ HTTP/1.1\r\nHost: x\r\n\r\n",
        "one huge header": b"GET /simple/ HTTP/1.1\r\nHost: x\r\nX-Big: "
                           + b"b" * 100_000 + b"\r\n\r\n",
        "thousands of headers": b"GET /simple/ HTTP/1.1\r\nHost: x\r\n"
                                + b"".join(b"X-H%d: v\r\n" % i for i in range(5_000)) + b"\r\n",
        "huge auth header": b"GET /simple/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                            + base64.b64encode(b"u:" + b"p" * 60_000) + b"\r\n\r\n",
    }
    for what, data in cases.items():
        started = time.monotonic()
        got = _raw(proxy.port, data)
        status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.") else None
        assert status is not None and 400 <= status < 500, (what, got[:200])
        assert time.monotonic() - started < SLACK, what
    assert call(proxy.url + "/-/health").status == 200


def test_slowloris_headers_and_bodies_are_cut_off(
    victim: tuple[ProxyServer, Path, dict[Path, bytes]], artifacts_dir: Path,
) -> None:
    proxy, _outside, _snapshot = victim
    answered: dict[str, tuple[float, bytes]] = {}
    closed: dict[str, float] = {}

    def dribble(name: str, head: bytes, body: bytes, pause: float) -> None:
        """Send head at once, then body a byte at a time; note when the server
        answers and when it closes the connection."""
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
            sock.sendall(head)
            started = time.monotonic()
            sock.settimeout(pause or 60)
            try:
                for i in range(len(body)):
                    sock.sendall(body[i:i + 1])
                    try:
                        got = sock.recv(65536)
                    except TimeoutError:
                        continue  # nothing yet: go on dribbling
                    if not got:
                        break
                    answered.setdefault(name, (time.monotonic() - started, got))
                sock.settimeout(60)
                while got := sock.recv(65536):
                    answered.setdefault(name, (time.monotonic() - started, got))
            except ConnectionError:
                pass
            closed[name] = time.monotonic() - started

    content = build_wheel(artifacts_dir / "slow", "victim-pkg", "3.0").read_bytes()
    body, ctype = multipart(upload_fields("victim-pkg", "3.0", content),
                            ("victim_pkg-3.0-py3-none-any.whl", content))
    upload_head = (
        f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
        f"\r\nAuthorization: {basic(WRITER, WRITER_SECRET)}\r\n\r\n"
    ).encode()
    half = len(body) // 2
    jobs = {
        # Request headers one byte every 0.5 s: never completes a request.
        "headers": (b"", b"GET /simple/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 500, 0.5),
        # A connection that never says anything.
        "silent": (b"", b"", 0.0),
        # An upload that sends half its body at once, then stops dead.
        "body-stall": (upload_head + body[:half], b"", 0.0),
        # An upload body that trickles one byte every IDLE + 1 seconds.
        "body-trickle": (upload_head + body[:half], body[half:], IDLE + 1.0),
    }
    threads = [threading.Thread(target=dribble, args=(name, *args)) for name, args in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(closed) == set(jobs)
    # A stalled request head: the connection is closed, with no answer.
    for name in ("headers", "silent"):
        assert closed[name] <= IDLE + SLACK, (name, closed[name])
        assert name not in answered, answered[name]
    # A stalled body: 408 once it has been silent for the idle timeout; aiohttp
    # then waits up to its lingering time (10 s) for the rest before closing.
    for name in ("body-stall", "body-trickle"):
        at, got = answered[name]
        assert got.startswith(b"HTTP/1.1 408"), (name, got[:100])
        assert at <= IDLE + SLACK + (IDLE + 1.0 if name == "body-trickle" else 0), (name, at)
        assert closed[name] <= at + 10 + SLACK, (name, closed[name])
    assert eventually(lambda: not temp_files(proxy.data_dir))
    assert call(proxy.url + "/-/health").status == 200


def test_auth_rate_limit_per_client_expired_tokens_and_no_secret_in_logs(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    config: dict[str, Any] = auth_config()
    config["upstream"] = {"url": upstream.url}
    config["auth"]["anonymous_read"] = False
    proxy = make_proxy(config)
    guard = proxy.url + "/-/guard"
    wrong = [f"ig_wrong-{i}-{uuid.uuid4().hex}" for i in range(25)]

    statuses = [call(guard, headers={"Authorization": basic(ADMIN, w)}).status for w in wrong]
    assert statuses[:20] == [401] * 20, statuses
    assert set(statuses[20:]) == {429}, statuses
    # Only failures are limited: the right token from the same client still
    # passes (issue 10, item 15), the wrong ones keep getting 429...
    assert call(guard, headers={"Authorization": basic(ADMIN, ADMIN_SECRET)}).status == 200
    assert call(guard, headers={"Authorization": basic(ADMIN, wrong[0])}).status == 429
    # ...and another client (another loopback address) is not affected.
    other = call(guard, headers={"Authorization": basic(ADMIN, ADMIN_SECRET)}, source="127.0.0.2")
    assert other.status == 200, other.status

    expired = call(proxy.url + "/simple/", source="127.0.0.3",
                   headers={"Authorization": basic(EXPIRED, EXPIRED_SECRET)})
    assert expired.status == 401 and b"expired" in expired.body
    token_user = call(proxy.url + "/simple/", source="127.0.0.3",
                      headers={"Authorization": basic("__token__", EXPIRED_SECRET)})
    assert token_user.status == 401

    # Secrets offered in every way a careless client might: all refused or
    # accepted, none written down.
    wheel = build_wheel(artifacts_dir, "acme-logged", "1.0")
    assert upload(proxy.url, wheel, "acme-logged", "1.0", source="127.0.0.4").status == 200
    for how in (
        {"Authorization": basic(WRITER_SECRET, "x")},
        {"Authorization": f"Bearer {WRITER_SECRET}"},
        {"Authorization": f"Basic {WRITER_SECRET}"},
        {"Authorization": f"token {ADMIN_SECRET}"},
        {"X-Api-Key": ADMIN_SECRET},
    ):
        call(proxy.url + "/simple/acme-logged/", headers=how, source="127.0.0.4")
    call(proxy.url + f"/simple/acme-logged/?token={WRITER_SECRET}", source="127.0.0.4",
         headers={"Authorization": basic(WRITER, WRITER_SECRET)})
    body, ctype = multipart([*upload_fields("acme-logged", "1.0", b"x"),
                             ("password", ADMIN_SECRET)], ("bad name.whl", b"x"))
    call(proxy.url + "/", "POST", body=body, source="127.0.0.4",
         headers={"Content-Type": ctype, "Authorization": basic(WRITER, WRITER_SECRET)})

    log = proxy.log_text()
    assert '"status":429' in log and '"status":401' in log  # the log did see these requests
    for secret in (*SECRETS, *wrong):
        for form in (secret, base64.b64encode(secret.encode()).decode(),
                     quote(secret, safe=""), hashlib.sha256(secret.encode()).hexdigest()):
            assert form not in log, "a secret (or its hash) reached the log"
        for user in (WRITER, ADMIN, EXPIRED, "__token__"):
            assert base64.b64encode(f"{user}:{secret}".encode()).decode() not in log
