"""Issue 6.6: SIGTERM stops accepting, lets downloads and uploads in flight finish
(up to the grace period), then the process exits 0."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import SHUTDOWN_GRACE
from tests.conftest import MakeProxy
from tests.faults.helpers import (
    WRITER,
    WRITER_SECRET,
    audit_store,
    auth_config,
    basic,
    call,
    eventually,
    multipart,
    port_refuses,
    upload_fields,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(150)

SLACK = 5.0


def _read_response(sock: socket.socket, pace: float = 0.0) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a Content-Length, read with
    `pace` seconds between 64 KiB reads (a slow client)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.strip().lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(body)} of {length} bytes")
        body += chunk
        if pace:
            time.sleep(pace)
    return status, body


def _slow_download(port: int, path: str, pace: float, out: dict[str, Any]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out["sent"] = True
            out["status"], out["body"] = _read_response(sock, pace)
    except OSError as exc:
        out["error"] = repr(exc)


def _slow_upload(port: int, wheel: Path, pieces: int, pause: float,
                 out: dict[str, Any]) -> None:
    content = wheel.read_bytes()
    body, ctype = multipart(upload_fields("drain-me", "1.0", content), (wheel.name, content))
    head = (
        f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: {basic(WRITER, WRITER_SECRET)}\r\n\r\n"
    ).encode()
    step = -(-len(body) // pieces)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head)
            for pos in range(0, len(body), step):
                sock.sendall(body[pos:pos + step])
                out["sent"] = pos + step
                time.sleep(pause)
            out["status"], out["body"] = _read_response(sock)
    except OSError as exc:
        out["error"] = repr(exc)


def _wait_exit(proxy: ProxyServer, timeout: float) -> int | None:
    eventually(lambda: proxy.returncode is not None, timeout=timeout, step=0.1)
    return proxy.returncode


def test_sigterm_drains_downloads_and_uploads_then_exits_0(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    cold = build_wheel(artifacts_dir, "cold-dl", "1.0", extra_bytes=2 * 2**20)
    warm = build_wheel(artifacts_dir, "warm-dl", "1.0", extra_bytes=24 * 2**20)
    for wheel in (cold, warm):
        upstream.add(wheel, with_metadata=False)
    config: dict[str, Any] = auth_config()
    config["upstream"] = {"url": upstream.url, "timeout": 10}
    proxy = make_proxy(config)
    assert call(f"{proxy.url}/simple/cold-dl/").status == 200
    assert call(f"{proxy.url}/files/warm-dl/{warm.name}").status == 200  # now cached
    upstream.fault("slow", path_prefix=f"/files/{cold.name}", seconds=3, phase="body")
    to_upload = build_wheel(artifacts_dir / "up", "drain-me", "1.0", extra_bytes=2**20)

    cold_out: dict[str, Any] = {}
    warm_out: dict[str, Any] = {}
    up_out: dict[str, Any] = {}
    threads = [
        # An uncached file that takes 3 s to come from upstream.
        threading.Thread(target=_slow_download,
                         args=(proxy.port, f"/files/cold-dl/{cold.name}", 0.0, cold_out)),
        # A cached file read slowly by its client (about 4 s).
        threading.Thread(target=_slow_download,
                         args=(proxy.port, f"/files/warm-dl/{warm.name}", 0.01, warm_out)),
        # An upload whose body takes about 3 s to arrive.
        threading.Thread(target=_slow_upload, args=(proxy.port, to_upload, 10, 0.3, up_out)),
    ]
    for t in threads:
        t.start()
    assert eventually(lambda: bool(cold_out.get("sent") and warm_out.get("sent")
                                   and up_out.get("sent")))
    time.sleep(0.5)
    os.kill(proxy.pid, signal.SIGTERM)
    sigterm_at = time.monotonic()
    assert eventually(lambda: port_refuses(proxy.port), timeout=2), "still accepting"
    assert proxy.returncode is None  # still draining

    for t in threads:
        t.join(timeout=SHUTDOWN_GRACE + SLACK)
    assert cold_out.get("status") == 200, cold_out.get("error")
    assert hashlib.sha256(cold_out["body"]).hexdigest() == sha256_file(cold)
    assert warm_out.get("status") == 200, warm_out.get("error")
    assert hashlib.sha256(warm_out["body"]).hexdigest() == sha256_file(warm)
    assert up_out.get("status") == 200, (up_out.get("error"), up_out.get("body"))

    assert _wait_exit(proxy, SHUTDOWN_GRACE + SLACK) == 0
    assert time.monotonic() - sigterm_at < SHUTDOWN_GRACE
    proxy.stop()
    audit = audit_store(proxy.data_dir)
    assert audit.listed.get(f"drain-me/{to_upload.name}") == sha256_file(to_upload)
    assert not audit.problems
    assert "Traceback" not in proxy.log_text()


def test_sigterm_cuts_a_client_that_never_reads_after_the_grace_period(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    with _client_that_never_reads(proxy, upstream, artifacts_dir):
        time.sleep(0.5)  # the server is now blocked on a full socket buffer
        os.kill(proxy.pid, signal.SIGTERM)
        started = time.monotonic()
        assert eventually(lambda: port_refuses(proxy.port), timeout=2)
        code = _wait_exit(proxy, SHUTDOWN_GRACE + 15)
        elapsed = time.monotonic() - started
    assert code == 0
    # Waited the grace period for the transfer, then cut it.
    assert SHUTDOWN_GRACE - 1 <= elapsed <= SHUTDOWN_GRACE + SLACK, elapsed
    assert "cutting requests in flight" in proxy.log_text()


def test_second_sigterm_cuts_the_drain_short(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    with _client_that_never_reads(proxy, upstream, artifacts_dir):
        os.kill(proxy.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert proxy.returncode is None  # draining: the stuck transfer is in flight
        os.kill(proxy.pid, signal.SIGTERM)
        started = time.monotonic()
        code = _wait_exit(proxy, 15)
    assert code == 0
    assert time.monotonic() - started < SLACK


@contextlib.contextmanager
def _client_that_never_reads(
    proxy: ProxyServer, upstream: FakeUpstream, artifacts_dir: Path,
) -> Iterator[None]:
    """A connection with a small receive buffer, in the middle of a cached 48 MB
    download it never reads: the server cannot finish that response."""
    big = build_wheel(artifacts_dir, "stuck-dl", "1.0", extra_bytes=48 * 2**20)
    upstream.add(big, with_metadata=False)
    assert call(f"{proxy.url}/files/stuck-dl/{big.name}").status == 200  # cached
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(f"GET /files/stuck-dl/{big.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        yield
