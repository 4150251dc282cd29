"""Publishing end to end: real twine and uv publish into the real server, then real installs."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.client
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.support.artifacts import build_sdist, build_wheel, sha256_file
from tests.support.clients import (
    installed_version,
    pip_install,
    twine_upload,
    uv_install,
    uv_publish,
    uv_venv,
)
from tests.support.forms import multipart
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

WRITER, WRITER_SECRET = "ci", "s3cret-writer-token"
READER, READER_SECRET = "reader", "s3cret-reader-token"
ADMIN, ADMIN_SECRET = "admin", "s3cret-admin-token"
OLD, OLD_SECRET = "old", "s3cret-expired-token"
JSON_V1 = "application/vnd.pypi.simple.v1+json"


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def auth_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"url": upstream_url},
        "auth": {
            "anonymous_read": False,
            "tokens": [
                {"name": WRITER, "sha256": _sha(WRITER_SECRET), "scopes": ["read", "write"]},
                {"name": READER, "sha256": _sha(READER_SECRET), "scopes": ["read"]},
                {"name": ADMIN, "sha256": _sha(ADMIN_SECRET), "scopes": ["read", "admin"]},
                {"name": OLD, "sha256": _sha(OLD_SECRET), "scopes": ["read", "write"],
                 "expires": "2020-01-01"},
            ],
        },
    }
    config.update(extra)
    return config


def request(url: str, *, user: str | None = None, secret: str | None = None,
            method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, reason, body) for one request; never raises on 4xx/5xx."""
    hdrs = dict(headers or {})
    if user is not None and secret is not None:
        hdrs["Authorization"] = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
    req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.reason, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.reason, err.read()


def raw_upload(proxy: ProxyServer, fields: dict[str, str], filename: str | None,
               content: bytes, path: str = "/") -> tuple[int, str, bytes]:
    body, ctype = multipart(list(fields.items()),
                            (filename, content) if filename is not None else None)
    return request(proxy.url + path, user=WRITER, secret=WRITER_SECRET, method="POST",
                   body=body, headers={"Content-Type": ctype})


