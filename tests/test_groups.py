"""Groups end to end: two private indexes, a PyTorch-like and a PyPI-like upstream.

The real server as a subprocess, real pip, uv and twine. The PyTorch-like
upstream answers 403 for names it does not host and links its files on a second
loopback host (127.0.0.2), as download.pytorch.org does. Every test checks the
upstreams' request logs, so that a walk that fell through, or a page merged
from two members, fails it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import Answer, basic, call, sha256_hex
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.clients import (
    Result,
    installed_version,
    pdm,
    pip_install,
    twine_upload,
    uv_install,
    uv_publish,
    uv_venv,
)
from tests.support.server import DELETE, ProxyServer
from tests.support.upstream import FakeUpstream

JSON_V1 = "application/vnd.pypi.simple.v1+json"

# ci writes anywhere; ml-ci writes to ml only and reads the group default only;
# reader reads; ml-admin administers ml only.
WRITER, WRITER_SECRET = "ci", "ig_groups-writer-secret-5d1e"
ML_WRITER, ML_SECRET = "ml-ci", "ig_groups-ml-writer-secret-a07c"
READER, READER_SECRET = "reader", "ig_groups-reader-secret-93bb"
ML_ADMIN, ML_ADMIN_SECRET = "ml-admin", "ig_groups-ml-admin-secret-1f60"


def _token(name: str, secret: str, scopes: list[str], **patterns: list[str]) -> dict[str, Any]:
    return {"name": name, "sha256": sha256_hex(secret), "scopes": scopes, **patterns}


def registry_config(
    pypi: FakeUpstream, torch: FakeUpstream, torch_files: FakeUpstream,
    **pytorch: Any,
) -> dict[str, Any]:
    """Two indexes, the routed PyTorch-like upstream before the PyPI-like one,
    the group default at /simple/ and a second group public."""
    return {
        # upstream.* holds only the defaults once upstreams: is given.
        "upstream": {"url": DELETE, "timeout": 5, "backoff": 15},
        "indexes": [{"name": "platform", "owns": ["acme-*"]}, {"name": "ml"}],
        "upstreams": [
            {"name": "pytorch", "url": torch.url, "not_found": [403, 404],
             "file_hosts": [torch_files.netloc], **pytorch},
            {"name": "pypi", "url": pypi.url},
        ],
        "groups": [
            {"name": "default", "members": [
                {"index": "platform"}, {"index": "ml"},
                {"upstream": "pytorch", "names": ["torch", "nvidia-*"]},
                {"upstream": "pypi"},
            ]},
            {"name": "public", "members": [{"index": "ml"}, {"upstream": "pypi"}],
             "reserved": ["internal-*"]},
            {"name": "offline", "members": [{"index": "platform"}, {"upstream": "pypi"}],
             "forward": False},
        ],
        "gitlab": {
            "projects": {"42": "platform", "acme/platform": "platform",
                         "43": {"index": "ml", "group": "public"}},
            "groups": {"7": "default", "acme": "public"},
        },
        "auth": {"anonymous_read": False, "tokens": [
            _token(WRITER, WRITER_SECRET, ["read", "write"]),
            _token(ML_WRITER, ML_SECRET, ["read", "write"], indexes=["ml"], groups=["default"]),
            _token(READER, READER_SECRET, ["read"]),
            _token(ML_ADMIN, ML_ADMIN_SECRET, ["read", "admin"], indexes=["ml"]),
        ]},
    }


@dataclass
class World:
    proxy: ProxyServer
    pypi: FakeUpstream
    torch: FakeUpstream  # the PyTorch-like index (pages)
    torch_files: FakeUpstream  # the second host its pages link to
    wheels: dict[str, Path]
    artifacts: Path

    def url(self, path: str = "/simple/", user: str = READER, secret: str = READER_SECRET) -> str:
        """An index URL with credentials in it, as pip.conf would have it."""
        return f"http://{user}:{secret}@127.0.0.1:{self.proxy.port}{path}"

    def get(self, path: str, user: str = READER, secret: str = READER_SECRET,
            accept: str = JSON_V1) -> Answer:
        return call(self.proxy.url + path,
                    headers={"Accept": accept, "Authorization": basic(user, secret)})

    def files_on(self, path: str) -> list[str]:
        answer = self.get(path)
        assert answer.status == 200, (path, answer.status, answer.body)
        return sorted(f["filename"] for f in orjson.loads(answer.body)["files"])


@pytest.fixture
def pytorch_like() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """(index, file host): the index answers 403 for names it does not host and
    links its files on 127.0.0.2, served by the second server."""
    files = FakeUpstream(host="127.0.0.2").start()
    try:
        index = FakeUpstream(missing_status=403, files_base=files.base).start()
        try:
            yield index, files
        finally:
            index.stop()
    finally:
        files.stop()


def _publish_upstream(
    artifacts: Path, pypi: FakeUpstream, torch: FakeUpstream, torch_files: FakeUpstream,
) -> dict[str, Path]:
    wheels = {
        # Both upstreams host torch; PyPI's is newer, and must never be seen.
        "torch-routed": build_wheel(artifacts / "pytorch", "torch", "2.1.0",
                                    module_text="SOURCE = 'pytorch'\n"),
        "torch-pypi": build_wheel(artifacts / "pypi", "torch", "2.2.0",
                                  module_text="SOURCE = 'pypi'\n"),
        # The PyTorch index hosts numpy too, but its names filter does not admit it.
        "numpy-routed": build_wheel(artifacts / "pytorch", "numpy", "9.9.0"),
        "numpy": build_wheel(artifacts / "pypi", "numpy", "1.26.0"),
        # Admitted by the filter, not hosted there (403): asked of PyPI next.
        "nvidia-extra": build_wheel(artifacts / "pypi", "nvidia-extra", "3.0"),
        # Reserved in the group public only.
        "internal-tool": build_wheel(artifacts / "pypi", "internal-tool", "1.0"),
        # Higher versions upstream than the private ones the tests upload.
        "shared-pypi": build_wheel(artifacts / "pypi", "shared-lib", "5.0"),
        "nvidia-shared-routed": build_wheel(artifacts / "pytorch", "nvidia-shared", "7.0"),
        "nvidia-shared-pypi": build_wheel(artifacts / "pypi", "nvidia-shared", "8.0"),
    }
    for key, path in wheels.items():
        if key.endswith("-routed"):
            torch.add(path)
            torch_files.add(path)
        else:
            pypi.add(path)
    return wheels


@pytest.fixture
def make_world(
    make_proxy: MakeProxy, upstream: FakeUpstream,
    pytorch_like: tuple[FakeUpstream, FakeUpstream], artifacts_dir: Path,
) -> Callable[..., World]:
    """The upstreams with their wheels, and a proxy over them; keyword arguments
    go to the pytorch upstream's config (index_ttl=0, ...)."""
    def make(**pytorch: Any) -> World:
        torch, torch_files = pytorch_like
        wheels = _publish_upstream(artifacts_dir, upstream, torch, torch_files)
        proxy = make_proxy(registry_config(upstream, torch, torch_files, **pytorch))
        return World(proxy, upstream, torch, torch_files, wheels, artifacts_dir)
    return make


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def _ok(result: Result) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def _refused(result: Result, status: int, reason: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert str(status) in output and reason in output, output


def _routed_file(world: World, name: str) -> list[tuple[str, str]]:
    return [r for r in world.torch_files.file_requests() if r[1].startswith(f"/files/{name}")]


# --- 1. routed names, other names, a name on both upstreams -------------------------


def test_routed_name_from_the_routed_upstream_others_from_pypi_with_pip(
    world: World, tmp_path: Path,
) -> None:
    target = tmp_path / "pip"
    _ok(pip_install(world.url(), target, "torch", "numpy", "nvidia-extra"))
    # torch: the PyTorch-like upstream's 2.1.0, though PyPI has 2.2.0.
    assert installed_version(target, "torch") == "2.1.0"
    assert (target / "torch" / "__init__.py").read_text() == "SOURCE = 'pytorch'\n"
    # numpy: the filter keeps it from the PyTorch-like index, which has 9.9.0.
    assert installed_version(target, "numpy") == "1.26.0"
    # nvidia-extra: admitted, the PyTorch-like index says 403, PyPI answers.
    assert installed_version(target, "nvidia-extra") == "3.0"

    # The torch wheel came from the second host, never from PyPI or the index host.
    assert _routed_file(world, "torch-2.1.0")
    assert world.torch.file_requests() == []
    assert world.pypi.page_requests("torch") == []
    assert not [r for r in world.pypi.file_requests() if "torch" in r[1]]
    # numpy was never asked of the PyTorch-like index.
    assert world.torch.page_requests("numpy") == []
    assert world.pypi.page_requests("numpy")
    assert len(world.torch.page_requests("nvidia-extra")) == 1
    assert world.pypi.page_requests("nvidia-extra")

    # The routed upstream answers alone: its page lists only its files.
    assert world.files_on("/simple/torch/") == [world.wheels["torch-routed"].name]
    assert world.files_on("/simple/numpy/") == [world.wheels["numpy"].name]


def test_routed_name_from_the_routed_upstream_with_uv(world: World, tmp_path: Path) -> None:
    venv = uv_venv(tmp_path / "venv")
    _ok(uv_install(world.url("/g/default/simple/"), venv, "torch", "numpy"))
    assert installed_version(venv, "torch") == "2.1.0"
    assert installed_version(venv, "numpy") == "1.26.0"
    assert _routed_file(world, "torch-2.1.0")
    assert world.pypi.page_requests("torch") == []
    assert world.torch.page_requests("numpy") == []


def test_a_name_on_both_upstreams_lists_only_the_routed_files(world: World) -> None:
    routed = world.wheels["nvidia-shared-routed"]
    for accept in (JSON_V1, "text/html"):
        answer = world.get("/simple/nvidia-shared/", accept=accept)
        assert answer.status == 200
        assert routed.name.encode() in answer.body
        assert world.wheels["nvidia-shared-pypi"].name.encode() not in answer.body
    assert world.pypi.page_requests("nvidia-shared") == []
    # PyPI's file is not served under the group either: files follow the name.
    pypi_file = world.wheels["nvidia-shared-pypi"].name
    assert world.get(f"/files/nvidia-shared/{pypi_file}").status == 404
    answer = world.get(f"/files/nvidia-shared/{routed.name}")
    assert answer.status == 200 and sha256_hex(answer.body) == sha256_file(routed)
    assert world.pypi.file_requests() == []


# --- 2. private names win over both upstreams -------------------------------------------


def test_a_private_name_in_either_index_wins_over_both_upstreams(
    world: World, tmp_path: Path,
) -> None:
    ml_wheel = build_wheel(tmp_path / "ml", "nvidia-shared", "1.0", module_text="P = 'ml'\n")
    platform_wheel = build_wheel(tmp_path / "platform", "shared-lib", "1.0")
    _ok(twine_upload(world.proxy.url + "/i/ml/", [ml_wheel], WRITER, WRITER_SECRET))
    _ok(twine_upload(world.proxy.url + "/i/platform/legacy/", [platform_wheel],
                     WRITER, WRITER_SECRET))
    world.pypi.clear_requests()
    world.torch.clear_requests()

    target = tmp_path / "pip"
    _ok(pip_install(world.url(), target, "nvidia-shared", "shared-lib"))
    # Upstream has 7.0 / 8.0 and 5.0: the private 1.0 wins, alone.
    assert installed_version(target, "nvidia-shared") == "1.0"
    assert installed_version(target, "shared-lib") == "1.0"
    assert world.files_on("/simple/nvidia-shared/") == [ml_wheel.name]
    assert world.files_on("/simple/shared-lib/") == [platform_wheel.name]
    # Neither upstream was asked about them.
    for fake in (world.pypi, world.torch):
        assert fake.page_requests("nvidia-shared") == []
        assert fake.page_requests("shared-lib") == []
    assert world.torch_files.file_requests() == []

    venv = uv_venv(tmp_path / "venv")
    _ok(uv_install(world.url("/g/public/simple/"), venv, "nvidia-shared"))
    assert installed_version(venv, "nvidia-shared") == "1.0"


# --- 3. an error on the routed upstream stops the walk --------------------------------


@pytest.mark.parametrize("fault", ["status", "slow", "garbage"])
def test_routed_upstream_error_is_502_and_never_asks_pypi(
    make_proxy: MakeProxy, upstream: FakeUpstream,
    pytorch_like: tuple[FakeUpstream, FakeUpstream], artifacts_dir: Path, tmp_path: Path,
    fault: str,
) -> None:
    """PyPI hosts torch (2.2.0): a walk that fell through on the routed
    upstream's 503, stall (past its timeout) or unparseable page would answer 200."""
    torch, torch_files = pytorch_like
    _publish_upstream(artifacts_dir, upstream, torch, torch_files)
    proxy = make_proxy(registry_config(upstream, torch, torch_files, timeout=1))
    world = World(proxy, upstream, torch, torch_files, {}, artifacts_dir)
    if fault == "status":
        torch.fault("status", code=503, path_prefix="/simple/")
    elif fault == "slow":
        torch.fault("slow", seconds=10, phase="before", path_prefix="/simple/")
    else:
        torch.script("/simple/torch/", b"\x00\xff not a page {", content_type=JSON_V1)

    answer = world.get("/simple/torch/")
    assert answer.status == 502, answer.body
    assert b"torch" in answer.body
    assert torch.page_requests("torch")
    assert upstream.page_requests("torch") == []
    # Nor does a file of PyPI's torch come through the group.
    pypi_torch = "torch-2.2.0-py3-none-any.whl"
    assert world.get(f"/files/torch/{pypi_torch}").status in (404, 502)
    result = pip_install(world.url(), tmp_path / "pip", "torch", extra=["--retries", "0"])
    assert result.returncode != 0
    assert upstream.page_requests("torch") == [] and upstream.file_requests() == []
    # Names the routed upstream is not asked about still come from PyPI.
    assert world.get("/simple/numpy/").status == 200


# --- 4. owns and token patterns -------------------------------------------------------------


def test_owns_and_token_patterns_refuse_with_403(world: World, tmp_path: Path) -> None:
    acme = build_wheel(tmp_path, "acme-x", "1.0")
    # acme-* belongs to platform: not even a token that may write anywhere puts it in ml.
    result = twine_upload(world.proxy.url + "/i/ml/", [acme], WRITER, WRITER_SECRET)
    _refused(result, 403, "acme-x belongs to index platform")
    assert world.get("/i/ml/simple/acme-x/").status == 404
    # ml-ci writes to ml only.
    result = twine_upload(world.proxy.url + "/i/platform/", [acme], ML_WRITER, ML_SECRET)
    _refused(result, 403, "Token ml-ci may not upload to index platform")
    assert world.get("/i/platform/simple/acme-x/").status == 404
    # The owner takes it.
    _ok(twine_upload(world.proxy.url + "/i/platform/", [acme], WRITER, WRITER_SECRET))
    assert world.files_on("/i/platform/simple/acme-x/") == [acme.name]

    # ml-ci reads the group default only, and the index ml alone.
    hidden = world.get("/g/public/simple/numpy/", ML_WRITER, ML_SECRET)
    assert hidden.status == 403 and b"may not read group public" in hidden.body
    hidden = world.get("/i/platform/simple/acme-x/", ML_WRITER, ML_SECRET)
    assert hidden.status == 403 and b"may not read index platform" in hidden.body
    assert world.get("/g/default/simple/acme-x/", ML_WRITER, ML_SECRET).status == 200
    assert world.get("/simple/acme-x/", ML_WRITER, ML_SECRET).status == 200
    # uv stops there and says why (pip says only "no matching distribution").
    result = uv_install(world.url("/g/public/simple/", ML_WRITER, ML_SECRET),
                        uv_venv(tmp_path / "venv"), "numpy")
    assert result.returncode != 0 and "403" in result.stderr, result.stderr


# --- 5. GitLab's URL layout -----------------------------------------------------------------


def test_gitlab_project_and_group_urls(world: World, tmp_path: Path) -> None:
    lib = build_wheel(tmp_path / "dist", "acme-lib", "1.0", module_text="GL = True\n")
    project = world.proxy.url + "/api/v4/projects/42/packages/pypi"
    result = twine_upload(project, [lib], WRITER, WRITER_SECRET, extra=["--verbose"])
    _ok(result)
    assert "201" in result.stdout + result.stderr
    # It went to platform, the project's index.
    assert world.files_on("/i/platform/simple/acme-lib/") == [lib.name]
    assert world.get("/i/ml/simple/acme-lib/").status == 404

    # pip through the project (the group default: torch routed, numpy from PyPI).
    target = tmp_path / "pip"
    _ok(pip_install(world.url("/api/v4/projects/42/packages/pypi/simple"), target,
                    "acme-lib", "torch", "numpy"))
    assert installed_version(target, "acme-lib") == "1.0"
    assert installed_version(target, "torch") == "2.1.0"
    assert installed_version(target, "numpy") == "1.26.0"

    # The group 7 (default) root lists the private name; its pages answer.
    root = world.get("/api/v4/groups/7/-/packages/pypi/simple/")
    assert root.status == 200 and b"acme-lib" in root.body
    assert world.files_on("/api/v4/groups/7/-/packages/pypi/simple/acme-lib/") == [lib.name]
    venv = uv_venv(tmp_path / "venv")
    _ok(uv_install(world.url("/api/v4/groups/7/-/packages/pypi/simple/"), venv, "torch"))
    assert installed_version(venv, "torch") == "2.1.0"

    # A path id, URL-encoded as GitLab's clients send it; paths ignore case.
    for ident in ("acme%2Fplatform", "ACME%2Fplatform"):
        path = f"/api/v4/projects/{ident}/packages/pypi/simple/acme-lib/"
        assert world.files_on(path) == [lib.name], ident
    encoded = build_wheel(tmp_path / "dist", "acme-lib", "1.1")
    _ok(twine_upload(world.proxy.url + "/api/v4/projects/acme%2Fplatform/packages/pypi",
                     [encoded], WRITER, WRITER_SECRET))
    assert world.files_on("/i/platform/simple/acme-lib/") == [lib.name, encoded.name]
    # Project 43 is {index: ml, group: public}: reads go through public, where
    # torch is not routed (PyPI's), and uploads into ml.
    assert world.files_on("/api/v4/projects/43/packages/pypi/simple/torch/") == [
        world.wheels["torch-pypi"].name]
    ml_lib = build_wheel(tmp_path / "ml", "ml-lib", "1.0")
    # uv publish takes GitLab's 201 too.
    _ok(uv_publish(world.proxy.url + "/api/v4/projects/43/packages/pypi", [ml_lib],
                   ML_WRITER, ML_SECRET))
    assert world.files_on("/i/ml/simple/ml-lib/") == [ml_lib.name]
    # ml-ci may write to ml, but read only the group default: not through 43.
    assert world.get("/api/v4/projects/43/packages/pypi/simple/ml-lib/",
                     ML_WRITER, ML_SECRET).status == 403
    # Unknown ids are 404 with the reason, never a redirect elsewhere.
    for path in ("/api/v4/projects/99/packages/pypi/simple/numpy/",
                 "/api/v4/groups/99/-/packages/pypi/simple/numpy/"):
        answer = world.get(path)
        assert answer.status == 404 and b"No GitLab" in answer.body, path


def test_gitlab_file_url_serves_only_a_matching_sha256(world: World, tmp_path: Path) -> None:
    lib = build_wheel(tmp_path / "dist", "acme-lib", "1.0")
    _ok(twine_upload(world.proxy.url + "/api/v4/projects/42/packages/pypi", [lib],
                     WRITER, WRITER_SECRET))
    base = "/api/v4/projects/42/packages/pypi/files"
    private_sha = sha256_file(lib)
    torch_wheel = world.wheels["torch-routed"]
    torch_sha = sha256_file(torch_wheel)

    answer = world.get(f"{base}/{private_sha}/{lib.name}")
    assert answer.status == 200 and answer.body == lib.read_bytes()
    auth = {"Authorization": basic(READER, READER_SECRET)}
    head = call(f"{world.proxy.url}{base}/{private_sha}/{lib.name}", "HEAD", headers=auth)
    assert head.status == 200 and head.headers["etag"] == f'"{private_sha}"'
    head = call(f"{world.proxy.url}{base}/{'1' * 64}/{lib.name}", "HEAD", headers=auth)
    assert head.status == 404
    # An upstream file, by its hash, from the member that answers the name.
    answer = world.get(f"{base}/{torch_sha}/{torch_wheel.name}")
    assert answer.status == 200 and answer.body == torch_wheel.read_bytes()
    assert _routed_file(world, "torch-2.1.0")

    # Another file's hash, a hash of nothing, a hash of PyPI's torch: 404.
    pypi_torch = world.wheels["torch-pypi"]
    for key, filename in (
        (torch_sha, lib.name),
        (private_sha, torch_wheel.name),
        ("0" * 64, lib.name),
        (sha256_file(pypi_torch), pypi_torch.name),
    ):
        answer = world.get(f"{base}/{key}/{filename}")
        assert answer.status == 404, (key, filename, answer.body)
    assert world.pypi.file_requests() == []
    # An upper-case hash is not a hash: never served as one (it is taken for a
    # project name, whose normalized URL is the lower-case form, checked as above).
    upper = world.get(f"{base}/{private_sha.upper()}/{lib.name}")
    assert upper.status == 301 and upper.headers["location"] == f"../{private_sha}/{lib.name}"


# --- 6. one index alone; a second group ---------------------------------------------------


def test_an_index_alone_and_a_second_group(world: World, tmp_path: Path) -> None:
    shared = build_wheel(tmp_path, "shared-lib", "1.0")
    _ok(twine_upload(world.proxy.url + "/i/ml/", [shared], WRITER, WRITER_SECRET))
    world.pypi.clear_requests()
    world.torch.clear_requests()

    # /i/ml/ shows ml alone: its private name, nothing upstream.
    assert world.files_on("/i/ml/simple/shared-lib/") == [shared.name]
    for name in ("numpy", "torch"):
        answer = world.get(f"/i/ml/simple/{name}/")
        assert answer.status == 404, name
    assert world.get("/i/platform/simple/shared-lib/").status == 404
    assert world.pypi.requests == [] and world.torch.requests == []
    root = world.get("/i/ml/simple/")
    assert root.status == 200
    assert [p["name"] for p in orjson.loads(root.body)["projects"]] == ["shared-lib"]
    assert world.get("/i/nope/simple/numpy/").status == 404

    # The group public: ml, then PyPI alone (torch is PyPI's there: no route).
    assert world.files_on("/g/public/simple/shared-lib/") == [shared.name]
    assert world.files_on("/g/public/simple/torch/") == [world.wheels["torch-pypi"].name]
    assert world.torch.requests == []
    target = tmp_path / "pip"
    _ok(pip_install(world.url("/g/public/simple/"), target, "torch", "shared-lib"))
    assert installed_version(target, "torch") == "2.2.0"
    assert installed_version(target, "shared-lib") == "1.0"
    assert world.get("/g/nope/simple/numpy/").status == 404

    # A group's own reserved patterns and forwarding toggle: 404 with the
    # reason, never asked upstream; the group default still forwards the name.
    world.pypi.clear_requests()
    reserved = world.get("/g/public/simple/internal-tool/")
    assert reserved.status == 404 and b"reserved" in reserved.body
    offline = world.get("/g/offline/simple/numpy/")
    assert offline.status == 404 and b"forwarding upstream is off for group offline" \
        in offline.body
    assert world.pypi.requests == []
    assert world.files_on("/simple/internal-tool/") == [world.wheels["internal-tool"].name]


def test_reader_sees_the_token_error_reason_in_twine(world: World, tmp_path: Path) -> None:
    """A read-only token uploading: 403 with the scope in twine's output."""
    wheel = build_wheel(tmp_path, "shared-lib", "1.0")
    result = twine_upload(world.proxy.url + "/i/ml/", [wheel], READER, READER_SECRET)
    _refused(result, 403, "lacks the write scope")


# --- the guard's project list comes from a configured upstream ---------------------------


def test_upload_collisions_are_checked_against_the_configured_catch_all_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream,
    pytorch_like: tuple[FakeUpstream, FakeUpstream], artifacts_dir: Path, tmp_path: Path,
) -> None:
    """With upstreams: given, upstream.url is not an upstream any more: the
    project list must come from the default group's catch-all (the PyPI-like
    one), never from upstream.url's default, the public PyPI."""
    torch, torch_files = pytorch_like
    _publish_upstream(artifacts_dir, upstream, torch, torch_files)
    only_here = build_wheel(artifacts_dir / "pypi", "zz-indexguard-fixture-only", "1.0")
    upstream.add(only_here)
    config = registry_config(upstream, torch, torch_files)
    config["guard"] = {"upload_collision": "reject"}
    proxy = make_proxy(config)

    mine = build_wheel(tmp_path, "zz-indexguard-fixture-only", "0.1")
    result = twine_upload(proxy.url + "/i/ml/", [mine], WRITER, WRITER_SECRET)
    _refused(result, 403, "exists on the upstream index")
    assert ("GET", "/simple/") in upstream.requests
    assert ("GET", "/simple/") not in torch.requests
    # A name upstream does not list is taken.
    fresh = build_wheel(tmp_path, "zz-indexguard-fixture-new", "0.1")
    _ok(twine_upload(proxy.url + "/i/ml/", [fresh], WRITER, WRITER_SECRET))


