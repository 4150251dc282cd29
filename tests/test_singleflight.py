"""One upstream fetch per file across worker processes (workers: 2, one data_dir).

The kernel spreads connections over both workers (SO_REUSEPORT): one worker
fetches the file, the other follows it through the file system. Each client
is a fresh connection, so both workers see some of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.download import Download
from proxy.errors import UpstreamUnavailable
from proxy.follow import follow
from proxy.hashlock import HashLocks
from tests.conftest import REPO_ROOT, MakeProxy
from tests.faults.helpers import (
    Answer,
    cached_hashes,
    call,
    eventually,
    metric,
    sha256_hex,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(240)

CLIENTS = 30
SHA = "ab" * 32
# Generous: only a hung client gets near it.
CLIENT_TIMEOUT = 60.0


def _listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:port (one per worker, SO_REUSEPORT)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] == "0A")


def _two_workers(make_proxy: MakeProxy, upstream: FakeUpstream) -> ProxyServer:
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 20}, "workers": 2})
    # Healthy means one worker answers; until the other listens too, the
    # kernel gives every connection to the first.
    assert eventually(lambda: _listeners(proxy.port) == 2, timeout=20)
    return proxy


def _big_wheel(artifacts_dir: Path, upstream: FakeUpstream, name: str) -> Path:
    wheel = build_wheel(artifacts_dir, name, "1.0", extra_bytes=4 * 2**20)
    upstream.add(wheel, with_metadata=False)
    return wheel


def _fetch_all(url: str, clients: int = CLIENTS) -> list[Answer | OSError]:
    def fetch(_i: int) -> Answer | OSError:
        try:
            return call(url, timeout=CLIENT_TIMEOUT)
        except OSError as exc:  # cut before a status line: an error, as wanted
            return exc

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(fetch, range(clients)))


def _fetches_of(upstream: FakeUpstream, wheel: Path) -> int:
    return len([r for r in upstream.file_requests() if r[1].endswith(wheel.name)])


def _part_files(proxy: ProxyServer) -> list[Path]:
    return list((proxy.data_dir / "tmp").glob("*.part"))


def _lock_owner(proxy: ProxyServer, sha256: str) -> int | None:
    """The pid holding the hash's lock in cache/downloads.lock (from /proc/locks)."""
    ino = os.stat(proxy.data_dir / "cache" / "downloads.lock").st_ino
    offset = str(int(sha256[:15], 16))
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # N: POSIX ADVISORY WRITE pid maj:min:inode start end
        if (len(fields) >= 8 and fields[1] == "POSIX" and fields[5].endswith(f":{ino}")
                and fields[6] == offset):
            return int(fields[4])
    return None