def start_upload(proxy: ProxyServer, body: bytes, ctype: str) -> http.client.HTTPConnection:
    """An upload whose headers are sent and whose body the caller sends (or not)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.putrequest("POST", "/")
    conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(body)))
    conn.putheader("Authorization", "Basic " + base64.b64encode(
        f"{WRITER}:{WRITER_SECRET}".encode()).decode())
    conn.endheaders()
    return conn


def form_for(path: Path, **overrides: str) -> dict[str, str]:
    fields = {
        ":action": "file_upload", "protocol_version": "1", "metadata_version": "2.1",
        "name": "acme-lib", "version": "1.0", "filetype": "bdist_wheel", "pyversion": "py3",
        "sha256_digest": sha256_file(path),
    }
    fields.update(overrides)
    return fields


def page(proxy: ProxyServer, name: str) -> dict[str, Any]:
    status, _r, body = request(f"{proxy.url}/simple/{name}/", user=READER, secret=READER_SECRET,
                               headers={"Accept": JSON_V1})
    assert status == 200, body
    return dict(orjson.loads(body))


@pytest.fixture
def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> ProxyServer:
    return make_proxy(auth_config(upstream.url, limits={"max_upload": "4MiB"}))


def test_twine_upload_then_pip_and_uv_install_with_credentials(
    proxy: ProxyServer, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0", requires_python=">=3.8")
    sdist = build_sdist(artifacts_dir, "acme-lib", "1.0")
    # An upstream release under the same name must stay invisible: private first.
    upstream.add(build_wheel(artifacts_dir / "up", "acme-lib", "9.0"))
    result = twine_upload(proxy.url + "/", [wheel, sdist], WRITER, WRITER_SECRET)
    assert result.returncode == 0, result.stdout + result.stderr

    data = page(proxy, "acme-lib")
    files = {f["filename"]: f for f in data["files"]}
    assert set(files) == {wheel.name, sdist.name}
    assert files[wheel.name]["hashes"]["sha256"] == sha256_file(wheel)
    assert files[wheel.name]["requires-python"] == ">=3.8"
    assert files[wheel.name]["core-metadata"]["sha256"]
    assert files[sdist.name]["core-metadata"] is False
    assert all(f["upload-time"].endswith("Z") and f["size"] > 0 for f in files.values())
    assert data["versions"] == ["1.0"]

    # anonymous_read is false: no credentials, no page.
    assert request(f"{proxy.url}/simple/acme-lib/")[0] == 401
    host = proxy.url.removeprefix("http://")
    with_creds = f"http://{READER}:{READER_SECRET}@{host}/simple/"
    target = tmp_path / "pip"
    res = pip_install(with_creds, target, "acme-lib")
    assert res.returncode == 0, res.stderr
    assert installed_version(target, "acme-lib") == "1.0"
    venv = uv_venv(tmp_path / "venv")
    res = uv_install(with_creds, venv, "acme-lib")
    assert res.returncode == 0, res.stderr
    assert installed_version(tmp_path / "venv", "acme-lib") == "1.0"

    # The same through a netrc file, with no credentials in the URL.
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin {READER}\npassword {READER_SECRET}\n")
    netrc.chmod(0o600)
    env = {"HOME": str(home), "NETRC": str(netrc)}
    res = pip_install(proxy.index_url, tmp_path / "pip-netrc", "acme-lib", env=env)
    assert res.returncode == 0, res.stderr
    venv2 = uv_venv(tmp_path / "venv2")
    res = uv_install(proxy.index_url, venv2, "acme-lib", env=env)
    assert res.returncode == 0, res.stderr
    assert installed_version(tmp_path / "venv2", "acme-lib") == "1.0"
    assert not any(p.startswith("/files/acme") for _m, p in upstream.file_requests())
    assert WRITER_SECRET not in proxy.log_text() and READER_SECRET not in proxy.log_text()


def test_reupload_identical_is_a_noop_and_different_bytes_is_400(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    assert twine_upload(proxy.url + "/", [wheel], WRITER, WRITER_SECRET).returncode == 0
    stored = proxy.data_dir / "private" / "acme-lib" / "files" / wheel.name
    before = (stored.read_bytes(), stored.stat().st_mtime_ns)
    again = twine_upload(proxy.url + "/", [wheel], WRITER, WRITER_SECRET)
    assert again.returncode == 0, again.stdout + again.stderr

    other = build_wheel(artifacts_dir / "other", "acme-lib", "1.0", module_text="x = 2\n")
    clash = twine_upload(proxy.url + "/", [other], WRITER, WRITER_SECRET)
    assert clash.returncode != 0
    said = " ".join((clash.stdout + clash.stderr).split())
    assert "400" in said and "File already exists: " + other.name in said
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before


def test_uv_publish_with_check_url_skips_what_is_there(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    sdist = build_sdist(artifacts_dir, "acme-lib", "1.0")
    first = uv_publish(proxy.url + "/", [wheel], WRITER, WRITER_SECRET)
    assert first.returncode == 0, first.stderr
    # uv does not send the publish credentials to the check URL: with
    # anonymous_read off they go in the URL (the README says so).
    host = proxy.url.removeprefix("http://")
    check_url = f"http://{READER}:{READER_SECRET}@{host}/simple/"
    second = uv_publish(proxy.url + "/", [wheel, sdist], WRITER, WRITER_SECRET,
                        extra=["--check-url", check_url])
    assert second.returncode == 0, second.stderr
    assert f"File {wheel.name} already exists, skipping" in second.stderr
    assert {f["filename"] for f in page(proxy, "acme-lib")["files"]} == {wheel.name, sdist.name}


def test_credentials_and_scopes(proxy: ProxyServer, artifacts_dir: Path) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    wrong = twine_upload(proxy.url + "/", [wheel], WRITER, "not-the-secret")
    assert wrong.returncode != 0 and "401" in wrong.stdout + wrong.stderr
    read_only = twine_upload(proxy.url + "/", [wheel], READER, READER_SECRET)
    assert read_only.returncode != 0 and "403" in read_only.stdout + read_only.stderr
    expired = twine_upload(proxy.url + "/", [wheel], OLD, OLD_SECRET)
    assert expired.returncode != 0 and "expired" in (expired.stdout + expired.stderr).lower()
    as_token = twine_upload(proxy.url + "/legacy/", [wheel], "__token__", WRITER_SECRET)
    assert as_token.returncode == 0, as_token.stdout + as_token.stderr
    status, _reason, _ = request(proxy.url + "/simple/")
    assert status == 401
    status, _reason, _ = request(proxy.url + "/", method="POST", body=b"x")
    assert status == 401
    assert not (proxy.data_dir / "tmp").exists() or not any((proxy.data_dir / "tmp").iterdir())


def test_invalid_version_is_400_with_the_reason_in_twine_output(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    status, reason, _ = raw_upload(proxy, form_for(wheel, version="1.0-not valid!"),
                                   wheel.name, wheel.read_bytes())
    assert status == 400 and "Invalid version" in reason
    # twine reads the version from the file's metadata: a wheel whose METADATA
    # says another version than its filename is refused with the reason shown.
    liar = artifacts_dir / "liar"
    made = build_wheel(liar, "acme-lib", "2.0")
    renamed = made.with_name(made.name.replace("2.0", "1.5"))
    made.rename(renamed)
    result = twine_upload(proxy.url + "/", [renamed], WRITER, WRITER_SECRET)
    assert result.returncode != 0
    assert "400" in result.stdout + result.stderr and "version" in result.stdout + result.stderr


@pytest.mark.parametrize(("fields", "filename", "content", "fragment"), [
    ({":action": "submit"}, "acme_lib-1.0-py3-none-any.whl", b"x", "Unsupported :action"),
    ({"name": "acme lib!"}, "acme_lib-1.0-py3-none-any.whl", b"x", "Invalid project name"),
    ({}, "../../etc/acme_lib-1.0-py3-none-any.whl", b"x", "Invalid distribution filename"),
    ({}, "acme_lib-1.0.exe", b"x", "not a wheel or sdist"),
    ({}, "other-1.0-py3-none-any.whl", b"x", "is for project other"),
    ({"sha256_digest": "0" * 64}, "acme_lib-1.0-py3-none-any.whl", b"PK", "sha256_digest"),
    ({"metadata_version": "9.9"}, "acme_lib-1.0-py3-none-any.whl", b"x", "metadata_version"),
    ({}, None, b"", "Missing the 'content' file part"),
    ({}, "acme_lib-1.0-py3-none-any.whl", b"not a zip at all", "not a valid wheel"),
])
def test_bad_uploads_are_400_with_a_reason(
    proxy: ProxyServer, artifacts_dir: Path, fields: dict[str, str], filename: str | None,
    content: bytes, fragment: str,
) -> None:
    form = {":action": "file_upload", "protocol_version": "1", "name": "acme-lib",
            "version": "1.0", "metadata_version": "2.1",
            "sha256_digest": hashlib.sha256(content).hexdigest()}
    form.update(fields)
    status, reason, body = raw_upload(proxy, form, filename, content)
    assert status == 400, (status, reason)
    assert fragment in reason and fragment in body.decode()
    assert "\n" not in reason
    assert not (proxy.data_dir / "private" / "acme-lib").exists()


def test_metadata_versions_up_to_2_5_are_accepted(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    for i, mv in enumerate(("1.0", "1.2", "2.1", "2.4", "2.5")):
        wheel = build_wheel(artifacts_dir, f"acme-mv{i}", "1.0", metadata_version=mv)
        status, reason, _ = raw_upload(proxy, form_for(wheel, name=f"acme-mv{i}",
                                                       metadata_version=mv),
                                       wheel.name, wheel.read_bytes())
        assert status == 200, (mv, reason)


def test_malformed_multipart_is_400(proxy: ProxyServer) -> None:
    for ctype, body in [
        ("multipart/form-data; boundary=zzz", b"--zzz\r\ngarbage without headers end"),
        ("multipart/form-data", b"no boundary at all"),
        ("application/json", b"{}"),
        ("multipart/form-data; boundary=q", b"--q\r\nContent-Disposition: form-data\r\n\r\n"),
    ]:
        status, reason, _ = request(proxy.url + "/", user=WRITER, secret=WRITER_SECRET,
                                    method="POST", body=body, headers={"Content-Type": ctype})
        assert status == 400, (ctype, status, reason)


def test_oversized_upload_is_413_and_memory_stays_flat(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    big = build_wheel(artifacts_dir, "acme-big", "1.0", extra_bytes=48 * 2**20)
    before = proxy.rss_bytes()
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proxy.rss_bytes())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = twine_upload(proxy.url + "/", [big], WRITER, WRITER_SECRET)
    finally:
        done.set()
        watcher.join()
    assert result.returncode != 0
    assert "413" in result.stdout + result.stderr
    assert peak[0] - before < 16 * 2**20, f"RSS grew by {(peak[0] - before) / 2**20:.1f} MiB"
    assert not (proxy.data_dir / "private" / "acme-big").exists()
    leftovers = [p for p in (proxy.data_dir / "tmp").iterdir()]
    assert leftovers == []


def test_concurrent_uploads_of_one_name_one_wins(
    proxy: ProxyServer, artifacts_dir: Path,
) -> None:
    a = build_wheel(artifacts_dir / "a", "acme-lib", "1.0", module_text="a = 1\n")
    b = build_wheel(artifacts_dir / "b", "acme-lib", "1.0", module_text="b = 2\n")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda w: raw_upload(proxy, form_for(w), w.name, w.read_bytes()), [a, b]
        ))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 400], results
    assert any(r[1].startswith("File already exists") for r in results)
    stored = proxy.data_dir / "private" / "acme-lib" / "files" / a.name
    winner = a if results[0][0] == 200 else b
    assert sha256_file(stored) == sha256_file(winner)


def test_kill_mid_upload_leaves_no_partial_file(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy(auth_config(upstream.url))
    big = build_wheel(artifacts_dir, "acme-big", "1.0", extra_bytes=64 * 2**20)
    body, ctype = multipart(list(form_for(big, name="acme-big").items()),
                            (big.name, big.read_bytes()))
    conn = start_upload(proxy, body, ctype)
    conn.send(body[: len(body) // 2])
    tmp_dir = proxy.data_dir / "tmp"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(tmp_dir.glob(".tmp-*")):
        time.sleep(0.05)
    assert any(tmp_dir.glob(".tmp-*")), "the upload never reached the spool"
    os.kill(proxy.pid, signal.SIGKILL)
    conn.close()
    proxy.kill()
    proxy.start()
    assert not list(tmp_dir.glob(".tmp-*"))
    assert not (proxy.data_dir / "private" / "acme-big").exists()
    # And the store still works.
    ok = twine_upload(proxy.url + "/", [big], WRITER, WRITER_SECRET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    stored = proxy.data_dir / "private" / "acme-big" / "files" / big.name
    assert sha256_file(stored) == sha256_file(big)


def test_yank_delete_and_release(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
) -> None:
    proxy = make_proxy(auth_config(upstream.url))
    v1 = build_wheel(artifacts_dir, "acme-lib", "1.0")
    v2 = build_wheel(artifacts_dir, "acme-lib", "2.0")
    upstream.add(build_wheel(artifacts_dir / "up", "acme-lib", "9.0"))
    assert twine_upload(proxy.url + "/", [v1, v2], WRITER, WRITER_SECRET).returncode == 0
    admin = {"user": ADMIN, "secret": ADMIN_SECRET}

    assert request(f"{proxy.url}/-/yank/acme-lib/2.0", method="POST", user=WRITER,
                   secret=WRITER_SECRET)[0] == 403
    status, _r, body = request(f"{proxy.url}/-/yank/acme-lib/2.0", method="POST",
                               body=b'{"reason": "broken build"}',
                               headers={"Content-Type": "application/json"}, **admin)
    assert status == 200, body
    files = {f["filename"]: f for f in page(proxy, "acme-lib")["files"]}
    assert files[v2.name]["yanked"] == "broken build"
    host = proxy.url.removeprefix("http://")
    creds_url = f"http://{READER}:{READER_SECRET}@{host}/simple/"
    res = pip_install(creds_url, tmp_path / "t", "acme-lib")
    assert res.returncode == 0 and installed_version(tmp_path / "t", "acme-lib") == "1.0"
    assert request(f"{proxy.url}/-/unyank/acme-lib/2.0", method="POST", **admin)[0] == 200
    assert page(proxy, "acme-lib")["files"][1]["yanked"] is False

    # Deleting every file keeps the name private: upstream's 9.0 stays invisible.
    for wheel in (v1, v2):
        assert request(f"{proxy.url}/-/files/acme-lib/{wheel.name}", method="DELETE",
                       **admin)[0] == 200
    assert page(proxy, "acme-lib")["files"] == []
    assert request(f"{proxy.url}/files/acme-lib/{v1.name}", user=READER,
                   secret=READER_SECRET)[0] == 404
    assert not any(p.startswith("/files/acme") for _m, p in upstream.requests)
    # Releasing hands the name back to the upstream fallback.
    assert request(f"{proxy.url}/-/projects/acme-lib", method="DELETE", **admin)[0] == 200
    released = page(proxy, "acme-lib")
    assert [f["filename"] for f in released["files"]] == ["acme_lib-9.0-py3-none-any.whl"]


def test_new_token_takes_effect_on_sighup(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy(auth_config(upstream.url))
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0")
    assert twine_upload(proxy.url + "/", [wheel], "late", "late-secret").returncode != 0
    tokens = auth_config(upstream.url)["auth"]["tokens"]
    tokens.append({"name": "late", "sha256": _sha("late-secret"), "scopes": ["write"]})
    proxy.update_config({"auth": {"tokens": tokens}})
    proxy.sighup()
    deadline = time.monotonic() + 10
    while "config reloaded" not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    result = twine_upload(proxy.url + "/", [wheel], "late", "late-secret")
    assert result.returncode == 0, result.stdout
    assert "late-secret" not in proxy.log_text()


def test_stalled_upload_body_is_cut_off(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    proxy = make_proxy(auth_config(upstream.url, limits={"idle_timeout": 1}))
    wheel = build_wheel(artifacts_dir, "acme-lib", "1.0", extra_bytes=2**20)
    body, ctype = multipart(list(form_for(wheel).items()), (wheel.name, wheel.read_bytes()))
    conn = start_upload(proxy, body, ctype)
    conn.send(body[:4096])  # then nothing: a slowloris client
    started = time.monotonic()
    response = conn.getresponse()
    assert response.status == 408
    assert time.monotonic() - started < 10
    conn.close()
    assert not list((proxy.data_dir / "tmp").glob(".tmp-*"))
    assert not (proxy.data_dir / "private" / "acme-lib").exists()


def test_root_index_lists_new_private_names(proxy: ProxyServer, artifacts_dir: Path) -> None:
    def listed() -> set[str]:
        body = request(proxy.url + "/simple/", user=READER, secret=READER_SECRET,
                       headers={"Accept": JSON_V1})[2]
        return {p["name"] for p in orjson.loads(body)["projects"]}

    assert listed() == set()
    for i in range(3):
        wheel = build_wheel(artifacts_dir, f"acme-n{i}", "1.0")
        assert twine_upload(proxy.url + "/", [wheel], WRITER, WRITER_SECRET).returncode == 0
        assert f"acme-n{i}" in listed()