def test_gitlab_urls_take_any_username_with_a_token(world: World, tmp_path: Path) -> None:
    """GitLab ignores the username (CI uses gitlab-ci-token): so do its URLs here,
    with our tokens; a wrong secret is still refused, and elsewhere the username
    must still be the token's name or __token__."""
    lib = build_wheel(tmp_path / "dist", "acme-ci", "1.0")
    project = world.proxy.url + "/api/v4/projects/42/packages/pypi"
    _ok(twine_upload(project, [lib], "gitlab-ci-token", WRITER_SECRET))
    target = tmp_path / "pip"
    _ok(pip_install(world.url("/api/v4/projects/42/packages/pypi/simple", "jane.doe",
                              READER_SECRET), target, "acme-ci"))
    assert installed_version(target, "acme-ci") == "1.0"
    group_page = "/api/v4/groups/7/-/packages/pypi/simple/acme-ci/"
    assert world.get(group_page, "gitlab-ci-token", READER_SECRET).status == 200
    # The token's own patterns still apply, whatever the username.
    assert world.get("/api/v4/groups/acme/-/packages/pypi/simple/numpy/",
                     "gitlab-ci-token", ML_SECRET).status == 403
    result = twine_upload(project, [lib], "gitlab-ci-token", ML_SECRET)
    _refused(result, 403, "may not upload to index platform")
    # A wrong secret is refused with any username.
    assert world.get(group_page, "gitlab-ci-token", "ig_wrong").status == 401
    # Our own URLs keep the rule: the token's name or __token__.
    assert world.get("/simple/acme-ci/", "gitlab-ci-token", READER_SECRET).status == 401
    assert world.get("/simple/acme-ci/", "__token__", READER_SECRET).status == 200


