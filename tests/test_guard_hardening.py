"""The guard and what anonymous clients see (issue 10, items 12-15), against the real server.

12: private and reserved names never reach upstream, collisions still found.
13: reserved patterns are normalized like names.
14: /metrics follows anonymous_read; credentialed answers are Cache-Control: private.
15: the failed-login limit never locks out valid credentials or anonymous reads.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import ConfigError, build_config
from tests.conftest import MakeProxy
from tests.faults.helpers import basic, call, eventually
from tests.support.artifacts import build_wheel
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream
from tests.test_publish import (
    ADMIN,
    ADMIN_SECRET,
    READER,
    READER_SECRET,
    WRITER,
    WRITER_SECRET,
    auth_config,
    twine_upload,
)

ROOT = Path(__file__).resolve().parents[1]
JSON_V1 = "application/vnd.pypi.simple.v1+json"


def _proxy(make_proxy: MakeProxy, upstream: FakeUpstream, *, anonymous_read: bool = True,
           **guard: Any) -> ProxyServer:
    config = auth_config(upstream.url, guard=guard)
    config["auth"]["anonymous_read"] = anonymous_read
    return make_proxy(config)


def _metric(proxy: ProxyServer, name: str, auth: str | None = None, **labels: str) -> float:
    headers = {"Authorization": auth} if auth else {}
    answer = call(proxy.url + "/metrics", headers=headers)
    assert answer.status == 200, answer.status
    total = 0.0
    pattern = re.compile(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+(\S+)$")
    for line in answer.body.decode().splitlines():
        m = pattern.match(line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _guard_report(proxy: ProxyServer) -> dict[str, Any]:
    answer = call(proxy.url + "/-/guard", headers={"Authorization": basic(ADMIN, ADMIN_SECRET)})
    assert answer.status == 200, answer.body
    return dict(orjson.loads(answer.body))


def _paths_naming(upstream: FakeUpstream, *names: str) -> list[str]:
    return [p for _m, p in upstream.requests if any(n in p for n in names)]


# ------------------------------------------------------------------ item 12


def test_private_and_reserved_names_never_reach_upstream_yet_collisions_are_found(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    for name in ("acme-secret", "corp-app", "public-lib"):
        upstream.add(build_wheel(artifacts_dir / "up", name, "9.0"))
    proxy = _proxy(make_proxy, upstream, private_only=["acme-*"])
    mine = build_wheel(artifacts_dir, "corp-app", "1.0")
    assert twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET).returncode == 0
    for _ in range(3):
        assert call(proxy.url + "/simple/acme-secret/").status == 404
        assert call(proxy.url + "/simple/acme-never-published/").status == 404
        assert call(proxy.url + "/files/acme-secret/acme_secret-9.0-py3-none-any.whl").status == 404
        assert call(proxy.url + "/simple/corp-app/").status == 200
    assert call(proxy.url + "/simple/public-lib/").status == 200

    def counted(name: str, rule: str) -> float:
        return _metric(proxy, "indexguard_blocked_collisions_total", project=name, rule=rule)

    assert eventually(lambda: counted("acme-secret", "reserved") >= 3)
    assert eventually(lambda: counted("corp-app", "private") >= 3)
    assert counted("acme-never-published", "reserved") == 0  # not upstream: no collision
    # Upstream was asked for its project list and for the forwarded name only.
    assert _paths_naming(upstream, "acme", "corp") == [], upstream.requests
    assert ("GET", "/simple/") in upstream.requests
    assert ("GET", "/simple/public-lib/") in upstream.requests
    report = _guard_report(proxy)
    assert report["upstream_names"]["state"] == "ok"
    assert report["upstream_names"]["count"] == 3
    seen = {(c["name"], c["rule"]) for c in report["collisions"]}
    assert {("acme-secret", "reserved"), ("corp-app", "private")} <= seen


def test_the_project_list_is_revalidated_with_its_etag(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir, "acme-secret", "1.0"))
    proxy = _proxy(make_proxy, upstream, private_only=["acme-*"], names_ttl=1)
    assert call(proxy.url + "/simple/acme-secret/").status == 404
    assert eventually(lambda: _metric(proxy, "indexguard_upstream_requests_total",
                                      kind="names", outcome="ok") == 1)
    # Past names_ttl the next blocked request starts a conditional refresh: 304.
    assert eventually(lambda: call(proxy.url + "/simple/acme-secret/").status == 404 and _metric(
        proxy, "indexguard_upstream_requests_total", kind="names", outcome="not_modified") >= 1,
        timeout=15, step=0.5)
    assert _paths_naming(upstream, "acme") == []


def test_an_upstream_without_a_usable_list_is_reported_never_probed(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir, "acme-secret", "1.0"))
    upstream.script("/simple/", b"no index here\n", status=404, content_type="text/plain")
    proxy = _proxy(make_proxy, upstream, private_only=["acme-*"])
    assert call(proxy.url + "/simple/acme-secret/").status == 404
    assert eventually(
        lambda: _guard_report(proxy)["upstream_names"]["state"] == "unavailable")
    report = _guard_report(proxy)["upstream_names"]
    assert "404" in report["last_error"] and report["count"] == 0
    assert _metric(proxy, "indexguard_blocked_collisions_total") == 0
    assert _paths_naming(upstream, "acme") == []


def test_a_hostile_project_list_is_bounded_in_bytes(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    # 2 MiB of names, gzipped to a few KiB on the wire: the bound is on what it inflates to.
    names = [f"acme-{i:07d}" for i in range(120_000)]
    body = json.dumps({"meta": {"api-version": "1.1"},
                       "projects": [{"name": n} for n in names]}).encode()
    upstream.script("/simple/", gzip.compress(body), content_type=JSON_V1,
                    headers={"Content-Encoding": "gzip"})
    proxy = _proxy(make_proxy, upstream, private_only=["acme-*"], names_max_bytes="1MiB")
    assert call(proxy.url + "/simple/acme-0000001/").status == 404
    assert eventually(
        lambda: _guard_report(proxy)["upstream_names"]["state"] == "unavailable")
    assert "names_max_bytes" in _guard_report(proxy)["upstream_names"]["last_error"]
    assert _paths_naming(upstream, "acme") == []


# ------------------------------------------------------------------ item 13


def test_reserved_patterns_are_normalized_like_names(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    for name in ("corp-x", "internal-tools", "acme-thing", "corpx"):
        upstream.add(build_wheel(artifacts_dir, name, "1.0"))
    proxy = _proxy(make_proxy, upstream, private_only=["Corp_*", "internal.*", "ACME-*"])
    for path in ("/simple/corp-x/", "/simple/Corp_X/", "/simple/internal-tools/",
                 "/simple/internal.tools/", "/simple/acme-thing/", "/simple/ACME_Thing/"):
        answer = call(proxy.url + path)
        if answer.status == 301:
            answer = call(proxy.url + "/simple/" + answer.headers["location"].split("/")[-2] + "/")
        assert answer.status == 404 and b"reserved" in answer.body, (path, answer.status)
    assert call(proxy.url + "/simple/corpx/").status == 200  # 'corp-*' needs the separator
    assert _paths_naming(upstream, "corp-x", "internal", "acme") == [], upstream.requests
    assert _guard_report(proxy)["private_only"] == ["corp-*", "internal-*", "acme-*"]


def test_patterns_that_can_never_match_are_refused_with_their_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"guard": {"private_only": ["ok-*", "Corp Stuff*"],
                                "allow_shadow": ["team/app"], "min_age_exempt": ["[._]x"]}})
    problems = "\n".join(info.value.problems)
    assert "guard.private_only[1]: 'Corp Stuff*' can never match" in problems
    assert "guard.allow_shadow[0]: 'team/app' can never match" in problems
    assert "guard.min_age_exempt[0]:" in problems
    bad = tmp_path / "bad.yaml"
    bad.write_text("guard:\n  private_only: ['acme/*']\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "guard.private_only[0]: 'acme/*' can never match a project name" in result.stderr
