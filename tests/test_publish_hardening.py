"""Issue 10, items 8-11: what a stolen write token can do to the write path.

Each attack is played against the real server subprocess: decompression bombs and
exotic compression in wheels (8), a second spelling or a deleted name replacing a
published file's bytes (9), sdists and form fields that are not what they say (10),
and `upload_collision: reject` failing open when upstream cannot answer (11).
"""

from __future__ import annotations

import http.client
import io
import struct
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy import distcheck
from proxy.dists import file_key, parse_dist_filename
from proxy.errors import BadRequest
from tests.conftest import MakeProxy
from tests.faults.helpers import (
    ADMIN,
    ADMIN_SECRET,
    JSON_V1,
    WRITER,
    WRITER_SECRET,
    Answer,
    auth_config,
    basic,
    call,
    eventually,
    sha256_hex,
)
from tests.support.artifacts import build_sdist, build_wheel, sha256_file
from tests.support.clients import pip_install, twine_upload
from tests.support.forms import multipart
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(300)


def _config(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = auth_config()
    config["upstream"] = {"url": upstream.url, "timeout": 5}
    config["log"] = {"level": "info"}
    config.update(extra)
    return config


@pytest.fixture
def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> ProxyServer:
    return make_proxy(_config(upstream))


def _fields(name: str, version: str, content: bytes, filetype: str = "bdist_wheel",
            **extra: str) -> list[tuple[str, str]]:
    fields = {
        ":action": "file_upload", "protocol_version": "1", "metadata_version": "2.1",
        "name": name, "version": version, "filetype": filetype,
        "pyversion": "source" if filetype == "sdist" else "py3",
        "sha256_digest": sha256_hex(content),
    }
    fields.update(extra)
    return list(fields.items())


def _post(proxy: ProxyServer, fields: Sequence[tuple[str, str]],
          file: tuple[str, bytes] | None, timeout: float = 120) -> Answer:
    body, ctype = multipart(fields, file)
    return call(proxy.url + "/", "POST", body=body, timeout=timeout,
                headers={"Content-Type": ctype, "Authorization": basic(WRITER, WRITER_SECRET)})


def _upload(proxy: ProxyServer, path: Path, name: str, version: str,
            filename: str | None = None, **extra: str) -> Answer:
    content = path.read_bytes()
    filetype = "bdist_wheel" if (filename or path.name).endswith(".whl") else "sdist"
    return _post(proxy, _fields(name, version, content, filetype, **extra),
                 (filename or path.name, content))


def _reason(answer: Answer) -> str:
    return answer.body.decode(errors="replace")


def _files(proxy: ProxyServer, name: str) -> dict[str, str]:
    answer = call(f"{proxy.url}/simple/{name}/", headers={"Accept": JSON_V1})
    assert answer.status == 200, answer.status
    return {f["filename"]: f["hashes"]["sha256"] for f in orjson.loads(answer.body)["files"]}


# --- archives built by hand ---------------------------------------------------------------

_METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"


def _wheel(dest: Path, name: str, version: str, *, method: int = zipfile.ZIP_DEFLATED,
           padding: int = 0, metadata: str | None = None) -> Path:
    """A wheel whose METADATA is compressed with `method`, followed by `padding`
    zero bytes (streamed, so the test never holds them)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    path = dest / f"{stem}-{version}-py3-none-any.whl"
    text = metadata if metadata is not None else _METADATA.format(name=name, version=version)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"{stem}/__init__.py", (2020, 1, 1, 0, 0, 0)), b"")
        info = zipfile.ZipInfo(f"{stem}-{version}.dist-info/METADATA", (2020, 1, 1, 0, 0, 0))
        info.compress_type = method
        with zf.open(info, "w") as out:
            out.write((text + "\n").encode())
            zero = bytes(2**20)
            for _ in range(padding // len(zero)):
                out.write(zero)
        zf.writestr(f"{stem}-{version}.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n")
        zf.writestr(f"{stem}-{version}.dist-info/RECORD", "")
    return path


def _lie_about_size(path: Path, member: str, size: int) -> None:
    """Rewrite a member's uncompressed size in the central directory (what zipfile trusts)."""
    data = bytearray(path.read_bytes())
    count, _cd_size, offset = struct.unpack_from("<HII", data, len(data) - 22 + 10)
    pos = offset
    for _ in range(count):
        assert data[pos: pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46: pos + 46 + n].decode() == member:
            struct.pack_into("<I", data, pos + 24, size)
            path.write_bytes(bytes(data))
            return
        pos += 46 + n + m + k
    raise AssertionError(f"{member} not in {path}")


TarMember = tuple[str, bytes | None, bytes]  # name, data (None: no data), tar type


def _tar_gz(path: Path, members: Sequence[TarMember], *, fmt: int = tarfile.PAX_FORMAT,
            pax: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", format=fmt) as tf:
        for i, (name, data, kind) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.type = kind
            if i == 0 and pax:
                info.pax_headers = dict(pax)
            if kind == tarfile.SYMTYPE:
                info.linkname = "setup.py"
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _zip_sdist(path: Path, members: Sequence[tuple[str, bytes]],
               method: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _pkg_info(name: str = "acme-lib", version: str = "1.0", extra: str = "") -> bytes:
    return (_METADATA.format(name=name, version=version) + extra + "\n").encode()


@pytest.fixture
def rss_peak(proxy: ProxyServer) -> Iterator[list[int]]:
    """[baseline, peak] of the server's resident memory, sampled while the test runs."""
    seen = [proxy.rss_bytes(include_children=True)] * 2
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen[1] = max(seen[1], proxy.rss_bytes(include_children=True))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield seen
    done.set()
    watcher.join()


# --- item 8: decompression bombs -----------------------------------------------------------

def test_metadata_bomb_with_a_lying_size_is_400_and_memory_stays_flat(
    proxy: ProxyServer, artifacts_dir: Path, rss_peak: list[int],
) -> None:
    # 512 MiB of zeros deflate to about half a megabyte; the central directory
    # claims METADATA is 200 bytes, so a size check on the header lets it through.
    bomb = _wheel(artifacts_dir, "acme-bomb", "1.0", padding=512 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20
    _lie_about_size(bomb, "acme_bomb-1.0.dist-info/METADATA", 200)
    answer = _upload(proxy, bomb, "acme-bomb", "1.0")
    grown = rss_peak[1] - rss_peak[0]
    assert grown < 100 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert "not a valid wheel" in _reason(answer) and "METADATA" in _reason(answer)
    # The same with an honest header is refused before anything is inflated.
    honest = _wheel(artifacts_dir / "honest", "acme-bomb", "1.0", padding=64 * 2**20)
    answer = _upload(proxy, honest, "acme-bomb", "1.0")
    assert answer.status == 400 and "METADATA is larger than" in _reason(answer)
    assert not (proxy.data_dir / "private" / "acme-bomb").exists()
    assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize(("method", "number"), [
    (zipfile.ZIP_BZIP2, 12), (zipfile.ZIP_LZMA, 14),
])
def test_compression_other_than_stored_or_deflate_is_400(
    proxy: ProxyServer, artifacts_dir: Path, method: int, number: int,
) -> None:
    # bzip2 turns 64 MiB of zeros into 79 bytes, and zipfile inflates such a
    # member in one call whatever size is asked for: refused before any read.
    wheel = _wheel(artifacts_dir, "acme-lib", "1.0", method=method)
    answer = _upload(proxy, wheel, "acme-lib", "1.0")
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert f"compression method {number}" in _reason(answer)
    assert "only stored and deflate" in _reason(answer)
    assert not (proxy.data_dir / "private" / "acme-lib").exists()


def test_zip_member_count_and_central_directory_are_bounded(tmp_path: Path) -> None:
    many = tmp_path / "acme_lib-1.0-py3-none-any.whl"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(distcheck.MAX_MEMBERS + 1):
            zf.writestr(f"{i:x}", b"")
    with pytest.raises(BadRequest, match="more than 50000 members"):
        distcheck.read_wheel_metadata(many, parse_dist_filename(many.name))
    # An end record that under-states the count: the directory's size still bounds it.
    data = bytearray(many.read_bytes())
    struct.pack_into("<HH", data, len(data) - 22 + 8, 3, 3)
    many.write_bytes(bytes(data))
    with pytest.raises(BadRequest, match=r"members|central directory"):
        distcheck.read_wheel_metadata(many, parse_dist_filename(many.name))


# --- item 9: a published file's bytes can't be replaced ------------------------------------

def test_a_second_spelling_cannot_replace_a_published_wheel_twine_and_pip(
    proxy: ProxyServer, artifacts_dir: Path, tmp_path: Path,
) -> None:
    first = build_wheel(artifacts_dir / "a", "wpkg", "1.0", module_text="ORIGIN = 'first'\n")
    other = build_wheel(artifacts_dir / "b", "wpkg", "1.0", module_text="ORIGIN = 'second'\n")
    assert first.name == "wpkg-1.0-py3-none-any.whl"
    respelled = other.rename(other.with_name("WPkg-1.0-py3-none-any.whl"))
    ok = twine_upload(proxy.url + "/", [first], WRITER, WRITER_SECRET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    clash = twine_upload(proxy.url + "/", [respelled], WRITER, WRITER_SECRET)
    said = " ".join((clash.stdout + clash.stderr).split())
    assert clash.returncode != 0 and "400" in said and "File already exists" in said, said
    assert _files(proxy, "wpkg") == {first.name: sha256_file(first)}
    res = pip_install(proxy.index_url, tmp_path / "pip", "wpkg")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pip" / "wpkg" / "__init__.py").read_text() == "ORIGIN = 'first'\n"


def _renamed(path: Path, filename: str) -> Path:
    return path.rename(path.with_name(filename))


@pytest.mark.parametrize(("first_name", "second_name", "version"), [
    ("wpkg-1.0-py3-none-any.whl", "wpkg-1.0.0-py3-none-any.whl", "1.0.0"),
    ("wpkg-1.0-py2.py3-none-any.whl", "wpkg-1.0-py3.py2-none-any.whl", "1.0"),
    ("wpkg-1.0-py3-none-any.whl", "WPKG-1.0-PY3-none-any.whl", "1.0"),
])
def test_filenames_are_compared_after_normalizing(
    proxy: ProxyServer, artifacts_dir: Path, first_name: str, second_name: str, version: str,
) -> None:
    first = _renamed(build_wheel(artifacts_dir / "a", "wpkg", "1.0", module_text="a = 1\n"),
                     first_name)
    assert _upload(proxy, first, "wpkg", "1.0").status == 200
    other = _renamed(build_wheel(artifacts_dir / "b", "wpkg", version, module_text="b = 2\n"),
                     second_name)
    answer = _upload(proxy, other, "wpkg", version)
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert _reason(answer).startswith("File already exists")
    # Identical bytes under the other spelling: PyPI's no-op, nothing added.
    same = _renamed(artifacts_dir / "a" / first_name, second_name)
    answer = _upload(proxy, same, "wpkg", version)
    assert answer.status == 200, answer.body[:200]
    assert _files(proxy, "wpkg") == {first_name: sha256_file(same)}


def test_one_sdist_per_release_whatever_its_format(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    sdist = build_sdist(artifacts_dir, "acme-lib", "1.0")
    assert _upload(proxy, sdist, "acme-lib", "1.0").status == 200
    as_zip = _zip_sdist(artifacts_dir / "acme_lib-1.0.zip",
                        [("acme_lib-1.0/PKG-INFO", _pkg_info())])
    answer = _upload(proxy, as_zip, "acme-lib", "1.0.0", filename="acme_lib-1.0.0.zip")
    assert answer.status == 400 and _reason(answer).startswith("File already exists")
    assert list(_files(proxy, "acme-lib")) == [sdist.name]


def _same_release_twice(artifacts_dir: Path) -> tuple[Path, Path]:
    """wpkg 1.0 built twice with different contents: one file name, two sets of bytes."""
    return (build_wheel(artifacts_dir / "a", "wpkg", "1.0", module_text="a = 1\n"),
            build_wheel(artifacts_dir / "b", "wpkg", "1.0", module_text="b = 2\n"))


def test_a_deleted_file_name_never_comes_back_with_other_bytes(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    first, other = _same_release_twice(artifacts_dir)
    assert _upload(proxy, first, "wpkg", "1.0").status == 200
    admin = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
    assert call(f"{proxy.url}/-/files/wpkg/{first.name}", "DELETE", headers=admin).status == 200
    assert _files(proxy, "wpkg") == {}
    for filename in (other.name, "WPkg-1.0-py3-none-any.whl"):
        answer = _upload(proxy, other, "wpkg", "1.0", filename=filename)
        assert answer.status == 400, (filename, answer.status)
        assert _reason(answer).startswith("File already exists") and "deleted" in _reason(answer)
    assert _files(proxy, "wpkg") == {}
    # Its own bytes may come back: whoever installed or pinned it gets the same file.
    assert _upload(proxy, first, "wpkg", "1.0").status == 200
    assert _files(proxy, "wpkg") == {first.name: sha256_file(first)}


def test_a_released_name_keeps_its_used_file_names(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    """Releasing hands the name back to upstream, not its file names to new bytes."""
    first, other = _same_release_twice(artifacts_dir)
    assert _upload(proxy, first, "wpkg", "1.0").status == 200
    admin = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
    assert call(f"{proxy.url}/-/files/wpkg/{first.name}", "DELETE", headers=admin).status == 200
    assert call(f"{proxy.url}/-/projects/wpkg", "DELETE", headers=admin).status == 200
    assert b"wpkg" not in call(f"{proxy.url}/simple/").body  # no longer private
    answer = _upload(proxy, other, "wpkg", "1.0")
    assert answer.status == 400 and _reason(answer).startswith("File already exists")
    newer = build_wheel(artifacts_dir / "c", "wpkg", "2.0")
    assert _upload(proxy, newer, "wpkg", "2.0").status == 200
    assert _files(proxy, "wpkg") == {newer.name: sha256_file(newer)}


def test_a_store_written_before_the_record_still_reads_and_still_protects(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    first, other = _same_release_twice(artifacts_dir)
    assert _upload(proxy, first, "wpkg", "1.0").status == 200
    proxy.stop()
    index = proxy.data_dir / "private" / "wpkg" / "index.json"
    data = orjson.loads(index.read_bytes())
    assert data.pop("used") == {file_key(first.name): sha256_file(first)}
    index.write_bytes(orjson.dumps(data))  # as the previous version wrote it
    proxy.start()
    assert _files(proxy, "wpkg") == {first.name: sha256_file(first)}
    assert _upload(proxy, other, "wpkg", "1.0").status == 400
    admin = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
    assert call(f"{proxy.url}/-/files/wpkg/{first.name}", "DELETE", headers=admin).status == 200
    answer = _upload(proxy, other, "wpkg", "1.0")
    assert answer.status == 400 and "deleted" in _reason(answer)


def test_file_key_normalizes_what_installers_treat_as_equal() -> None:
    key = file_key("wpkg-1.0-py3-none-any.whl")
    assert key == file_key("WPkg-1.0.0-PY3-none-any.whl") == file_key("wpkg-1-py3-none-any.whl")
    assert key != file_key("wpkg-1.0-1-py3-none-any.whl")  # a build tag is another file
    assert key != file_key("wpkg-1.0-py2.py3-none-any.whl")
    assert file_key("wpkg-1.0.tar.gz") == file_key("WPkg-1.0.0.zip")
    assert file_key("wpkg-1.0+local-py3-none-any.whl") != key


# --- item 10: sdists, Requires-Python, form parts ------------------------------------------

_OK_TOP = "acme_lib-1.0"
_REG, _DIR, _SYM = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE


def _bad_sdists(root: Path) -> list[tuple[str, Path, str]]:
    """(case, sdist named acme_lib-1.0.*, fragment of the expected reason)."""
    top = _OK_TOP
    setup = (f"{top}/setup.py", b"", _REG)
    cases: list[tuple[str, Path, str]] = []

    def tgz(case: str, members: Sequence[TarMember], fragment: str, **kw: Any) -> None:
        cases.append((case, _tar_gz(root / case / f"{top}.tar.gz", members, **kw), fragment))

    garbage = root / "garbage" / f"{top}.tar.gz"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 8)
    cases.append(("garbage", garbage, "not a valid tar.gz"))
    plain = root / "plain" / f"{top}.tar.gz"
    plain.parent.mkdir(parents=True)
    with tarfile.open(plain, "w") as tf:  # not gzip-compressed at all
        info = tarfile.TarInfo(f"{top}/PKG-INFO")
        info.size = len(_pkg_info())
        tf.addfile(info, io.BytesIO(_pkg_info()))
    cases.append(("plain-tar", plain, "not a valid tar.gz"))
    tgz("other-project", [(f"{top}/PKG-INFO", _pkg_info(name="other-lib"), _REG), setup],
        'names "other-lib"')
    tgz("other-version", [(f"{top}/PKG-INFO", _pkg_info(version="2.0"), _REG), setup],
        'version "2.0"')
    tgz("no-pkg-info", [setup], "no acme_lib-1.0/PKG-INFO")
    tgz("deep-pkg-info", [(f"{top}/sub/PKG-INFO", _pkg_info(), _REG), setup],
        "no acme_lib-1.0/PKG-INFO")
    tgz("two-tops", [(f"{top}/PKG-INFO", _pkg_info(), _REG), ("evil/setup.py", b"", _REG)],
        "exactly one top-level directory")
    tgz("pkg-info-symlink", [setup, (f"{top}/PKG-INFO", None, _SYM)],
        "no acme_lib-1.0/PKG-INFO regular file")
    tgz("bad-requires-python",
        [(f"{top}/PKG-INFO", _pkg_info(extra="Requires-Python: python3 please\n"), _REG)],
        "not a valid version specifier")
    # tarfile would read these whole into memory.
    tgz("huge-pax-header", [(f"{top}/PKG-INFO", _pkg_info(), _REG)],
        "extended header larger", pax={"comment": "x" * (8 * 2**20)})
    tgz("huge-gnu-long-name", [(f"{top}/" + "n" * (4 * 2**20), b"", _REG),
                               (f"{top}/PKG-INFO", _pkg_info(), _REG)],
        "extended header larger", fmt=tarfile.GNU_FORMAT)
    tgz("negative-pax-size", [(f"{top}/PKG-INFO", _pkg_info(), _REG)],
        "invalid tar header", pax={"size": "-5"})
    zips = root / "zip"
    cases.append(("zip-bzip2", _zip_sdist(zips / "bz" / f"{top}.zip",
                                          [(f"{top}/PKG-INFO", _pkg_info())],
                                          zipfile.ZIP_BZIP2), "compression method 12"))
    cases.append(("zip-no-pkg-info", _zip_sdist(zips / "none" / f"{top}.zip",
                                                [(f"{top}/setup.py", b"")]),
                  "no single acme_lib-1.0/PKG-INFO"))
    cases.append(("zip-empty", _zip_sdist(zips / "empty" / f"{top}.zip", []),
                  "exactly one top-level directory"))
    return cases


def test_sdists_must_be_real_archives_whose_pkg_info_matches(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    for case, path, fragment in _bad_sdists(artifacts_dir):
        answer = _upload(proxy, path, "acme-lib", "1.0")
        assert answer.status == 400, (case, answer.status, answer.body[:200])
        assert fragment in _reason(answer), (case, _reason(answer))
    assert not (proxy.data_dir / "private" / "acme-lib").exists()
    # Real ones pass, .tar.gz and .zip, with PKG-INFO's Requires-Python listed.
    good = build_sdist(artifacts_dir / "good", "acme-lib", "1.0")
    assert _upload(proxy, good, "acme-lib", "1.0").status == 200
    zipped = _zip_sdist(artifacts_dir / "good" / "acme_lib-2.0.zip", [
        ("acme_lib-2.0/", b""), ("acme_lib-2.0/setup.py", b""),
        ("acme_lib-2.0/PKG-INFO", _pkg_info(version="2.0", extra="Requires-Python: >=3.9\n")),
    ])
    answer = _upload(proxy, zipped, "acme-lib", "2.0")
    assert answer.status == 200, answer.body[:200]
    page = orjson.loads(call(f"{proxy.url}/simple/acme-lib/", headers={"Accept": JSON_V1}).body)
    listed = {f["filename"]: f for f in page["files"]}
    assert listed[zipped.name]["requires-python"] == ">=3.9"
    assert listed[good.name]["core-metadata"] is False
    assert "Traceback" not in proxy.log_text()


def test_tar_walk_bounds_inflated_bytes_and_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    top = _OK_TOP
    bomb = _tar_gz(tmp_path / "bomb" / f"{top}.tar.gz", [
        (f"{top}/zeros.bin", bytes(4 * 2**20), _REG), (f"{top}/PKG-INFO", _pkg_info(), _REG),
    ])
    dist = parse_dist_filename(bomb.name)
    assert distcheck.read_sdist_metadata(bomb, dist).raw == _pkg_info()
    monkeypatch.setattr(distcheck, "MAX_SDIST_INFLATED", 2**20)
    with pytest.raises(BadRequest, match="inflates to more than"):
        distcheck.read_sdist_metadata(bomb, dist)
    monkeypatch.setattr(distcheck, "MAX_MEMBERS", 3)
    many = _tar_gz(tmp_path / "many" / f"{top}.tar.gz",
                   [(f"{top}/f{i}", b"", _REG) for i in range(4)])
    with pytest.raises(BadRequest, match="more than 3 members"):
        distcheck.read_sdist_metadata(many, dist)


@pytest.mark.parametrize(("where", "fragment"), [("form", "form field requires_python"),
                                                  ("metadata", "METADATA")])
def test_requires_python_must_be_a_valid_specifier(
    proxy: ProxyServer, artifacts_dir: Path, where: str, fragment: str,
) -> None:
    bad = "python3 please"
    if where == "form":
        wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
        answer = _upload(proxy, wheel, "acme-lib", "1.0", requires_python=bad)
    else:
        wheel = build_wheel(artifacts_dir, "acme-lib", "1.0", requires_python=bad)
        answer = _upload(proxy, wheel, "acme-lib", "1.0")
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert fragment in _reason(answer) and "not a valid version specifier" in _reason(answer)
    assert not (proxy.data_dir / "private" / "acme-lib").exists()


def test_unnamed_parts_count_against_the_field_limit_and_the_loop_keeps_answering(
    proxy: ProxyServer,
) -> None:
    boundary = uuid.uuid4().hex
    head, _ = multipart(_fields("acme-lib", "1.0", b"x"), None, boundary)
    head = head[: -len(f"--{boundary}--\r\n")]
    unnamed = f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nv\r\n".encode()
    sent = head + unnamed * 2000
    rest = unnamed * 148_000 + f"--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(sent) + len(rest)))
        conn.putheader("Authorization", basic(WRITER, WRITER_SECRET))
        conn.endheaders()
        conn.send(sent)  # and never the rest: the answer must not wait for it
        assert call(proxy.url + "/-/health", timeout=30).status == 200
        response = conn.getresponse()
        assert response.status == 400, response.status
        assert "Too many form fields" in (response.reason or "")
    finally:
        conn.close()
    # Sent whole, both kinds of part, 150k of them, stop at the limit.
    for part in (unnamed, None):
        fields = [(f"f{i}", "v") for i in range(150_000)] if part is None else []
        body, ctype = multipart(fields, None, boundary)
        if part is not None:
            body = part * 150_000 + body
        answer = call(proxy.url + "/", "POST", body=body, timeout=60, headers={
            "Content-Type": ctype, "Authorization": basic(WRITER, WRITER_SECRET)})
        assert answer.status == 400 and b"Too many form fields" in answer.body, answer.body


def test_text_fields_are_bounded_in_total(proxy: ProxyServer, artifacts_dir: Path) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    content = wheel.read_bytes()
    big = [(f"description_{i}", "d" * (2**20 - 64)) for i in range(9)]
    answer = _post(proxy, [*_fields("acme-lib", "1.0", content), *big], (wheel.name, content))
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert "bytes in all" in _reason(answer)
    assert not (proxy.data_dir / "private" / "acme-lib").exists()


# --- item 11: upload_collision: reject fails closed ----------------------------------------

def test_reject_fails_closed_when_upstream_cannot_say(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    flask_up = build_wheel(artifacts_dir / "up", "flask", "3.0")
    upstream.add(flask_up)
    # backoff 0: with no project list, the next upload asks for it again at once.
    config = _config(upstream, guard={"upload_collision": "reject"})
    config["upstream"]["backoff"] = 0
    proxy = make_proxy(config)
    # Upstream fails before the proxy ever had its project list: it cannot say.
    upstream.fault("status", code=503)
    shadow = build_wheel(artifacts_dir, "flask", "99.0")
    result = twine_upload(proxy.url + "/", [shadow], WRITER, WRITER_SECRET)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and "503" in said, said
    assert "Cannot check whether flask exists on the upstream index" in said
    assert not (proxy.data_dir / "private" / "flask").exists()
    # Not remembered: once upstream answers, flask is refused for what it is,
    # a new name is accepted, and flask stays the public one.
    upstream.fault(None)
    answer = _upload(proxy, shadow, "flask", "99.0")
    assert answer.status == 403 and "exists on the upstream index" in _reason(answer)
    fresh = build_wheel(artifacts_dir, "acme-fresh", "0.1")
    assert _upload(proxy, fresh, "acme-fresh", "0.1").status == 200
    assert _files(proxy, "flask") == {flask_up.name: sha256_file(flask_up)}
    # A name that is private already needs no upstream answer.
    upstream.fault("status", code=503)
    more = build_wheel(artifacts_dir / "acme", "acme-fresh", "0.2")
    assert _upload(proxy, more, "acme-fresh", "0.2").status == 200


def test_warn_accepts_but_logs_that_it_could_not_check(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy(_config(upstream, guard={"upload_collision": "warn"}))
    upstream.fault("status", code=503)
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    assert _upload(proxy, wheel, "acme-lib", "1.0").status == 200
    assert eventually(lambda: "not checked for collision" in proxy.log_text())
