"""Issue 12: three real `indexguard serve` processes sharing one bucket on moto.

Each replica has its own port and data_dir; the bucket is all they share. The
tests race uploads through all three, install through another replica than the
one that took the upload, SIGKILL replicas in the middle of uploads, watch the
upstream's request log once a name turned private, and start a replica on a
store that ignores conditional writes.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    JSON_V1,
    auth_config,
    call,
    eventually,
    sha256_hex,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.clients import pip_install, uv_install, uv_venv
from tests.support.s3 import BlindFront, Bucket, MotoServer
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)

RACE_ROUNDS = 30
KILLS = 10


def _config(bucket: Bucket, upstream: FakeUpstream, **upstream_extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = auth_config()
    config["storage"] = bucket.storage_config(prefix="prod/")
    config["upstream"] = {"url": upstream.url, "timeout": 5, **upstream_extra}
    return config


@pytest.fixture
def replicas(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream,
) -> Iterator[list[ProxyServer]]:
    config = _config(s3_bucket, upstream, index_ttl=0)
    yield [make_proxy(config, env=s3_bucket.env()) for _ in range(3)]


def _files(proxy: ProxyServer, project: str) -> dict[str, str]:
    """filename -> sha256 as the replica's JSON page lists them."""
    answer = call(f"{proxy.url}/simple/{project}/", headers={"Accept": JSON_V1})
    if answer.status == 404:
        return {}
    assert answer.status == 200, answer.body[:300]
    page = orjson.loads(answer.body)
    return {f["filename"]: f["hashes"]["sha256"] for f in page["files"]}


def _race(replicas: list[ProxyServer], wheels: list[Path], version: str) -> list[Any]:
    """Upload wheels[i] through replicas[i], all released at one barrier."""
    barrier = threading.Barrier(len(replicas))
    answers: list[Any] = [None] * len(replicas)

    def send(i: int) -> None:
        barrier.wait()
        answers[i] = upload(replicas[i].url, wheels[i], "racer", version)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_racing_uploads_of_one_file_name_through_three_replicas_give_one_200(
    replicas: list[ProxyServer], artifacts_dir: Path,
) -> None:
    for round_ in range(RACE_ROUNDS):
        version = f"{round_}.0"
        # Three different wheels under one file name: only one may ever be listed.
        wheels = [
            build_wheel(artifacts_dir / f"r{round_}-{i}", "racer", version,
                        module_text=f"WHO = {i}\n")
            for i in range(3)
        ]
        assert len({w.name for w in wheels}) == 1
        assert len({sha256_file(w) for w in wheels}) == 3
        answers = _race(replicas, wheels, version)
        statuses = sorted(a.status for a in answers)
        assert statuses == [200, 400, 400], (round_, [(a.status, a.body) for a in answers])
        for a in answers:
            if a.status == 400:
                assert b"File already exists" in a.body
        winner = next(i for i, a in enumerate(answers) if a.status == 200)
        # Every replica lists the winner's bytes once the change feed reached it.
        want = {wheels[winner].name: sha256_file(wheels[winner])}
        for proxy in replicas:
            assert eventually(
                lambda p=proxy, w=want: _files(p, "racer").items() >= w.items(), timeout=5,
            ), round_
        # The same bytes again, through another replica: a 200 no-op.
        again = upload(replicas[(winner + 1) % 3].url, wheels[winner], "racer", version)
        assert again.status == 200, again.body


def test_a_file_uploaded_through_one_replica_installs_through_another_with_pip_and_uv(
    replicas: list[ProxyServer], artifacts_dir: Path, tmp_path: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "shared-lib", "1.2.0", module_text="VALUE = 12\n")
    assert upload(replicas[0].url, wheel, "shared-lib", "1.2.0").status == 200
    target = tmp_path / "pip-target"
    result = pip_install(replicas[2].index_url, target, "shared-lib==1.2.0")
    assert result.returncode == 0, result.stderr
    assert (target / "shared_lib").exists() or any(target.glob("shared_lib*"))
    venv_python = uv_venv(tmp_path / "venv")
    result = uv_install(replicas[2].index_url, venv_python, "shared-lib==1.2.0")
    assert result.returncode == 0, result.stderr