def test_gitlab_urls_charge_failed_logins_to_the_client_whatever_the_username(
    world: World,
) -> None:
    """Any username is taken there, so a new one per guess must not buy new
    tries: 20 failures from one client, then 429, with 21 usernames."""
    page = "/api/v4/projects/42/packages/pypi/simple/numpy/"
    statuses = [world.get(page, f"guess-{i}", f"ig_wrong-{i}").status for i in range(21)]
    assert statuses[:20] == [401] * 20 and statuses[20] == 429, statuses
    # The right secret is never refused by the limit.
    assert world.get(page, "gitlab-ci-token", READER_SECRET).status == 200


# --- per-upstream settings ------------------------------------------------------------


def test_min_age_applies_per_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream,
    pytorch_like: tuple[FakeUpstream, FakeUpstream], artifacts_dir: Path, tmp_path: Path,
) -> None:
    """upstreams[].min_age hides that upstream's young files, and only its own."""
    torch, torch_files = pytorch_like
    _publish_upstream(artifacts_dir, upstream, torch, torch_files)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    young_torch = build_wheel(artifacts_dir / "pytorch", "torch", "2.1.5")
    torch.add(young_torch, upload_time=hour_ago)
    torch_files.add(young_torch)
    young_numpy = build_wheel(artifacts_dir / "pypi", "numpy", "1.27.0")
    upstream.add(young_numpy, upload_time=hour_ago)
    proxy = make_proxy(registry_config(upstream, torch, torch_files, min_age="1d"))
    world = World(proxy, upstream, torch, torch_files, {}, artifacts_dir)

    assert world.files_on("/simple/torch/") == ["torch-2.1.0-py3-none-any.whl"]
    assert world.get(f"/files/torch/{young_torch.name}").status == 404
    assert _routed_file(world, "torch-2.1.5") == []
    # PyPI-like has no min_age (nor has guard.*): its young file is shown.
    assert young_numpy.name in world.files_on("/simple/numpy/")
    target = tmp_path / "pip"
    _ok(pip_install(world.url(), target, "torch", "numpy"))
    assert installed_version(target, "torch") == "2.1.0"
    assert installed_version(target, "numpy") == "1.27.0"


