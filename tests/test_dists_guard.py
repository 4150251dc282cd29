"""Names, filenames and the guard's rule function."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from packaging.utils import NormalizedName

from proxy.config import Config, Guard, Upstream
from proxy.dists import is_safe_filename, normalize_name, parse_dist_filename
from proxy.errors import BadRequest
from proxy.guard import too_young
from proxy.model import FileEntry
from proxy.resolve import Upstreams, resolve


def test_normalize_name() -> None:
    assert normalize_name("Foo_Bar.baz") == "foo-bar-baz"
    for bad in ("", "-foo", "foo bar", "../x", "a\x00b"):
        with pytest.raises(BadRequest):
            normalize_name(bad)


def test_parse_dist_filename() -> None:
    whl = parse_dist_filename("Foo_Bar-1.0-py3-none-any.whl")
    assert (whl.name, str(whl.version), whl.kind) == ("foo-bar", "1.0", "wheel")
    sdist = parse_dist_filename("foo_bar-2.0rc1.tar.gz")
    assert (sdist.name, str(sdist.version), sdist.kind) == ("foo-bar", "2.0rc1", "sdist")
    for bad in ("foo.exe", "../foo-1.0.tar.gz", "foo-notaversion.tar.gz", "foo-1.0-x.whl",
                "/abs/foo-1.0.tar.gz", ".hidden-1.0.tar.gz"):
        with pytest.raises(BadRequest):
            parse_dist_filename(bad)


def test_safe_filenames() -> None:
    assert is_safe_filename("a-1.0.tar.gz")
    for bad in ("..", ".", "a/b", "a\\b", "a\x00b", "é-1.0.tar.gz", "x" * 300, ""):
        assert not is_safe_filename(bad)


def _config(**guard: object) -> Config:
    return dataclasses.replace(Config(), guard=Guard(**guard))  # type: ignore[arg-type]


def test_rules_apply_in_order() -> None:
    """The rules of a config without groups, as resolve() applies them."""
    n = NormalizedName("acme-utils")

    def rule(config: Config, private: bool) -> str:
        registry = config.registry
        return resolve(n, registry.default_group, registry, lambda _index: private,
                       config.upstream.forward).rule

    reserved = _config(private_only=("acme-*",))
    assert rule(reserved, True) == "private"
    assert rule(reserved, False) == "reserved"
    off = dataclasses.replace(Config(), upstream=Upstream(forward=False))
    assert rule(off, False) == "forward_off"
    assert rule(off, True) == "private"
    assert rule(Config(), False) == "upstream"
    registry = Config().registry
    assert isinstance(resolve(n, registry.default_group, registry, lambda _index: False, True),
                      Upstreams)


def test_min_age_hides_young_files_only() -> None:
    config = _config(min_age=2 * 86400.0, min_age_exempt=("trusted-*",))
    now = 1_700_000_000.0
    young = FileEntry("x-1.0.tar.gz", {}, upload_time="2023-11-14T21:13:20Z")  # now - 1h
    old = FileEntry("x-0.9.tar.gz", {}, upload_time="2023-11-01T00:00:00Z")
    unknown = FileEntry("x-0.8.tar.gz", {})
    name = NormalizedName("x")
    assert too_young(young, name, config, now + 3600)
    assert not too_young(old, name, config, now)
    assert not too_young(unknown, name, config, now)
    assert not too_young(young, NormalizedName("trusted-x"), config, now + 3600)
    assert not too_young(young, name, Config(), now + 3600)


def test_temp_sweep_spares_live_writers(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from proxy.fsutil import TMP_PREFIX, sweep_temp, temp_path

    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = temp_path(tmp_path)  # this process: a leftover of an earlier run
        live = tmp_path / f"{TMP_PREFIX}{sibling.pid}-abc.part"
        dead = tmp_path / f"{TMP_PREFIX}999999999-abc.part"
        legacy = tmp_path / f"{TMP_PREFIX}deadbeef.part"
        for path in (mine, live, dead, legacy):
            path.write_bytes(b"x")
        assert sweep_temp(tmp_path) == 3
        assert [p.name for p in tmp_path.iterdir()] == [live.name]
        assert os.getpid() != sibling.pid
    finally:
        sibling.kill()
        sibling.wait()
