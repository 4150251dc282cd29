"""The guard and what anonymous clients see (issue 10, items 12-15), against the real server.

12: private and reserved names never reach upstream, collisions still found.
13: reserved patterns are normalized like names.
14: /metrics follows anonymous_read; credentialed answers are Cache-Control: private.
15: the failed-login limit never locks out valid credentials or anonymous reads.
"""

from __future__ import annotations

import contextlib
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
from tests.faults.helpers import basic, call, eventually, sha256_hex
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


def test_workers_share_one_fetch_of_the_project_list(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir, "acme-secret", "1.0"))
    config = auth_config(upstream.url, workers=2, guard={"private_only": ["acme-*"]})
    config["auth"]["anonymous_read"] = True
    proxy = make_proxy(config)
    for _ in range(20):  # fresh connections: both workers see some
        assert call(proxy.url + "/simple/acme-secret/").status == 404
    assert eventually(lambda: _metric(proxy, "indexguard_blocked_collisions_total") == 20)
    assert upstream.requests.count(("GET", "/simple/")) == 1, upstream.requests
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


# ------------------------------------------------------------------ item 14

PROM, PROM_SECRET = "prometheus", "s3cret-metrics-token"


def test_metrics_needs_a_metrics_token_when_reading_needs_one(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    config = auth_config(upstream.url, guard={"private_only": ["acme-*"]})
    proxy = make_proxy(config)  # anonymous_read: false
    anonymous = call(proxy.url + "/metrics")
    assert anonymous.status == 401 and "www-authenticate" in anonymous.headers
    assert b"acme" not in anonymous.body and b"indexguard_" not in anonymous.body
    reader = call(proxy.url + "/metrics", headers={"Authorization": basic(READER, READER_SECRET)})
    assert reader.status == 403
    # A token for the scraper: `indexguard token new --name prometheus --scopes metrics`.
    config["auth"]["tokens"].append({"name": PROM, "sha256": sha256_hex(PROM_SECRET),
                                     "scopes": ["metrics"]})
    proxy.update_config(config)
    proxy.sighup()
    prom = {"Authorization": basic(PROM, PROM_SECRET)}
    assert eventually(lambda: call(proxy.url + "/metrics", headers=prom).status == 200)
    for user, secret in ((PROM, PROM_SECRET), (ADMIN, ADMIN_SECRET)):
        answer = call(proxy.url + "/metrics", headers={"Authorization": basic(user, secret)})
        assert answer.status == 200 and b"indexguard_http_requests_total" in answer.body
        assert answer.headers["cache-control"].startswith("private")
    # The metrics scope reads metrics and nothing else; health stays open for probes.
    assert call(proxy.url + "/simple/acme-x/", headers=prom).status == 403
    assert call(proxy.url + "/-/health").status == 200


def test_answers_that_took_credentials_are_private_to_front_caches(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    pub = build_wheel(artifacts_dir / "up", "public-lib", "1.0")
    upstream.add(pub)
    proxy = make_proxy(auth_config(upstream.url))  # anonymous_read: false
    mine = build_wheel(artifacts_dir, "acme-lib", "1.0")
    assert twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET).returncode == 0
    reader = {"Authorization": basic(READER, READER_SECRET)}
    page, file = "private, max-age=0, must-revalidate", "private, max-age=31536000, immutable"
    wanted = [("/simple/acme-lib/", page), (f"/files/acme-lib/{mine.name}", file),
              ("/simple/public-lib/", page),
              (f"/files/public-lib/{pub.name}", file),  # streamed from upstream
              (f"/files/public-lib/{pub.name}", file)]  # from the cache
    for path, cache_control in wanted:
        answer = call(proxy.url + path, headers=reader)
        assert answer.status == 200, (path, answer.status)
        assert answer.headers["cache-control"] == cache_control, path
        again = call(proxy.url + path, headers={**reader, "If-None-Match": answer.headers["etag"]})
        assert again.status == 304 and again.headers["cache-control"] == cache_control, path

    # Reading opened to all: anonymous answers may be shared, credentialed ones still not.
    proxy.update_config({"auth": {"anonymous_read": True}})
    proxy.sighup()
    assert eventually(lambda: call(proxy.url + "/simple/acme-lib/").status == 200)
    url = f"{proxy.url}/files/acme-lib/{mine.name}"
    assert call(url).headers["cache-control"] == "public, max-age=31536000, immutable"
    assert call(url, headers=reader).headers["cache-control"] == file


# ------------------------------------------------------------------ item 15


def _statuses(url: str, header: str, count: int, source: str | None = None,
              forwarded: str | None = None) -> list[int]:
    headers = {"Authorization": header}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return [call(url, headers=headers, source=source).status for _ in range(count)]


def test_failed_logins_never_lock_out_valid_tokens_or_anonymous_reads(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    """One CI job with an expired token behind a NAT must not lock out the
    others behind the same address."""
    upstream.add(build_wheel(artifacts_dir, "public-lib", "1.0"))
    proxy = _proxy(make_proxy, upstream)  # anonymous_read: true
    url = proxy.url + "/simple/public-lib/"
    expired = basic("old", "s3cret-expired-token")
    assert _statuses(url, expired, 22) == [401] * 20 + [429] * 2
    # The same address: a valid token of another user, and of the very same user
    # name (__token__), anonymous reads, another user's typo.
    assert call(url, headers={"Authorization": basic(WRITER, WRITER_SECRET)}).status == 200
    assert call(url, headers={"Authorization": basic("__token__", WRITER_SECRET)}).status == 200
    assert call(url).status == 200
    assert call(url, headers={"Authorization": basic(READER, "typo")}).status == 401
    # The one refused keeps being refused; another address has its own count.
    assert _statuses(url, expired, 1) == [429]
    assert _statuses(url, expired, 1, source="127.0.0.2") == [401]
    wrong_token = basic("__token__", "guessing")
    assert _statuses(url, wrong_token, 21) == [401] * 20 + [429]
    assert call(url, headers={"Authorization": basic("__token__", READER_SECRET)}).status == 200


def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    config = auth_config(upstream.url, listen={"trusted_proxies": ["127.0.0.2/32"]})
    proxy = make_proxy(config)
    url = proxy.url + "/simple/anything/"
    bad = basic(READER, "wrong")
    # Behind the trusted proxy (peer 127.0.0.2): the right-most address it added counts,
    # whatever the client wrote to its left.
    assert _statuses(url, bad, 21, "127.0.0.2", "6.6.6.6, 10.0.0.9") == [401] * 20 + [429]
    assert _statuses(url, bad, 1, "127.0.0.2", "7.7.7.7, 10.0.0.9") == [429]
    assert _statuses(url, bad, 1, "127.0.0.2", "10.0.0.8") == [401]  # another client
    good = basic(READER, READER_SECRET)
    assert call(url, headers={"Authorization": good, "X-Forwarded-For": "10.0.0.9"},
                source="127.0.0.2").status == 404  # authenticated; no such project
    # From a peer that is no trusted proxy the header is the client's own words: ignored.
    rotating = [call(url, headers={"Authorization": bad, "X-Forwarded-For": f"10.1.0.{i}"},
                     source="127.0.0.3").status for i in range(21)]
    assert rotating == [401] * 20 + [429]


def test_logs_name_the_forwarded_client_only_behind_a_trusted_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    """Behind a balancer every peer is the balancer: the access log and the guard's
    decision lines must name the client it forwarded for, and only a trusted
    balancer may say who that is."""
    config = auth_config(upstream.url, listen={"trusted_proxies": ["127.0.0.2/32"]},
                         guard={"private_only": ["acme-*"]})
    config["auth"]["anonymous_read"] = True
    proxy = make_proxy(config)
    url = proxy.url + "/simple/acme-secret/"
    assert call(url, headers={"X-Forwarded-For": "198.51.100.7"}, source="127.0.0.2").status == 404
    assert call(url, headers={"X-Forwarded-For": "198.51.100.8"}, source="127.0.0.3").status == 404

    def lines(client: str) -> list[dict[str, Any]]:
        out = []
        for line in proxy.log_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                about_it = "rule" in entry or str(entry.get("path")).endswith("/acme-secret/")
                if entry.get("client") == client and about_it:
                    out.append(entry)
        return out

    assert eventually(lambda: len(lines("198.51.100.7")) >= 2), proxy.log_tail()
    trusted = lines("198.51.100.7")
    assert {e["msg"] for e in trusted} >= {"request"} and any("rule" in e for e in trusted)
    # From a peer that is no trusted proxy the header is ignored: the peer is named.
    assert lines("198.51.100.8") == []
    assert eventually(lambda: any(e["msg"] == "request" for e in lines("127.0.0.3")))


def test_the_failed_login_limit_is_one_limit_across_workers(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    config = auth_config(upstream.url, workers=2)
    proxy = make_proxy(config)
    # Fresh connections spread over both workers (SO_REUSEPORT): with a count per
    # worker neither would see 20 of these 24.
    statuses = _statuses(proxy.url + "/simple/anything/", basic(READER, "wrong"), 24)
    assert statuses == [401] * 20 + [429] * 4
    assert call(proxy.url + "/simple/anything/",
                headers={"Authorization": basic(READER, READER_SECRET)}).status == 404
