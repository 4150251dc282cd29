"""storage.backend: s3 with real `indexguard serve` processes sharing one bucket on
moto (loopback). The lead's tests/test_replicas.py drives three replicas through
races, kills and installers; these pin each piece on its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    ADMIN,
    ADMIN_SECRET,
    auth_config,
    basic,
    call,
    eventually,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.clients import installed_version, pip_install
from tests.support.s3 import BlindFront, Bucket, MotoServer
from tests.support.server import REPO_ROOT, ProxyServer, deep_merge
from tests.support.upstream import FakeUpstream

JSON = "application/vnd.pypi.simple.v1+json"


def _config(bucket: Bucket, upstream: FakeUpstream | None = None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = deep_merge(auth_config(), {"storage": bucket.storage_config()})
    if upstream is not None:
        config["upstream"] = {"url": upstream.url, "timeout": 5}
    return deep_merge(config, extra)


def _replicas(
    make_proxy: MakeProxy, bucket: Bucket, count: int, upstream: FakeUpstream | None = None,
    **extra: Any,
) -> list[ProxyServer]:
    return [make_proxy(_config(bucket, upstream, **extra), env=bucket.env())
            for _ in range(count)]


def test_a_file_uploaded_through_one_replica_is_served_by_another(
    make_proxy: MakeProxy, s3_bucket: Bucket, artifacts_dir: Path,
) -> None:
    one, two = _replicas(make_proxy, s3_bucket, 2)
    wheel = build_wheel(artifacts_dir, "acme-shared", "1.0")
    assert upload(one.url, wheel, "acme-shared", "1.0").status == 200
    # The other replica has never seen the name: it asks the bucket.
    page = call(two.index_url + "acme-shared/")
    assert page.status == 200 and wheel.name.encode() in page.body
    got = call(f"{two.url}/files/acme-shared/{wheel.name}")
    assert got.status == 200 and got.body == wheel.read_bytes()
    ranged = call(f"{two.url}/files/acme-shared/{wheel.name}", headers={"Range": "bytes=0-3"})
    assert ranged.status == 206 and ranged.body == wheel.read_bytes()[:4]
    # Only the bucket holds it: blob under its sha256, the record, the name.
    keys = s3_bucket.keys()
    assert f"blobs/{sha256_file(wheel)}" in keys
    assert "indexes/default/projects/acme-shared.json" in keys
    assert "indexes/default/names/acme-shared" in keys
    assert not (one.data_dir / "private").exists()
    root = call(two.index_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    assert b"acme-shared" in root.body


def test_racing_replicas_give_one_200_and_identical_bytes_stay_a_no_op(
    make_proxy: MakeProxy, s3_bucket: Bucket, artifacts_dir: Path,
) -> None:
    one, two = _replicas(make_proxy, s3_bucket, 2)
    first = build_wheel(artifacts_dir / "a", "acme-race", "1.0")
    other = build_wheel(artifacts_dir / "b", "acme-race", "1.0", requires_python=">=3.9")
    assert first.read_bytes() != other.read_bytes()
    assert upload(one.url, first, "acme-race", "1.0").status == 200
    again = upload(two.url, first, "acme-race", "1.0")
    assert again.status == 200
    refused = upload(two.url, other, "acme-race", "1.0")
    assert refused.status == 400 and b"File already exists" in refused.body
    assert call(f"{one.url}/files/acme-race/{first.name}").body == first.read_bytes()


def test_the_guard_holds_across_replicas(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    """A name cached from upstream on replica 1 becomes private through replica 2:
    replica 1 stops serving the upstream files within ~2 s, and no replica asks
    upstream for the name again."""
    public = build_wheel(artifacts_dir / "up", "shared-name", "1.0")
    upstream.add(public)
    one, two = _replicas(make_proxy, s3_bucket, 2, upstream)
    assert call(f"{one.url}/files/shared-name/{public.name}").status == 200  # cached on one
    assert call(one.index_url + "shared-name/").status == 200
    mine = build_wheel(artifacts_dir / "mine", "shared-name", "2.0")
    assert upload(two.url, mine, "shared-name", "2.0").status == 200
    upstream.clear_requests()

    def only_private() -> bool:
        return call(f"{one.url}/files/shared-name/{public.name}").status == 404

    assert eventually(only_private, timeout=2.5)
    page = call(one.index_url + "shared-name/")
    assert page.status == 200 and mine.name.encode() in page.body
    assert public.name.encode() not in page.body
    # A third replica, started after the upload, never forwards the name.
    three = _replicas(make_proxy, s3_bucket, 1, upstream)[0]
    assert call(three.index_url + "shared-name/").status == 200
    assert call(f"{three.url}/files/shared-name/{public.name}").status == 404
    assert [r for r in upstream.requests if "shared-name" in r[1]] == []


def test_a_cold_file_fetched_by_one_replica_reaches_the_others_from_the_bucket(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "tiny-shared", "1.0")
    upstream.add(wheel)
    one, two = _replicas(make_proxy, s3_bucket, 2, upstream)
    url = f"/files/tiny-shared/{wheel.name}"
    assert call(one.index_url + "tiny-shared/").status == 200
    assert call(one.url + url).body == wheel.read_bytes()
    key = f"artifacts/{sha256_file(wheel)}"
    assert eventually(lambda: key in s3_bucket.keys("artifacts/"))
    assert call(two.index_url + "tiny-shared/").status == 200
    upstream.clear_requests()
    got = call(two.url + url)
    assert got.status == 200 and got.body == wheel.read_bytes()
    assert upstream.file_requests() == []
    # Now in replica two's own tier: sent from its disk.
    assert (two.data_dir / "cache" / "files" / key[10:12] / key[10:]).exists()


def test_admin_changes_reach_the_other_replica(
    make_proxy: MakeProxy, s3_bucket: Bucket, artifacts_dir: Path,
) -> None:
    one, two = _replicas(make_proxy, s3_bucket, 2)
    wheel = build_wheel(artifacts_dir, "acme-gone", "1.0")
    assert upload(one.url, wheel, "acme-gone", "1.0").status == 200
    assert call(f"{two.url}/files/acme-gone/{wheel.name}").status == 200
    admin = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
    assert call(f"{one.url}/-/files/acme-gone/{wheel.name}", "DELETE", headers=admin).status \
        == 200
    assert eventually(
        lambda: call(f"{two.url}/files/acme-gone/{wheel.name}").status == 404, timeout=2.5)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_a_store_that_ignores_conditional_writes(
    moto_server: MotoServer, tmp_path: Path, workers: int,
) -> None:
    bucket = moto_server.bucket()
    with BlindFront(moto_server.endpoint_url) as front:
        blind = Bucket(bucket.name, front.endpoint_url, moto_server.endpoint_url)
        proxy = ProxyServer(tmp_path / "proxy", _config(blind, workers=workers),
                            env=blind.env())
        env = {**blind.env(), "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(proxy.argv(), cwd=REPO_ROOT, env=env, capture_output=True,
                              timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert "ignores conditional writes" in lines[-1], done.stderr
    # Said once, also with workers (the supervisor probes before any starts).
    assert sum("conditional writes" in line for line in lines) == 1
    assert "indexguard-test-secret" not in (done.stderr + done.stdout).decode()
    assert front.dropped > 0


def test_workers_of_one_replica_see_each_others_uploads_at_once(
    make_proxy: MakeProxy, s3_bucket: Bucket, artifacts_dir: Path,
) -> None:
    """Two workers share the port: whichever answers lists every file uploaded
    through the other, with no wait for the change feed's next poll."""
    proxy = make_proxy(_config(s3_bucket, workers=2), env=s3_bucket.env())
    for i in range(20):
        wheel = build_wheel(artifacts_dir / str(i), "acme-workers", f"1.{i}")
        assert upload(proxy.url, wheel, "acme-workers", f"1.{i}").status == 200
        page = call(proxy.index_url + "acme-workers/", headers={"Accept": JSON})
        assert len(orjson.loads(page.body)["files"]) == i + 1, i
        assert call(f"{proxy.url}/files/acme-workers/{wheel.name}").body == wheel.read_bytes()