# --- 7. pdm -----------------------------------------------------------------------------------


def test_pdm_publishes_to_an_index_and_installs_through_the_group(
    world: World, tmp_path: Path,
) -> None:
    project = tmp_path / "app"
    project.mkdir()
    lib = build_wheel(project / "dist", "ml-tools", "1.0", requires_dist=["nvidia-extra"])
    (project / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "0"\nrequires-python = ">=3.11"\n'
        'dependencies = ["torch", "numpy", "ml-tools"]\n\n'
        "[tool.pdm]\ndistribution = false\n\n"
        f'[[tool.pdm.source]]\nname = "pypi"\nurl = "{world.url()}"\n'
    )
    # Made first: pdm would make one of its own, with whatever interpreter it finds.
    venv = uv_venv(project / ".venv")
    _ok(pdm(project, "publish", "--no-build", "-r", world.proxy.url + "/i/ml/",
            "-u", WRITER, "-P", WRITER_SECRET))
    assert world.files_on("/i/ml/simple/ml-tools/") == [lib.name]

    _ok(pdm(project, "install", "--no-self"))
    assert installed_version(venv, "torch") == "2.1.0"
    assert installed_version(venv, "numpy") == "1.26.0"
    assert installed_version(venv, "ml-tools") == "1.0"
    assert installed_version(venv, "nvidia-extra") == "3.0"
    # The lock pins the routed upstream's torch, by its hash.
    lock = (project / "pdm.lock").read_text()
    assert sha256_file(world.wheels["torch-routed"]) in lock
    assert sha256_file(world.wheels["torch-pypi"]) not in lock
    assert _routed_file(world, "torch-2.1.0")
    assert world.pypi.page_requests("torch") == []


