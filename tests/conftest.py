"""Shared fixtures: a fake upstream index, a scratch dir for built artifacts, proxy factories.

Support code lives in tests/support; everything talks over 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# `tests.support` and the `proxy` package import from the work tree under any rootdir.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.s3 import Bucket, MotoServer  # noqa: E402
from tests.support.server import ProxyServer  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

MakeProxy = Callable[..., ProxyServer]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A running FakeUpstream, stopped (socket closed) at teardown."""
    fake = FakeUpstream()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[MakeProxy]:
    """Factory: make_proxy(config=None, *, start=True, **kwargs) -> ProxyServer.

    Each server gets its own directory under tmp_path; all are stopped at teardown.
    """
    servers: list[ProxyServer] = []

    def factory(
        config: Mapping[str, Any] | None = None, *, start: bool = True, **kwargs: Any
    ) -> ProxyServer:
        server = ProxyServer(tmp_path / f"proxy{len(servers)}", config, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    yield factory
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server on loopback, shared by the session; tests take their own bucket."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> Bucket:
    """A new empty bucket on the session's moto server."""
    return moto_server.bucket()
