"""Issue 10.17: a hanging upstream costs one timeout per outage, not one per name.

After the upstream fails (no answer within upstream.timeout, refused, 5xx) it
counts as down for upstream.backoff seconds for every name: cached pages answer
at once, names with nothing cached get 502 with the reason, and no request goes
upstream until the outage is over.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import call, metric
from tests.support.artifacts import build_wheel
from tests.support.clients import installed_version, pip_install
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)

NAMES = [f"outage-pkg{i:02d}" for i in range(20)]


def test_a_hanging_upstream_costs_one_timeout_for_a_cached_twenty_package_install(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    for name in NAMES:
        upstream.add(build_wheel(artifacts_dir, name, "1.0"))
    upstream.add(build_wheel(artifacts_dir, "never-cached", "1.0"))
    # index_ttl 0: every page is stale at once, so each would go upstream.
    proxy = make_proxy({"upstream": {"url": upstream.url, "index_ttl": 0, "timeout": 2,
                                     "backoff": 600}})
    first = pip_install(proxy.index_url, tmp_path / "first", *NAMES)
    assert first.returncode == 0, first.stderr

    # The upstream now accepts connections and never answers a page.
    upstream.fault("slow", path_prefix="/simple/", seconds=120)
    upstream.clear_requests()
    again = pip_install(proxy.index_url, tmp_path / "again", *NAMES)
    assert again.returncode == 0, again.stderr
    assert all(installed_version(tmp_path / "again", n) == "1.0" for n in NAMES)
    # One page request ran into the timeout and marked the upstream down; the
    # other nineteen names were answered from the cache without asking.
    asked = upstream.page_requests()
    assert 1 <= len(asked) <= 2, asked
    assert metric(proxy, "indexguard_stale_pages_served_total") >= len(NAMES)

    # A name with nothing cached: 502 with the reason, and upstream is not asked.
    cold = call(proxy.url + "/simple/never-cached/")
    assert cold.status == 502
    assert b"upstream down" in cold.body and b"asking again in" in cold.body
    assert upstream.page_requests("never-cached") == []
    assert "Traceback" not in proxy.log_text()


def test_the_outage_ends_after_backoff_and_pages_heal(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    upstream.add(build_wheel(artifacts_dir, "heal-pkg", "1.0"))
    proxy = make_proxy({"upstream": {"url": upstream.url, "index_ttl": 0, "timeout": 2,
                                     "backoff": 1}})
    assert call(proxy.url + "/simple/heal-pkg/").status == 200
    upstream.fault("status", path_prefix="/simple/", code=503)
    assert call(proxy.url + "/simple/heal-pkg/").status == 200  # stale
    assert call(proxy.url + "/simple/other-pkg/").status == 502
    upstream.clear_faults()
    upstream.add(build_wheel(artifacts_dir, "heal-pkg", "2.0"))
    time.sleep(1.5)  # the backoff (1 s) runs out
    healed = call(proxy.url + "/simple/heal-pkg/")
    assert healed.status == 200 and b"heal_pkg-2.0-" in healed.body