def test_concurrent_cold_requests_on_two_workers_make_one_upstream_fetch(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheel = _big_wheel(artifacts_dir, upstream, "shared-big")
    proxy = _two_workers(make_proxy, upstream)
    assert call(f"{proxy.url}/simple/shared-big/").status == 200
    # A stall mid-body keeps the transfer going while every client arrives.
    upstream.fault("slow", path_prefix="/files/", seconds=1.0, phase="body")
    expected = sha256_file(wheel)

    answers = _fetch_all(f"{proxy.url}/files/shared-big/{wheel.name}")

    for answer in answers:
        assert isinstance(answer, Answer), answer
        assert answer.status == 200 and answer.complete, (answer.status, answer.elapsed)
        assert sha256_hex(answer.body) == expected
    assert _fetches_of(upstream, wheel) == 1
    # Both workers took part: each started a transfer (one fetched, one
    # followed); every other client joined one of those two.
    assert metric(proxy, "indexguard_file_cache_total", result="miss") >= 2
    assert eventually(lambda: expected in cached_hashes(proxy.data_dir))
    assert eventually(lambda: not _part_files(proxy))
    assert "Traceback" not in proxy.log_text()


def test_tampered_file_on_two_workers_reaches_no_client_whole(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheel = _big_wheel(artifacts_dir, upstream, "shared-bad")
    good = sha256_file(wheel)
    # Same size, other bytes: the page still lists the good hash.
    data = bytearray(wheel.read_bytes())
    data[len(data) // 3] ^= 0xFF
    wheel.write_bytes(bytes(data))
    proxy = _two_workers(make_proxy, upstream)
    assert call(f"{proxy.url}/simple/shared-bad/").status == 200
    upstream.fault("slow", path_prefix="/files/", seconds=1.0, phase="body")

    answers = _fetch_all(f"{proxy.url}/files/shared-bad/{wheel.name}")

    for answer in answers:
        if isinstance(answer, Answer):
            assert not (answer.status == 200 and answer.complete), answer.status
            assert len(answer.body) < len(data)
            assert answer.elapsed < CLIENT_TIMEOUT - 5  # an error, not a hang
    assert metric(proxy, "indexguard_hash_mismatches_total") >= 1
    assert metric(proxy, "indexguard_file_cache_total", result="miss") >= 2
    assert good not in cached_hashes(proxy.data_dir)
    assert eventually(lambda: not _part_files(proxy))


def _lagging_get(url: str, pause: float) -> tuple[int, bytes]:
    """A client that takes 64 KiB, stops reading for pause seconds (the transfer
    runs ahead, past the proxy's in-memory window), then reads the rest.
    Returns (status, body read before the end or a cut connection)."""
    host, _, port = url.split("://", 1)[1].split("/", 1)[0].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    conn.request("GET", "/" + url.split("://", 1)[1].split("/", 1)[1])
    resp = conn.getresponse()
    body = resp.read(64 * 1024)
    time.sleep(pause)
    try:
        while chunk := resp.read(1 << 20):
            body += chunk
    except (http.client.IncompleteRead, OSError) as exc:
        body += getattr(exc, "partial", b"")
    finally:
        conn.close()
    return resp.status, body


@pytest.mark.parametrize("tampered", [False, True], ids=["intact", "tampered"])
def test_a_client_far_behind_a_cold_transfer_gets_it_from_the_file(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tampered: bool,
) -> None:
    # Four times the in-memory window: the lagging client reads most of the
    # file from the transfer's temp file, while it is still being written.
    wheel = build_wheel(artifacts_dir, "lagged", "1.0", extra_bytes=8 * 2**20)
    upstream.add(wheel, with_metadata=False)
    data = wheel.read_bytes()
    if tampered:
        upstream.fault("tamper", path_prefix="/files/")
    else:
        upstream.fault("slow", path_prefix="/files/", seconds=1.0, phase="body")
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 20}})
    url = f"{proxy.url}/files/lagged/{wheel.name}"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        lagging = [pool.submit(_lagging_get, url, pause) for pause in (0.5, 2.0)]
        prompt = call(url, timeout=CLIENT_TIMEOUT)
        results = [f.result() for f in lagging]
    if tampered:
        # Held back at the last byte, whichever way each client reads.
        assert not (prompt.status == 200 and prompt.complete)
        for _status, body in results:
            assert len(body) < len(data)
        assert sha256_file(wheel) not in cached_hashes(proxy.data_dir)
    else:
        assert prompt.status == 200 and prompt.body == data
        for status, body in results:
            assert status == 200 and body == data
        assert _fetches_of(upstream, wheel) == 1
    assert "Traceback" not in proxy.log_text()


