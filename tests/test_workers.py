"""Several worker processes behind one port: shared store and caches, one view of metrics."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import MakeProxy
from tests.support.artifacts import build_wheel
from tests.support.upstream import FakeUpstream
from tests.test_guard import eventually, metric
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
    # Whichever worker answers /metrics, it reports every worker's requests:
    # its own at once, the others' within a flush interval (metrics.FLUSH_INTERVAL).
    def served() -> float:
        return metric(proxy, 'indexguard_http_requests_total{method="GET",'
                             'route="/simple/{project}/",status="200"}')

    assert eventually(lambda: served() == 80, timeout=5), served()
    assert all(served() == 80 for _ in range(4))
    assert metric(proxy, 'indexguard_uploads_total{outcome="stored"}') == 1

    proxy.update_config({"upstream": {"forward": False}})
    proxy.sighup()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proxy.log_text().count("config reloaded") < 2:
        time.sleep(0.1)
    assert all(request(proxy.url + "/simple/public-lib/")[0] == 404 for _ in range(20))
    assert proxy.stop() == 0


def test_a_name_published_in_one_worker_is_private_in_all_at_once(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    """Workers remember which names are not private (no stat per request); a
    publish through any worker must end that memory in every worker before the
    upload is acknowledged, or the next install could still get upstream's files."""
    upstream.add(build_wheel(artifacts_dir / "up", "shared-name", "9.0"))
    config = auth_config(upstream.url, workers=2)
    config["auth"]["anonymous_read"] = True
    proxy = make_proxy(config)
    assert len(_children(proxy.pid)) == 2
    for _ in range(40):  # both workers learn "not private, forwarded"
        status, _h, body = request(proxy.url + "/simple/shared-name/")
        assert status == 200 and b"shared_name-9.0" in body

    wheel = build_wheel(artifacts_dir, "shared-name", "1.0")
    assert twine_upload(proxy.url + "/", [wheel], WRITER, WRITER_SECRET).returncode == 0
    for _ in range(40):
        status, _h, body = request(proxy.url + "/simple/shared-name/")
        assert status == 200
        assert b"shared_name-1.0" in body and b"shared_name-9.0" not in body
    assert proxy.stop() == 0