# --- admin per index; names held by two indexes ---------------------------------------------


def test_admin_acts_per_index_and_the_guard_reports_names_held_twice(
    world: World, tmp_path: Path,
) -> None:
    in_platform = build_wheel(tmp_path / "platform", "shared-lib", "1.0")
    in_ml = build_wheel(tmp_path / "ml", "shared-lib", "2.0")
    _ok(twine_upload(world.proxy.url + "/i/platform/", [in_platform], WRITER, WRITER_SECRET))
    _ok(twine_upload(world.proxy.url + "/i/ml/", [in_ml], WRITER, WRITER_SECRET))
    # The first index of the group answers alone; ml's 2.0 is hidden there, not merged.
    assert world.files_on("/simple/shared-lib/") == [in_platform.name]
    assert world.files_on("/g/public/simple/shared-lib/") == [in_ml.name]
    assert world.files_on("/i/ml/simple/shared-lib/") == [in_ml.name]
    assert world.get(f"/files/shared-lib/{in_ml.name}").status == 404

    admin = {"Authorization": basic(ML_ADMIN, ML_ADMIN_SECRET)}
    report = call(world.proxy.url + "/-/guard", headers=admin)
    assert report.status == 200, report.body
    groups = orjson.loads(report.body)["groups"]
    assert groups["default"]["held_twice"] == {"shared-lib": ["platform", "ml"]}
    assert groups["public"]["held_twice"] == {}

    # ml-admin yanks in ml; not in platform, nor at /-/ (the first index, platform).
    yank = call(world.proxy.url + "/i/ml/-/yank/shared-lib/2.0", "POST", headers=admin)
    assert yank.status == 200, yank.body
    page = orjson.loads(world.get("/i/ml/simple/shared-lib/").body)
    assert page["files"][0]["yanked"] is True
    for path in ("/i/platform/-/yank/shared-lib/1.0", "/-/yank/shared-lib/1.0"):
        refused = call(world.proxy.url + path, "POST", headers=admin)
        assert refused.status == 403 and b"may not administer index platform" in refused.body
    page = orjson.loads(world.get("/i/platform/simple/shared-lib/").body)
    assert page["files"][0]["yanked"] is False


