"""Several worker processes behind one port: shared store and caches, one view of metrics."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import MakeProxy
from tests.support.artifacts import build_wheel
from tests.support.upstream import FakeUpstream
from tests.test_guard import metric
from tests.test_publish import WRITER, WRITER_SECRET, auth_config, request, twine_upload


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def test_two_workers_share_store_metrics_and_signals(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir / "up", "public-lib", "1.0"))
    config = auth_config(upstream.url, workers=2)
    config["auth"]["anonymous_read"] = True
    proxy = make_proxy(config)
    assert len(_children(proxy.pid)) == 2

    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    assert twine_upload(proxy.url + "/", [wheel], WRITER, WRITER_SECRET).returncode == 0
    for _ in range(40):  # spread over both workers by the kernel
        assert request(proxy.url + "/simple/acme-lib/")[0] == 200
        assert request(proxy.url + "/simple/public-lib/")[0] == 200
    # Whichever worker answers /metrics, it reports every worker's requests.
    for _ in range(4):
        served = metric(proxy, 'indexguard_http_requests_total{method="GET",'
                               'route="/simple/{project}/",status="200"}')
        assert served == 80
    assert metric(proxy, 'indexguard_uploads_total{outcome="stored"}') == 1

    proxy.update_config({"upstream": {"forward": False}})
    proxy.sighup()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.log_text().count("config reloaded") < 2:
        time.sleep(0.1)
    assert all(request(proxy.url + "/simple/public-lib/")[0] == 404 for _ in range(20))
    assert proxy.stop() == 0
