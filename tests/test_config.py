"""Config parsing: defaults, units, and every problem reported with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import ConfigError, build_config, load_config, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default() -> None:
    config = build_config(None)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.upstream.url == "https://pypi.org/simple/"
    assert config.upstream.forward is True
    assert config.auth.anonymous_read is True
    assert config.limits.max_upload == 5 * 2**30


def test_example_config_is_valid_and_documents_every_key() -> None:
    config = load_config(ROOT / "config.example.yaml")
    assert config.auth.anonymous_read is False
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    assert set(raw) == {"listen", "workers", "data_dir", "upstream", "cache", "limits", "auth",
                        "guard", "log", "indexes", "upstreams", "groups", "gitlab", "storage"}


@pytest.mark.parametrize(("text", "expected"), [
    ("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), (1024, 1024),
    ("10 kb", 10_000),
])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("3d", 259200.0), ("90s", 90.0), ("10m", 600.0), (30, 30.0), ("2h", 7200.0),
])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


def test_every_problem_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({
            "listen": {"port": 99999, "hots": "x"},
            "upstream": {"url": "ftp://x", "forward": "yes", "timeout": "soon"},
            "cache": {"max_bytes": "lots"},
            "auth": {"tokens": [{"name": "ci", "sha256": "nothex", "scopes": ["fly"]}]},
            "guard": {"upload_collision": "maybe"},
            "surprise": 1,
        })
    problems = "\n".join(info.value.problems)
    for path in ("listen.port:", "listen.hots: unknown key", "upstream.url:",
                 "upstream.forward:", "upstream.timeout:", "cache.max_bytes:",
                 "auth.tokens[0].sha256:", "auth.tokens[0].scopes:",
                 "guard.upload_collision:", "surprise: unknown key"):
        assert path in problems


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "proxy", "check-config",
                           str(ROOT / "config.example.yaml")], cwd=ROOT, capture_output=True)
    assert good.returncode == 0
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("upstream:\n  forward: perhaps\n  colour: blue\n")
    bad = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad_file)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "upstream.forward:" in bad.stderr and "upstream.colour: unknown key" in bad.stderr
    served = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert served.returncode == 2 and "upstream.colour" in served.stderr


def test_storage_section_is_the_replicas_contract() -> None:
    """storage: {backend: s3, s3: {bucket, prefix, endpoint_url, region}}; the rest refused."""
    config = build_config({"storage": {"backend": "s3", "s3": {
        "bucket": "indexguard", "prefix": "prod/", "endpoint_url": "http://127.0.0.1:9000/",
        "region": "us-east-1"}}})
    assert config.storage.backend == "s3"
    assert config.storage.s3.bucket == "indexguard" and config.storage.s3.prefix == "prod/"
    assert config.storage.s3.endpoint_url == "http://127.0.0.1:9000"
    assert config.storage.s3.redirect_ttl == 0
    assert build_config({}).storage.backend == "local"
    with pytest.raises(ConfigError) as bad:
        build_config({"storage": {"backend": "s3", "s3": {
            "bucket": "Bad_Bucket", "endpoint_url": "http://key:secret@minio:9000",
            "prefix": "/abs", "redirect_ttl": 7200, "credentials": "x"}}})
    problems = "\n".join(bad.value.problems)
    for key in ("bucket", "endpoint_url", "prefix", "redirect_ttl", "credentials"):
        assert f"storage.s3.{key}:" in problems
    assert "secret" not in problems
    with pytest.raises(ConfigError) as missing:
        build_config({"storage": {"backend": "s3"}})
    assert missing.value.problems[0].startswith("storage.s3:")