def test_redirects_to_presigned_urls_when_asked(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, artifacts_dir: Path,
    tmp_path: Path,
) -> None:
    """storage.s3.redirect_ttl: a GET of a private file or a shared artifact is a
    302 to a presigned URL that works without credentials; HEAD is answered here."""
    public = build_wheel(artifacts_dir / "up", "tiny-redir", "1.0")
    upstream.add(public)
    config = _config(s3_bucket, upstream)
    config["storage"]["s3"]["redirect_ttl"] = 60
    proxy = make_proxy(config, env=s3_bucket.env())
    wheel = build_wheel(artifacts_dir / "mine", "acme-redir", "1.0")
    assert upload(proxy.url, wheel, "acme-redir", "1.0").status == 200
    url = f"{proxy.url}/files/acme-redir/{wheel.name}"
    moved = call(url)
    assert moved.status == 302 and moved.headers["cache-control"] == "private, no-store"
    location = moved.headers["location"]
    assert location.startswith(s3_bucket.endpoint_url) and "Signature" in location
    assert call(location).body == wheel.read_bytes()  # no credentials needed
    head = call(url, "HEAD")
    assert head.status == 200 and head.headers["content-length"] == str(wheel.stat().st_size)
    etag = f'"{sha256_file(wheel)}"'
    assert call(url, headers={"If-None-Match": etag}).status == 304
    result = pip_install(proxy.index_url, tmp_path / "target", "acme-redir")
    assert result.returncode == 0, result.stderr
    assert installed_version(tmp_path / "target", "acme-redir") == "1.0"
    # An upstream file: streamed while it is cold, then shared and redirected.
    cold = f"{proxy.url}/files/tiny-redir/{public.name}"
    assert call(proxy.index_url + "tiny-redir/").status == 200
    assert call(cold).body == public.read_bytes()
    assert eventually(lambda: call(cold).status == 302)
    assert call(call(cold).headers["location"]).body == public.read_bytes()


