"""Dependency-confusion scenarios with real pip and uv using the proxy as their sole index."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import MakeProxy
from tests.support.artifacts import build_wheel
from tests.support.clients import installed_version, pip_install, uv_install, uv_venv
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream
from tests.test_publish import (
    ADMIN,
    ADMIN_SECRET,
    WRITER,
    WRITER_SECRET,
    auth_config,
    request,
    twine_upload,
)

JSON_V1 = "application/vnd.pypi.simple.v1+json"


def guard_proxy(make_proxy: MakeProxy, upstream: FakeUpstream, **guard: Any) -> ProxyServer:
    config = auth_config(upstream.url, guard=guard)
    config["auth"]["anonymous_read"] = True
    config["upstream"]["index_ttl"] = 300
    return make_proxy(config)


def metric(proxy: ProxyServer, line_prefix: str) -> float:
    body = request(proxy.url + "/metrics")[2].decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def eventually(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def upstream_file_requests(upstream: FakeUpstream, stem: str) -> list[str]:
    return [p for _m, p in upstream.file_requests() if p.startswith(f"/files/{stem}")]


def test_private_name_beats_a_higher_upstream_version(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir / "evil", "acme-utils", "99.0",
                             module_text="raise SystemExit('pwned')\n"))
    proxy = guard_proxy(make_proxy, upstream)
    mine = build_wheel(artifacts_dir, "acme-utils", "1.0")
    up = twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET)
    assert up.returncode == 0, up.stdout
    # The upload shadowed an upstream name: accepted under the default `warn`, counted.
    assert metric(proxy, 'indexguard_upload_collisions_total{action="warned"}') == 1

    res = pip_install(proxy.index_url, tmp_path / "pip", "acme-utils")
    assert res.returncode == 0, res.stderr
    assert installed_version(tmp_path / "pip", "acme-utils") == "1.0"
    venv = uv_venv(tmp_path / "venv")
    res = uv_install(proxy.index_url, venv, "acme-utils")
    assert res.returncode == 0, res.stderr
    assert installed_version(tmp_path / "venv", "acme-utils") == "1.0"

    assert upstream_file_requests(upstream, "acme") == []
    assert eventually(lambda: metric(
        proxy, 'indexguard_blocked_collisions_total{project="acme-utils",rule="private"}') >= 1)
    logged = [orjson.loads(line) for line in proxy.log_text().splitlines()
              if '"guard decision"' in line]
    assert {"project": "acme-utils", "rule": "private", "client": "127.0.0.1"}.items() <= (
        logged[-1].items()
    )


def test_reserved_pattern_is_never_forwarded(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir, "acme-secret", "1.0"))
    upstream.add(build_wheel(artifacts_dir, "public-thing", "1.0"))
    proxy = guard_proxy(make_proxy, upstream, private_only=["acme-*"])
    status, reason, _ = request(proxy.url + "/simple/acme-secret/")
    assert status == 404 and "reserved" in reason
    res = pip_install(proxy.index_url, tmp_path / "pip", "acme-secret")
    assert res.returncode != 0
    venv = uv_venv(tmp_path / "venv")
    assert uv_install(proxy.index_url, venv, "acme-secret").returncode != 0
    assert upstream_file_requests(upstream, "acme") == []
    assert pip_install(proxy.index_url, tmp_path / "ok", "public-thing").returncode == 0
    assert eventually(lambda: metric(
        proxy, 'indexguard_blocked_collisions_total{project="acme-secret",rule="reserved"}') >= 1)

    admin = request(proxy.url + "/-/guard", user=ADMIN, secret=ADMIN_SECRET)
    assert admin[0] == 200
    report = orjson.loads(admin[2])
    assert report["private_only"] == ["acme-*"]
    seen = {(c["name"], c["rule"]): c for c in report["collisions"]}
    assert seen[("acme-secret", "reserved")]["count"] >= 1
    assert seen[("acme-secret", "reserved")]["first_seen"] <= seen[
        ("acme-secret", "reserved")]["last_seen"]
    assert request(proxy.url + "/-/guard", user=WRITER, secret=WRITER_SECRET)[0] == 403
    assert request(proxy.url + "/-/guard")[0] == 401


def test_deleted_private_name_stays_private(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    proxy = guard_proxy(make_proxy, upstream)
    mine = build_wheel(artifacts_dir, "acme-gone", "1.0")
    assert twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET).returncode == 0
    upstream.add(build_wheel(artifacts_dir / "evil", "acme-gone", "2.0"))
    assert request(f"{proxy.url}/-/files/acme-gone/{mine.name}", method="DELETE",
                   user=ADMIN, secret=ADMIN_SECRET)[0] == 200
    page = orjson.loads(request(proxy.url + "/simple/acme-gone/",
                                headers={"Accept": JSON_V1})[2])
    assert page["files"] == []
    assert pip_install(proxy.index_url, tmp_path / "pip", "acme-gone").returncode != 0
    assert upstream_file_requests(upstream, "acme") == []
    _status, _r, body = request(proxy.url + "/-/guard", user=ADMIN, secret=ADMIN_SECRET)
    assert "acme-gone" in orjson.loads(body)["private_names"]


def test_cached_upstream_file_is_refused_once_the_name_is_private(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    theirs = build_wheel(artifacts_dir / "up", "acme-late", "1.0")
    other = build_wheel(artifacts_dir / "up", "acme-later", "1.0")
    upstream.add(theirs)
    upstream.add(other)
    proxy = guard_proxy(make_proxy, upstream)
    url = f"{proxy.url}/files/acme-late/{theirs.name}"
    assert request(url)[0] == 200  # cached now
    assert request(url)[0] == 200
    mine = build_wheel(artifacts_dir, "acme-late", "2.0")
    assert twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET).returncode == 0
    assert request(url)[0] == 404

    # The same through a reserved pattern added by SIGHUP.
    other_url = f"{proxy.url}/files/acme-later/{other.name}"
    assert request(other_url)[0] == 200
    proxy.update_config({"guard": {"private_only": ["acme-*"]}})
    proxy.sighup()
    assert eventually(lambda: request(other_url)[0] == 404)


def test_upload_collision_policies(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    for name in ("requests-clone", "shadowed-ok"):
        upstream.add(build_wheel(artifacts_dir / "up", name, "1.0"))
    proxy = guard_proxy(make_proxy, upstream, upload_collision="reject",
                        allow_shadow=["shadowed-ok"])
    clash = build_wheel(artifacts_dir, "requests-clone", "0.1")
    res = twine_upload(proxy.url + "/", [clash], WRITER, WRITER_SECRET)
    said = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0 and "403" in said and "exists on the upstream index" in said
    assert not (proxy.data_dir / "private" / "requests-clone").exists()
    allowed = build_wheel(artifacts_dir, "shadowed-ok", "0.1")
    assert twine_upload(proxy.url + "/", [allowed], WRITER, WRITER_SECRET).returncode == 0
    fresh = build_wheel(artifacts_dir, "brand-new-name", "0.1")
    assert twine_upload(proxy.url + "/", [fresh], WRITER, WRITER_SECRET).returncode == 0
    assert metric(proxy, 'indexguard_upload_collisions_total{action="rejected"}') == 1


def test_min_age_hides_fresh_upstream_releases(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = build_wheel(artifacts_dir, "cool-lib", "1.0")
    new = build_wheel(artifacts_dir, "cool-lib", "1.1")
    upstream.add(old, upload_time=now - dt.timedelta(days=10))
    upstream.add(new, upload_time=now - dt.timedelta(hours=1))
    proxy = guard_proxy(make_proxy, upstream, min_age="2d")
    venv = uv_venv(tmp_path / "venv")
    res = uv_install(proxy.index_url, venv, "cool-lib")
    assert res.returncode == 0, res.stderr
    assert installed_version(tmp_path / "venv", "cool-lib") == "1.0"
    assert uv_install(proxy.index_url, venv, "cool-lib==1.1").returncode != 0
    assert request(f"{proxy.url}/files/cool-lib/{new.name}")[0] == 404
    assert upstream_file_requests(upstream, new.name) == []
    assert metric(proxy, "indexguard_min_age_hidden_files_total") >= 1
