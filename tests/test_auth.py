"""auth and login_limit: pure parts in process (the server-level tests are in
tests/test_guard_hardening.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from proxy.auth import client_address
from proxy.cli import connection_cap
from proxy.login_limit import FailureLimit
from proxy.web_simple import private_cache_control

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    assert client_address("192.0.2.1", "6.6.6.6", TRUSTED) == "192.0.2.1"
    assert client_address("10.0.0.5", None, TRUSTED) == "10.0.0.5"
    assert client_address("10.0.0.5", "6.6.6.6, 192.0.2.7", TRUSTED) == "192.0.2.7"
    assert client_address("10.0.0.5", "192.0.2.7, 10.1.1.1", TRUSTED) == "192.0.2.7"
    assert client_address("::1", "[2001:db8::1]:4711", TRUSTED) == "2001:db8::1"
    assert client_address("10.0.0.5", "192.0.2.7:8080", TRUSTED) == "192.0.2.7"
    assert client_address("10.0.0.5", "10.2.2.2, 10.3.3.3", TRUSTED) == "10.2.2.2"
    assert client_address("10.0.0.5", "not-an-ip", TRUSTED) == "10.0.0.5"
    assert client_address("10.0.0.5", "6.6.6.6", ()) == "10.0.0.5"
    assert client_address(None, "6.6.6.6", TRUSTED) == "-"


def test_failure_limit_is_per_client_and_user_in_a_window_and_shared(tmp_path: Path) -> None:
    one, two = FailureLimit(tmp_path / "f.sqlite3"), FailureLimit(tmp_path / "f.sqlite3")
    one.open()
    two.open()
    try:
        over = [(one if i % 2 else two).fail("1.2.3.4", "ci", now=1000.0 + i) for i in range(21)]
        assert over == [False] * 20 + [True]  # two "workers", one count
        assert not one.fail("1.2.3.4", "other", now=1021.0)
        assert not one.fail("5.6.7.8", "ci", now=1021.0)
        assert one.fail("1.2.3.4", "ci", now=1059.0)
        assert not one.fail("1.2.3.4", "ci", now=1061.0)  # a new window
    finally:
        one.close()
        two.close()


def test_private_cache_control_keeps_the_rest() -> None:
    assert private_cache_control("public, max-age=31536000, immutable") == (
        "private, max-age=31536000, immutable")
    assert private_cache_control("max-age=0, must-revalidate") == (
        "private, max-age=0, must-revalidate")
    assert private_cache_control(None) == "private"


def test_connection_cap_leaves_descriptors_for_files() -> None:
    assert connection_cap(None, 1024) == 256
    assert connection_cap(None, 1 << 20) == 10_000
    assert connection_cap(None, 256) == 16
    assert connection_cap(50, 4096) == 50
    assert connection_cap(5000, 4096) == 1792