def test_an_upstream_page_naming_a_private_files_hash_never_gets_its_bytes(
    make_proxy: MakeProxy, s3_bucket: Bucket, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    """A private file's sha256 is no secret (lockfiles carry it). A hostile upstream
    page that lists it for a public name must not make the replica hand out the
    private bytes it keeps in its local tier: private files live apart from the
    upstream artifacts, here as in the bucket."""
    proxy = _replicas(make_proxy, s3_bucket, 1, upstream)[0]
    secret = build_wheel(artifacts_dir, "acme-secret", "1.0")
    assert upload(proxy.url, secret, "acme-secret", "1.0").status == 200
    got = call(f"{proxy.url}/files/acme-secret/{secret.name}")
    assert got.body == secret.read_bytes()  # now in this replica's local tier
    lure = "evil_pkg-1.0-py3-none-any.whl"
    upstream.script("/simple/evil-pkg/", {
        "meta": {"api-version": "1.1"}, "name": "evil-pkg",
        "files": [{"filename": lure, "url": f"{upstream.url.rstrip('/')}/../files/{lure}",
                   "hashes": {"sha256": sha256_file(secret)}}],
    })
    upstream.script(f"/files/{lure}", b"not the secret", content_type="application/zip")
    assert call(proxy.index_url + "evil-pkg/").status == 200
    answer = call(f"{proxy.url}/files/evil-pkg/{lure}")
    assert secret.read_bytes() not in answer.body
    assert answer.status == 502 or not answer.complete
