"""Issue 6.2: the data_dir on a small tmpfs that the tests fill up.

An upload that does not fit is a 507 and leaves nothing behind; an upstream file
that does not fit is still streamed whole but not cached; once space returns,
everything works again without a restart.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    Answer,
    audit_store,
    auth_config,
    cached_hashes,
    call,
    eventually,
    free_bytes,
    temp_files,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(120)

DISK = "8m"
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 8 MiB tmpfs; unmounted after the proxy using it has stopped."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0755", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "disk-full tests need to mount a small tmpfs (root or CAP_SYS_ADMIN): "
            + (done.stderr.strip() or f"mount exited {done.returncode}")
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Allocate a filler file so that about `leave` bytes stay free."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    size = free_bytes(disk) - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if size > 0:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


def start_proxy(make_proxy: MakeProxy, disk: Path, upstream: FakeUpstream) -> ProxyServer:
    config: dict[str, Any] = auth_config()
    config.update({
        "data_dir": str(disk / "data"),
        "upstream": {"url": upstream.url, "timeout": 5},
        "limits": {"max_upload": "64MiB"},
    })
    return make_proxy(config)


def test_upload_that_does_not_fit_is_507_and_leaves_nothing(
    small_disk: Path, make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = start_proxy(make_proxy, small_disk, upstream)
    pid = proxy.pid
    big = build_wheel(artifacts_dir, "acme-big", "1.0", extra_bytes=3 * 2**20)
    filler = fill(small_disk, leave=2**20)
    free_before = free_bytes(small_disk)

    answer = upload(proxy.url, big, "acme-big", "1.0")
    assert answer.status == 507, (answer.status, answer.body)
    assert eventually(lambda: not temp_files(proxy.data_dir))
    audit = audit_store(proxy.data_dir)
    assert not audit.listed and not audit.problems and not audit.unlisted
    assert not list((proxy.data_dir / "private").rglob("*.whl"))
    assert free_bytes(small_disk) >= free_before  # nothing leaked on the disk

    filler.unlink()
    answer = upload(proxy.url, big, "acme-big", "1.0")
    assert answer.status == 200, answer.body
    audit = audit_store(proxy.data_dir)
    assert audit.listed == {f"acme-big/{big.name}": sha256_file(big)}
    assert not audit.problems and not audit.unlisted
    got = call(f"{proxy.url}/files/acme-big/{big.name}")
    assert got.status == 200 and got.body == big.read_bytes()
    assert proxy.pid == pid


def test_space_running_out_at_every_step_of_an_upload_leaves_no_orphan(
    small_disk: Path, make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    """Free space just short of, then just enough for, each write an upload makes
    (spool, metadata, index): every attempt is a 200 or a 507 with nothing left."""
    proxy = start_proxy(make_proxy, small_disk, upstream)
    outcomes: list[int] = []
    for step in range(6):
        version = f"1.{step}"
        wheel = build_wheel(artifacts_dir / version, "acme-edge", version,
                            extra_bytes=200_000)
        pages = -(-wheel.stat().st_size // PAGE)
        before = audit_store(proxy.data_dir).listed
        filler = fill(small_disk, leave=(pages + step - 1) * PAGE)
        answer = upload(proxy.url, wheel, "acme-edge", version)
        outcomes.append(answer.status)
        assert answer.status in (200, 507), (step, answer.status, answer.body)
        assert eventually(lambda: not temp_files(proxy.data_dir)), step
        audit = audit_store(proxy.data_dir)
        # A 507 must not leave the file (or its .metadata) behind, unlisted.
        assert not audit.problems and not audit.unlisted, (step, answer.status, audit)
        key = f"acme-edge/{wheel.name}"
        if answer.status == 200:
            assert audit.listed.get(key) == sha256_file(wheel), step
        else:
            assert audit.listed == before, step
        filler.unlink()
    assert 507 in outcomes and 200 in outcomes, outcomes


def _sample_rss(proxy: ProxyServer, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], proxy.rss_bytes())
        stop.wait(0.02)


def test_upstream_file_that_does_not_fit_is_streamed_but_not_cached(
    small_disk: Path, make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    # Bigger than the disk and many times the proxy's in-memory window, so a
    # proxy that buffered the whole file would show it in its RSS.
    big = build_wheel(artifacts_dir, "huge-dist", "1.0", extra_bytes=48 * 2**20)
    small = build_wheel(artifacts_dir, "small-dist", "1.0", extra_bytes=2 * 2**20)
    for wheel in (big, small):
        upstream.add(wheel, with_metadata=False)
    proxy = start_proxy(make_proxy, small_disk, upstream)
    pid = proxy.pid
    want_big = hashlib.sha256(big.read_bytes()).hexdigest()

    # A completely full disk: the page cache cannot store the page either.
    filler = fill(small_disk, leave=0)
    assert call(f"{proxy.url}/simple/small-dist/").status == 200
    assert call(f"{proxy.url}/simple/huge-dist/").status == 200
    got = call(f"{proxy.url}/files/small-dist/{small.name}")
    assert got.status == 200 and got.complete and got.body == small.read_bytes()
    filler.unlink()

    # Some room: the first megabyte or so reaches the temp file, the rest does not.
    filler = fill(small_disk, leave=1024 * 1024)
    stop, peak = threading.Event(), [proxy.rss_bytes()]
    baseline = peak[0]
    sampler = threading.Thread(target=_sample_rss, args=(proxy, stop, peak))
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers: list[Answer] = list(pool.map(
                lambda _i: call(f"{proxy.url}/files/huge-dist/{big.name}", timeout=120),
                range(4),
            ))
    finally:
        stop.set()
        sampler.join()
    for answer in answers:
        assert answer.status == 200 and answer.complete
        assert hashlib.sha256(answer.body).hexdigest() == want_big
    assert peak[0] - baseline < 32 * 2**20, (baseline, peak[0])
    assert not cached_hashes(proxy.data_dir) & {want_big, sha256_file(small)}
    assert eventually(lambda: not temp_files(proxy.data_dir))
    assert "not cached" in proxy.log_text()
    assert "Traceback" not in proxy.log_text()

    # Space returns: the same requests now fill the cache; no restart.
    filler.unlink()
    got = call(f"{proxy.url}/files/small-dist/{small.name}")
    assert got.status == 200 and got.body == small.read_bytes()
    # The last byte goes out once verified; the commit follows it.
    assert eventually(lambda: sha256_file(small) in cached_hashes(proxy.data_dir))
    wheel = build_wheel(artifacts_dir, "acme-after", "1.0")
    assert upload(proxy.url, wheel, "acme-after", "1.0").status == 200
    assert proxy.pid == pid