def test_owner_killed_mid_transfer_fails_followers_fast_and_heals(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheel = _big_wheel(artifacts_dir, upstream, "shared-kill")
    sha = sha256_file(wheel)
    proxy = _two_workers(make_proxy, upstream)
    assert call(f"{proxy.url}/simple/shared-kill/").status == 200
    # Long enough that the kill lands mid-transfer; the clients of the worker
    # that survives must not wait it out.
    upstream.fault("slow", path_prefix="/files/", seconds=30.0, phase="body")
    url = f"{proxy.url}/files/shared-kill/{wheel.name}"

    with concurrent.futures.ThreadPoolExecutor(1) as runner:
        pending = runner.submit(_fetch_all, url)
        owner: dict[str, Any] = {}

        def all_in_flight() -> bool:
            # Every client waits on a transfer, and both workers have one: a
            # client arriving after the kill would just start a new one.
            owner["pid"] = _lock_owner(proxy, sha)
            misses = metric(proxy, "indexguard_file_cache_total", result="miss")
            joins = metric(proxy, "indexguard_file_cache_total", result="joined")
            return owner["pid"] is not None and misses >= 2 and misses + joins >= CLIENTS

        assert eventually(all_in_flight, timeout=20)
        os.kill(owner["pid"], signal.SIGKILL)
        answers = pending.result(timeout=CLIENT_TIMEOUT + 30)

    for answer in answers:
        if isinstance(answer, Answer):
            assert not (answer.status == 200 and answer.complete), answer.status
            assert answer.elapsed < CLIENT_TIMEOUT - 5  # an error, not a hang
    assert sha not in cached_hashes(proxy.data_dir)

    upstream.clear_faults()
    healed = call(url, timeout=CLIENT_TIMEOUT)
    assert healed.status == 200 and healed.complete
    assert sha256_hex(healed.body) == sha
    assert eventually(lambda: sha in cached_hashes(proxy.data_dir))
    # The dead owner's leftover was replaced by the new owner, then committed.
    assert eventually(lambda: not _part_files(proxy))


def test_a_hash_lock_is_one_process_at_a_time_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "downloads.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from proxy.hashlock import HashLocks; "
            f"locks = HashLocks(__import__('pathlib').Path({str(path)!r})); locks.open(); "
            f"assert locks.acquire({SHA!r}); print('held', flush=True); time.sleep(60)"
        )],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )
    locks = HashLocks(path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        locks.open()
        assert not locks.acquire(SHA) and not locks.is_free(SHA)
        assert locks.acquire("cd" * 32)  # another hash, another byte
        holder.kill()  # no cleanup: the kernel drops the lock
        holder.wait(timeout=10)
        assert locks.is_free(SHA)
        assert locks.acquire(SHA)
        assert not locks.acquire(SHA)  # not twice, even within one process
        locks.release(SHA)
        assert locks.acquire(SHA)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
        locks.close()


async def test_a_follower_never_vouches_for_a_dead_owners_leftover(tmp_path: Path) -> None:
    part, final = tmp_path / f"{SHA}.part", tmp_path / SHA
    part.write_bytes(b"x" * 1000)  # left by an owner that died
    dl = Download(SHA, part, None)
    held = True
    following = asyncio.create_task(follow(dl, final, lambda: not held))
    await asyncio.sleep(0.2)
    assert not dl.started.is_set() and dl.written == 0  # it never grew

    part.unlink()  # the new owner replaces it, and writes
    with open(part, "xb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        for _ in range(3):
            fh.write(b"good" * 10)
            await asyncio.sleep(0.1)
    assert dl.started.is_set() and dl.written == 120
    assert dl.ident == (st.st_dev, st.st_ino)
    os.replace(part, final)  # verified and committed, then the lock goes
    held = False
    await asyncio.wait_for(following, timeout=10)
    assert dl.written == 120 and dl.error is None


async def test_a_follower_fails_when_the_file_it_tails_is_abandoned(tmp_path: Path) -> None:
    part, final = tmp_path / f"{SHA}.part", tmp_path / SHA
    dl = Download(SHA, part, None)
    following = asyncio.create_task(follow(dl, final, lambda: False))
    with open(part, "xb", buffering=0) as fh:
        for _ in range(3):
            fh.write(b"half" * 10)
            await asyncio.sleep(0.1)
    assert dl.started.is_set()
    # The owner refused the file (hash mismatch, say) while the lock is still
    # held, and a new owner starts over under the same name.
    part.unlink()
    part.write_bytes(b"new")
    with pytest.raises(UpstreamUnavailable):
        await asyncio.wait_for(following, timeout=10)
    assert not final.exists()