def test_sigkill_of_replicas_during_uploads_loses_no_acknowledged_upload(
    replicas: list[ProxyServer], artifacts_dir: Path,
) -> None:
    rng = random.Random(int(os.environ.get("FAULTS_SEED", secrets.randbits(32))))
    acked: dict[str, str] = {}
    lock = threading.Lock()
    for round_ in range(KILLS):
        victim = replicas[round_ % 3]
        wheels = [
            build_wheel(artifacts_dir / f"k{round_}", f"kill-{i}", f"{round_}.0",
                        extra_bytes=rng.randrange(50_000, 2_000_000))
            for i in range(3)
        ]

        def send(wheel: Path, project: str, version: str, via: ProxyServer) -> None:
            try:
                answer = upload(via.url, wheel, project, version, timeout=20)
            except OSError:
                return  # cut by the kill: may or may not be stored, never partial
            if answer.status == 200:
                with lock:
                    acked[f"{project}/{wheel.name}"] = sha256_file(wheel)

        threads = [
            threading.Thread(target=send, args=(w, f"kill-{i}", f"{round_}.0", victim))
            for i, w in enumerate(wheels)
        ]
        for t in threads:
            t.start()
        threading.Event().wait(rng.uniform(0.0, 0.4))
        victim.kill()
        for t in threads:
            t.join()
        victim.start()

    observer = replicas[0]
    for key, digest in acked.items():
        project, filename = key.split("/", 1)
        assert _files(observer, project).get(filename) == digest, key
    # Nothing listed is partial: every listed file downloads whole, matching its hash.
    for i in range(3):
        for filename, digest in _files(observer, f"kill-{i}").items():
            answer = call(f"{observer.url}/simple/kill-{i}/", headers={"Accept": JSON_V1})
            url = next(f["url"] for f in orjson.loads(answer.body)["files"]
                       if f["filename"] == filename)
            got = call(_absolute(observer, f"/simple/kill-{i}/", url))
            assert got.status == 200 and got.complete, filename
            assert sha256_hex(got.body) == digest, filename


def _absolute(proxy: ProxyServer, page_path: str, url: str) -> str:
    return urljoin(proxy.url + page_path, url)


def test_once_a_name_is_private_on_one_replica_no_replica_asks_upstream_for_it(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    public = build_wheel(artifacts_dir / "up", "taken-name", "0.9")
    upstream.add(public)
    config = _config(s3_bucket, upstream, index_ttl=0, negative_ttl=0)
    config["guard"] = {"upload_collision": "allow"}
    replicas = [make_proxy(config, env=s3_bucket.env()) for _ in range(3)]
    # Every replica has forwarded the name and cached its upstream file.
    for proxy in replicas:
        files = _files(proxy, "taken-name")
        assert files == {public.name: sha256_file(public)}
        answer = call(f"{proxy.url}/simple/taken-name/", headers={"Accept": JSON_V1})
        url = orjson.loads(answer.body)["files"][0]["url"]
        assert call(_absolute(proxy, "/simple/taken-name/", url)).status == 200

    private = build_wheel(artifacts_dir / "mine", "taken-name", "5.0")
    assert upload(replicas[1].url, private, "taken-name", "5.0").status == 200
    upstream.clear_requests()
    # Within the window every replica lists only the private file and has
    # stopped serving the cached upstream one.
    for proxy in replicas:
        assert eventually(
            lambda p=proxy: set(_files(p, "taken-name")) == {private.name}, timeout=5,
        ), proxy.log_tail()
    for proxy in replicas:
        for _ in range(3):
            assert set(_files(proxy, "taken-name")) == {private.name}
    assert [r for r in upstream.requests if "taken-name" in r[1] or "taken_name" in r[1]] == []


def test_a_cold_file_fetched_by_one_replica_is_served_by_the_others_from_the_bucket(
    replicas: list[ProxyServer], upstream: FakeUpstream, artifacts_dir: Path,
    s3_bucket: Bucket,
) -> None:
    wheel = build_wheel(artifacts_dir / "up", "big-public", "1.0", extra_bytes=1_000_000)
    upstream.add(wheel)
    digest = sha256_file(wheel)
    urls = []
    for proxy in replicas:
        answer = call(f"{proxy.url}/simple/big-public/", headers={"Accept": JSON_V1})
        urls.append(_absolute(proxy, "/simple/big-public/",
                              orjson.loads(answer.body)["files"][0]["url"]))
    first = call(urls[0])
    assert first.status == 200 and sha256_hex(first.body) == digest
    # Shared in the bucket right after its verification (in the background: the
    # first client never waits for it). Single flight is per host: a replica
    # asking in that very moment would fetch it once itself.
    assert eventually(lambda: f"prod/artifacts/{digest}" in s3_bucket.keys("prod/artifacts/"))
    for url in urls[1:]:
        got = call(url)
        assert got.status == 200 and sha256_hex(got.body) == digest
    assert len(upstream.file_requests()) == 1, upstream.file_requests()


def test_a_replica_refuses_to_start_on_a_store_that_ignores_conditional_writes(
    make_proxy: MakeProxy, moto_server: MotoServer, upstream: FakeUpstream,
) -> None:
    with BlindFront(moto_server.endpoint_url) as front:
        bucket = moto_server.bucket(endpoint_url=front.endpoint_url)
        proxy = make_proxy(_config(bucket, upstream), env=bucket.env(), start=False)
        with pytest.raises(RuntimeError, match="exited with 2"):
            proxy.start(timeout=30)
        log = proxy.log_text()
        assert "conditional" in log.lower(), log
        assert "Traceback" not in log