def test_a_routed_upstreams_403_never_clears_a_name_for_upload(
    make_proxy: MakeProxy, upstream: FakeUpstream,
    pytorch_like: tuple[FakeUpstream, FakeUpstream], artifacts_dir: Path, tmp_path: Path,
) -> None:
    """The PyTorch-like upstream not hosting nvidia-extra says nothing of PyPI,
    which has it: an upload of it under upload_collision: reject is refused,
    even right after a walk that got that 403 and then failed on PyPI."""
    torch, torch_files = pytorch_like
    _publish_upstream(artifacts_dir, upstream, torch, torch_files)
    config = registry_config(upstream, torch, torch_files)
    config["guard"] = {"upload_collision": "reject"}
    proxy = make_proxy(config)
    world = World(proxy, upstream, torch, torch_files, {}, artifacts_dir)
    upstream.fault("status", code=503, path_prefix="/simple/nvidia-extra/")
    assert world.get("/simple/nvidia-extra/").status == 502
    assert len(torch.page_requests("nvidia-extra")) == 1

    mine = build_wheel(tmp_path, "nvidia-extra", "0.1")
    result = twine_upload(proxy.url + "/i/ml/", [mine], WRITER, WRITER_SECRET)
    _refused(result, 403, "exists on the upstream index")


def test_routed_upstream_error_with_a_cached_page_serves_it_stale(
    make_world: Callable[..., World],
) -> None:
    """Stale rules per upstream: the routed upstream's own cached page, never PyPI's."""
    world = make_world(index_ttl=0)
    torch, upstream, wheels = world.torch, world.pypi, world.wheels
    assert world.files_on("/simple/torch/") == [wheels["torch-routed"].name]
    torch.fault("status", code=503, path_prefix="/simple/")
    asked = len(torch.page_requests("torch"))
    assert world.files_on("/simple/torch/") == [wheels["torch-routed"].name]
    assert len(torch.page_requests("torch")) == asked + 1  # asked again: it was stale
    answer = world.get(f"/files/torch/{wheels['torch-routed'].name}")
    assert answer.status == 200 and answer.body == wheels["torch-routed"].read_bytes()
    assert upstream.page_requests("torch") == [] and upstream.file_requests() == []
