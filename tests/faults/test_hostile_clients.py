"""Issue 10, item 16: connections and logs. Many idle connections must not stop the
proxy nor flood its log; a malformed request is one log line without a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import WRITER, WRITER_SECRET, auth_config, basic, call
from tests.support.server import ProxyServer

pytestmark = pytest.mark.timeout(180)


def _limited(soft: int, hard: int) -> list[str]:
    """The proxy command under an open-file limit, as a service manager would start it."""
    return ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-m", "proxy", "serve"]


@contextlib.contextmanager
def _idle_sockets(port: int, count: int, partial: bytes = b"") -> Iterator[list[socket.socket]]:
    """count connections that say nothing (or begin a request and stall)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if partial:
                sock.sendall(partial)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/<pid>/limits")


def _lines(proxy: ProxyServer) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]


def test_idle_connections_past_the_soft_fd_limit_do_not_stop_the_proxy(
    make_proxy: MakeProxy,
) -> None:
    """Started with a soft limit of 256 open files (hard 4096): the proxy raises
    it at start, so 400 idle connections leave it answering. On the code before,
    asyncio met EMFILE and wrote 100k ERROR lines in seconds."""
    proxy = make_proxy({"log": {"level": "info"}}, command=_limited(256, 4096))
    before = len(_lines(proxy))
    with _idle_sockets(proxy.port, 400):
        answer = call(proxy.url + "/-/health", timeout=10)
        assert answer.status == 200
        time.sleep(1)  # a flood, if any, would be under way by now
        assert len(_lines(proxy)) - before < 20, proxy.log_tail(5)[:3000]
    assert _open_files_limit(proxy.pid) == (4096, 4096)


def test_past_max_connections_idle_ones_make_room_and_busy_ones_get_503(
    make_proxy: MakeProxy,
) -> None:
    proxy = make_proxy({"listen": {"max_connections": 8}, "log": {"level": "info"},
                        **auth_config()})
    # 30 connections that never finish their request head: each newcomer past
    # the cap closes the oldest of them, so the proxy still answers at once.
    with _idle_sockets(proxy.port, 30, b"GET /simple/ HTTP/1.1\r\nHost: x\r\n") as socks:
        assert call(proxy.url + "/-/health", timeout=10).status == 200
        closed = 0
        for sock in socks:
            sock.settimeout(0.01)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # still open
        assert closed >= 30 - 8, closed
    # Eight uploads in flight (headers sent, body pending) fill the cap with busy
    # connections: the next one is told 503 and closed, not left hanging.
    head = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: 100000\r\nAuthorization: {basic(WRITER, WRITER_SECRET)}\r\n\r\n"
            "--b\r\n").encode()
    with _idle_sockets(proxy.port, 8, head):
        time.sleep(0.5)  # the eight handlers are reading their bodies
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as late:
            late.sendall(b"GET /-/health HTTP/1.1\r\nHost: x\r\n\r\n")
            got = late.recv(4096)
        assert got.startswith(b"HTTP/1.1 503"), got[:100]
    assert call(proxy.url + "/-/health", timeout=10).status == 200
    said = [line for line in _lines(proxy) if line.get("msg") == "connection cap reached"]
    assert 1 <= len(said) <= 2, said  # at most one line a minute, not one per connection


def test_malformed_requests_are_one_log_line_each_without_a_traceback(
    make_proxy: MakeProxy,
) -> None:
    secret = base64.b64encode(b"ci:s3cret-in-a-bad-header").decode()
    garbage = [
        b"GARBAGE\r\n\r\n",
        b"GET /simple/ HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"GET /simple/ HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /simple/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + secret.encode()
        + b"\x01\r\n\r\n",
        b"GET /simple/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    ] * 5
    # With the access log (its 400 line is the one line) and without it (then
    # the proxy's own "malformed request" line, with the error's name, is).
    for access_log, msg in ((True, "request"), (False, "malformed request")):
        proxy = make_proxy({"log": {"level": "info", "access_log": access_log}})
        before = len(_lines(proxy))
        for data in garbage:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(data)
                with contextlib.suppress(ConnectionError, TimeoutError):
                    got = sock.recv(4096)
                    assert got == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", got), got[:100]
        assert call(proxy.url + "/-/health").status == 200
        time.sleep(0.5)  # the last lines reach the log
        text = proxy.log_text()
        assert "Traceback" not in text and secret not in text
        added = _lines(proxy)[before:]
        assert len(added) <= len(garbage) + 2, [line["msg"] for line in added]
        # (aiohttp says a first request that is not HTTP at all, a TLS hello, at debug.)
        assert sum(line.get("msg") == msg for line in added) >= len(garbage) * 2 // 3
        assert all("exc" not in line for line in added)
        proxy.stop()
