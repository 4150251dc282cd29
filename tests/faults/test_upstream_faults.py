"""Issue 6.1: every scripted upstream fault, for pages and for files.

For each fault the proxy answers within upstream.timeout (plus slack), caches
nothing broken, serves the stale page where it has one, counts the failure, and
heals on the next good upstream answer; pip and uv installs of cached sets keep
working while the upstream misbehaves.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    JSON_V1,
    Answer,
    cached_hashes,
    call,
    eventually,
    metric,
    temp_files,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.clients import installed_version, pip_install, uv_install, uv_venv
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(180)

TIMEOUT = 2.0
# Scheduling noise on a loaded 2-core machine; the bound itself is the timeout.
SLACK = 3.0
# upstream.backoff: 0 here, so that each page's fault is met on its own page (the
# outage that a failure starts for every name is test_upstream_outage.py's).
FAILURE_BACKOFF = 0.0

# name -> (fault kind, params). Names become project names.
FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "status500": ("status", {"code": 500}),
    "status503": ("status", {"code": 503}),
    "status429": ("status", {"code": 429, "retry_after": 1}),
    "slow": ("slow", {"seconds": TIMEOUT + 3}),
    "slowbody": ("slow", {"seconds": TIMEOUT + 3, "phase": "body"}),
    "reset": ("reset", {}),
    "truncate": ("truncate", {}),
    "badlength": ("bad_length", {}),
    "garbage": ("garbage", {}),
    "redirectloop": ("redirect_loop", {}),
    "tamper": ("tamper", {}),
}
# A tampered page is just another page; tamper is about files.
PAGE_FAULTS = {k: v for k, v in FAULTS.items() if k != "tamper"}


def _parallel(fn: Callable[[str], Answer], keys: list[str]) -> dict[str, Answer]:
    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        return dict(zip(keys, pool.map(fn, keys), strict=True))


def _filenames(answer: Answer) -> set[str]:
    return {f["filename"] for f in orjson.loads(answer.body)["files"]}


def _proxy_config(upstream: FakeUpstream) -> dict[str, Any]:
    # index_ttl 0: every page request asks upstream, so every one meets the fault.
    return {"upstream": {"url": upstream.url, "timeout": TIMEOUT, "index_ttl": 0,
                         "backoff": FAILURE_BACKOFF}}


def test_page_faults_serve_stale_within_the_timeout_and_heal(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    for kind in PAGE_FAULTS:
        for prefix in ("warm", "cold"):
            upstream.add(build_wheel(artifacts_dir, f"{prefix}-{kind}", "1.0"))
    proxy = make_proxy(_proxy_config(upstream))

    def page(name: str) -> Answer:
        return call(f"{proxy.url}/simple/{name}/", headers={"Accept": JSON_V1})

    warm = {kind: page(f"warm-{kind}") for kind in PAGE_FAULTS}
    assert all(a.status == 200 for a in warm.values())
    # A newer release upstream: the proxy's conditional GET then gets a 200 with
    # a body for the fault to break (an unchanged page is a bodiless 304).
    for kind in PAGE_FAULTS:
        upstream.add(build_wheel(artifacts_dir, f"warm-{kind}", "2.0"))
    stale_before = metric(proxy, "indexguard_stale_pages_served_total")
    errors_before = metric(proxy, "indexguard_upstream_requests_total", kind="page",
                           outcome="error")

    # Phase 1 with JSON pages, then HTML garbage (the upstream answers what the
    # proxy asks for, JSON, unless it is made HTML-only).
    phases = [
        [k for k in PAGE_FAULTS if k != "garbage"] + ["garbage"],
        ["garbage"],
    ]
    for html_only, kinds in zip((False, True), phases, strict=True):
        upstream.html_only = html_only
        for kind in kinds:
            fault, params = PAGE_FAULTS[kind]
            for prefix in ("warm", "cold"):
                upstream.fault(fault, path_prefix=f"/simple/{prefix}-{kind}/", **params)
        if html_only:
            # A fresh pair for the HTML garbage: the JSON round put the first in backoff.
            for prefix in ("warm", "cold"):
                upstream.add(build_wheel(artifacts_dir, f"{prefix}-garbage-html", "1.0"))
            upstream.html_only = False
            warm["garbage-html"] = page("warm-garbage-html")
            assert warm["garbage-html"].status == 200
            upstream.add(build_wheel(artifacts_dir, "warm-garbage-html", "2.0"))
            upstream.html_only = True
            for prefix in ("warm", "cold"):
                upstream.fault("garbage", path_prefix=f"/simple/{prefix}-garbage-html/")
            kinds = ["garbage-html"]
        names = [f"{prefix}-{kind}" for kind in kinds for prefix in ("warm", "cold")]
        answers = _parallel(page, names)
        for kind in kinds:
            stale, cold = answers[f"warm-{kind}"], answers[f"cold-{kind}"]
            assert stale.status == 200 and stale.body == warm[kind].body, (kind, stale.status)
            assert cold.status == 502, (kind, cold.status, cold.body)
            for answer in (stale, cold):
                assert answer.elapsed <= TIMEOUT + SLACK, (kind, answer.elapsed)
        # Still faulty upstream, second ask: nothing broken was cached meanwhile.
        again = _parallel(page, names)
        for kind in kinds:
            assert again[f"warm-{kind}"].body == warm[kind].body, kind
            assert again[f"cold-{kind}"].status == 502, kind
    last_failure = time.monotonic()

    faulted = len(PAGE_FAULTS) + 1
    assert metric(proxy, "indexguard_stale_pages_served_total") - stale_before >= faulted
    errors = metric(proxy, "indexguard_upstream_requests_total", kind="page", outcome="error")
    assert errors - errors_before >= 2 * faulted  # each warm and each cold page
    assert "Traceback" not in proxy.log_text()

    # Healing: a good upstream answer replaces the stale page once the failure
    # backoff is over, and a cold page works at once.
    upstream.clear_faults()
    upstream.html_only = False
    kinds = [*PAGE_FAULTS, "garbage-html"]
    cold_now = _parallel(page, [f"cold-{kind}" for kind in kinds])
    assert all(a.status == 200 for a in cold_now.values()), {
        k: a.status for k, a in cold_now.items()
    }
    time.sleep(max(0.0, last_failure + FAILURE_BACKOFF + 0.5 - time.monotonic()))
    healed = _parallel(page, [f"warm-{kind}" for kind in kinds])
    for kind in kinds:
        answer = healed[f"warm-{kind}"]
        assert answer.status == 200
        assert any("-2.0-" in name for name in _filenames(answer)), kind


def test_file_faults_fail_cleanly_cache_nothing_and_heal(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheels = {
        kind: build_wheel(artifacts_dir, f"file-{kind}", "1.0", extra_bytes=600_000)
        for kind in FAULTS
    }
    for wheel in wheels.values():
        upstream.add(wheel)
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": TIMEOUT}})
    for kind in FAULTS:
        assert call(f"{proxy.url}/simple/file-{kind}/").status == 200
    for kind, (fault, params) in FAULTS.items():
        upstream.fault(fault, path_prefix=f"/files/{wheels[kind].name}", **params)
    errors_before = metric(proxy, "indexguard_upstream_requests_total", kind="file",
                           outcome="error")
    mismatches_before = metric(proxy, "indexguard_hash_mismatches_total")

    def fetch(kind: str) -> Answer:
        return call(f"{proxy.url}/files/file-{kind}/{wheels[kind].name}")

    answers = _parallel(fetch, list(FAULTS))
    for kind, answer in answers.items():
        good = sha256_file(wheels[kind])
        # A 502 before any byte, or a body cut short: never a whole file, right or wrong.
        assert answer.status == 502 or (answer.status == 200 and not answer.complete), (
            kind, answer.status, answer.complete)
        if answer.status == 200:
            assert len(answer.body) < wheels[kind].stat().st_size, kind
        assert answer.elapsed <= TIMEOUT + SLACK, (kind, answer.elapsed)
        assert good not in cached_hashes(proxy.data_dir), kind
    assert eventually(lambda: not temp_files(proxy.data_dir), timeout=TIMEOUT + SLACK)
    errors = metric(proxy, "indexguard_upstream_requests_total", kind="file", outcome="error")
    assert errors - errors_before >= len(FAULTS) - 1  # every fault but tamper
    assert metric(proxy, "indexguard_hash_mismatches_total") - mismatches_before >= 1

    upstream.clear_faults()
    healed = _parallel(fetch, list(FAULTS))
    for kind, answer in healed.items():
        assert answer.status == 200 and answer.complete, kind
        assert answer.body == wheels[kind].read_bytes(), kind
        # The last byte goes out once verified; the commit follows it.
        want = sha256_file(wheels[kind])
        assert eventually(lambda want=want: want in cached_hashes(proxy.data_dir)), kind
    assert "Traceback" not in proxy.log_text()


def test_cached_sets_install_with_pip_and_uv_under_every_fault(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    # One fresh set per fault and client: each install meets the fault on its
    # pages rather than a page already in failure backoff.
    sets: dict[str, list[Path]] = {}
    for kind in FAULTS:
        sets[f"pip-{kind}"] = [
            build_wheel(artifacts_dir, f"pipapp-{kind}", "1.0",
                        requires_dist=[f"pipdep-{kind}>=1.0"]),
            build_wheel(artifacts_dir, f"pipdep-{kind}", "1.0"),
        ]
        sets[f"uv-{kind}"] = [build_wheel(artifacts_dir, f"uvapp-{kind}", "1.0")]
    for wheels in sets.values():
        for wheel in wheels:
            upstream.add(wheel)
    proxy = make_proxy(_proxy_config(upstream))

    def warm(wheel: Path) -> bool:
        project = wheel.name.split("-")[0].replace("_", "-")
        base = f"{proxy.url}/files/{project}/{wheel.name}"
        return all(
            call(url).status == 200
            for url in (f"{proxy.url}/simple/{project}/", base, base + ".metadata")
        )

    every = [w for ws in sets.values() for w in ws]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(warm, every))
    hashes = {sha256_file(w) for w in every}
    assert eventually(lambda: hashes <= cached_hashes(proxy.data_dir))

    venv = uv_venv(tmp_path / "venv")
    upstream.clear_requests()
    for kind, (fault, params) in FAULTS.items():
        upstream.fault(fault, path_prefix="/", **params)
        target = tmp_path / f"pip-{kind}"
        result = pip_install(proxy.index_url, target, f"pipapp-{kind}", timeout=120)
        assert result.returncode == 0, (kind, result.stdout[-2000:], result.stderr[-2000:])
        assert installed_version(target, f"pipdep-{kind}") == "1.0"
        result = uv_install(proxy.index_url, venv, f"uvapp-{kind}", timeout=120)
        assert result.returncode == 0, (kind, result.stdout[-2000:], result.stderr[-2000:])
        assert installed_version(tmp_path / "venv", f"uvapp-{kind}") == "1.0"
    upstream.clear_faults()
    # The pages met the faults; no file was asked of the misbehaving upstream.
    assert upstream.page_requests()
    assert upstream.file_requests() == []


@pytest.mark.parametrize("phase", ["before", "body"])
def test_cold_file_stall_is_cut_at_the_timeout(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, phase: str,
) -> None:
    """A stall long past the timeout: the proxy gives up after upstream.timeout,
    not after the upstream's stall ends."""
    wheel = build_wheel(artifacts_dir, "stall-me", "1.0", extra_bytes=400_000)
    upstream.add(wheel)
    proxy = make_proxy(_proxy_config(upstream))
    assert call(f"{proxy.url}/simple/stall-me/").status == 200
    upstream.fault("slow", path_prefix="/files/", seconds=30, phase=phase)
    answer = call(f"{proxy.url}/files/stall-me/{wheel.name}", timeout=40)
    assert answer.elapsed <= TIMEOUT + SLACK
    assert answer.status == 502 or not answer.complete
    assert sha256_file(wheel) not in cached_hashes(proxy.data_dir)
