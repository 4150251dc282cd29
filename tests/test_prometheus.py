"""A real Prometheus scrapes a real proxy; every dashboard query must return a series."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.support.artifacts import build_wheel
from tests.support.server import ProxyServer, free_port
from tests.support.upstream import FakeUpstream
from tests.support_dashboard import dashboard_exprs
from tests.test_guard import guard_proxy
from tests.test_publish import (
    READER,
    WRITER,
    WRITER_SECRET,
    auth_config,
    request,
    twine_upload,
)

PROMETHEUS = shutil.which("prometheus")
# The dashboard pads every query with a zero so panels never say "No data"; the
# test strips it, so a query that matches nothing fails here instead of showing 0.
PADDING = " or on() vector(0)"


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed (.ci/run installs it)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    proc: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "prometheus.log").open("wb")

    def start(target: str, basic_auth: dict[str, str] | None = None) -> str:
        nonlocal proc
        auth = f"    basic_auth: {json.dumps(basic_auth)}\n" if basic_auth else ""
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: indexguard\n    static_configs: [{{targets: ['{target}']}}]\n"
            + auth
        )
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError((tmp_path / "prometheus.log").read_text()[-2000:])

    yield start, tmp_path  # type: ignore[misc]
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=20)
    log.close()


def query(base: str, expr: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        data = json.load(resp)
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def push_traffic(proxy: ProxyServer, upstream: FakeUpstream, artifacts: Path) -> None:
    pub = build_wheel(artifacts / "up", "public-lib", "1.0")
    upstream.add(pub)
    upstream.add(build_wheel(artifacts / "up", "acme-app", "9.0"))
    mine = build_wheel(artifacts, "acme-app", "1.0")
    assert twine_upload(proxy.url + "/", [mine], WRITER, WRITER_SECRET).returncode == 0
    for _ in range(3):
        assert request(proxy.url + "/simple/public-lib/")[0] == 200
        assert request(f"{proxy.url}/files/public-lib/{pub.name}")[0] == 200
        assert request(proxy.url + "/simple/acme-app/")[0] == 200
        assert request(proxy.url + "/simple/acme-reserved/")[0] == 404
    assert request(proxy.url + "/-/guard", user=READER, secret="wrong")[0] == 401


def test_every_dashboard_query_returns_a_series(
    prometheus: tuple[object, Path], make_proxy: MakeProxy, upstream: FakeUpstream,
    artifacts_dir: Path,
) -> None:
    start, _tmp = prometheus
    proxy = guard_proxy(make_proxy, upstream, private_only=["acme-reserved"])
    base = start(f"127.0.0.1:{proxy.port}")  # type: ignore[operator]
    push_traffic(proxy, upstream, artifacts_dir)
    # rate() needs two scrapes after the traffic.
    exprs = sorted({e.replace(PADDING, "") for e in dashboard_exprs()})
    assert exprs and all(PADDING not in e for e in exprs)
    deadline = time.monotonic() + 30
    empty = exprs
    while time.monotonic() < deadline:
        empty = [e for e in exprs if not query(base, e)]
        if not empty:
            break
        time.sleep(1)
    assert empty == [], f"queries with no series: {empty}"
    blocked = query(base, "sum by (rule) (indexguard_blocked_collisions_total)")
    assert {r["metric"]["rule"] for r in blocked} == {"private"}  # type: ignore[index]


def test_prometheus_scrapes_with_a_metrics_token_when_reading_needs_one(
    prometheus: tuple[object, Path], make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    """deploy/prometheus.yml's basic_auth block, as a real Prometheus uses it."""
    start, tmp = prometheus
    secret = "s3cret-scraper-token"
    config = auth_config(upstream.url)  # anonymous_read: false
    config["auth"]["tokens"].append({"name": "prometheus", "scopes": ["metrics"],
                                     "sha256": hashlib.sha256(secret.encode()).hexdigest()})
    proxy = make_proxy(config)
    password_file = tmp / "indexguard-metrics-token"
    password_file.write_text(secret + "\n")
    base = start(f"127.0.0.1:{proxy.port}",  # type: ignore[operator]
                 {"username": "prometheus", "password_file": str(password_file)})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        up = query(base, 'up{job="indexguard"}')
        if up and up[0]["value"][1] == "1":  # type: ignore[index]
            break
        time.sleep(0.5)
    assert up and up[0]["value"][1] == "1", up  # type: ignore[index]
    assert query(base, "indexguard_http_requests_total")


def test_promtool_accepts_the_deploy_scrape_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([promtool, "check", "config", str(root / "deploy/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
