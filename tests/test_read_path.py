"""The read path end to end: real server subprocess, real pip and uv, a local upstream."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import re
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import eventually
from tests.support.artifacts import build_sdist, build_wheel, sha256_file, wheel_metadata
from tests.support.clients import installed_version, pip_download, pip_install, uv_install, uv_venv
from tests.support.upstream import FakeUpstream

JSON_V1 = "application/vnd.pypi.simple.v1+json"


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET",
        timeout: float = 30) -> tuple[int, Message, bytes]:
    """(status, headers, body) without following redirects or raising on 4xx/5xx."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


@pytest.fixture
def published(upstream: FakeUpstream, artifacts_dir: Path) -> dict[str, Path]:
    """An upstream with two projects, one depending on the other, plus an sdist."""
    files = {
        "dep": build_wheel(artifacts_dir, "tiny-dep", "1.0"),
        "app": build_wheel(artifacts_dir, "Tiny_App", "2.0", requires_dist=["tiny-dep>=1.0"],
                           requires_python=">=3.8"),
        "old": build_wheel(artifacts_dir, "Tiny_App", "1.0"),
        "sdist": build_sdist(artifacts_dir, "tiny-app", "2.0"),
    }
    for path in files.values():
        upstream.add(path)
    return files


def proxied(make_proxy: MakeProxy, upstream: FakeUpstream, **extra: object) -> object:
    config: dict[str, object] = {"upstream": {"url": upstream.url, "timeout": 5}}
    for key, value in extra.items():
        config[key] = value
    return make_proxy(config)


def test_pip_and_uv_install_through_the_fallback(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path], tmp_path: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    target = tmp_path / "pip-target"
    result = pip_install(proxy.index_url, target, "tiny-app")
    assert result.returncode == 0, result.stderr
    assert installed_version(target, "tiny-app") == "2.0"
    assert installed_version(target, "tiny-dep") == "1.0"

    venv = uv_venv(tmp_path / "venv")
    result = uv_install(proxy.index_url, venv, "tiny-app==1.0", "tiny-dep")
    assert result.returncode == 0, result.stderr
    assert installed_version(tmp_path / "venv", "tiny-app") == "1.0"

    # pip used PEP 658 metadata: the metadata file went through the proxy.
    assert any(p.endswith(".whl.metadata") for _m, p in upstream.file_requests())


def test_second_install_makes_no_upstream_file_request_and_survives_upstream_down(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path], tmp_path: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "index_ttl": 0, "timeout": 2}})
    assert pip_install(proxy.index_url, tmp_path / "a", "tiny-app").returncode == 0
    fetched = upstream.file_requests()
    assert fetched
    upstream.clear_requests()
    second = pip_install(proxy.index_url, tmp_path / "b", "tiny-app")
    assert second.returncode == 0, second.stderr
    assert upstream.file_requests() == []

    upstream.stop()
    venv = uv_venv(tmp_path / "venv")
    offline = uv_install(proxy.index_url, venv, "tiny-app")
    assert offline.returncode == 0, offline.stderr
    assert installed_version(tmp_path / "venv", "tiny-app") == "2.0"
    metrics = get(proxy.url + "/metrics")[2].decode()
    stale = [line for line in metrics.splitlines()
             if line.startswith('indexguard_stale_pages_served_total{upstream="pypi"} ')]
    assert stale and float(stale[0].split()[1]) >= 1


def test_no_stale_page_and_upstream_down_is_502(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 2}})
    upstream.stop()
    status, _headers, body = get(proxy.url + "/simple/tiny-app/")
    assert status == 502
    assert body.startswith(b"Upstream index unavailable for tiny-app")
    assert body.count(b"\n") == 1  # one line a person can read


def test_upstream_5xx_serves_stale_then_heals(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "index_ttl": 0, "timeout": 2,
                                     "backoff": 2}})
    first = get(proxy.url + "/simple/tiny-app/", {"Accept": JSON_V1})
    assert first[0] == 200
    upstream.fault("status", path_prefix="/simple/", code=503)
    stale = get(proxy.url + "/simple/tiny-app/", {"Accept": JSON_V1})
    assert stale[0] == 200 and stale[2] == first[2]
    upstream.clear_faults()
    newer = build_wheel(published["dep"].parent, "Tiny_App", "3.0")
    upstream.add(newer)
    time.sleep(2.5)  # the outage (upstream.backoff) runs out
    healed = get(proxy.url + "/simple/tiny-app/", {"Accept": JSON_V1})
    assert healed[0] == 200
    assert newer.name in {f["filename"] for f in orjson.loads(healed[2])["files"]}


def test_upstream_404_is_404_and_remembered(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "negative_ttl": 60}})
    assert get(proxy.url + "/simple/nothing-here/")[0] == 404
    assert get(proxy.url + "/simple/nothing-here/")[0] == 404
    assert len(upstream.page_requests("nothing-here")) == 1


def test_forward_off_answers_404_without_asking_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path], tmp_path: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "forward": False}})
    status, _h, body = get(proxy.url + "/simple/tiny-app/")
    assert status == 404 and b"forwarding upstream is off" in body
    result = pip_install(proxy.index_url, tmp_path / "t", "tiny-app")
    assert result.returncode != 0
    assert upstream.requests == []


def test_sighup_flips_forwarding_without_restart(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url, "forward": True}})
    pid = proxy.pid
    assert get(proxy.url + "/simple/tiny-dep/")[0] == 200
    proxy.update_config({"upstream": {"forward": False}})
    proxy.sighup()
    assert _eventually(lambda: get(proxy.url + "/simple/tiny-dep/")[0] == 404)
    proxy.update_config({"upstream": {"forward": "not a bool"}})
    proxy.sighup()
    assert _eventually(lambda: "config reload refused" in proxy.log_text())
    assert get(proxy.url + "/simple/tiny-dep/")[0] == 404  # the old config keeps serving
    proxy.update_config({"upstream": {"forward": True}})
    proxy.sighup()
    assert _eventually(lambda: get(proxy.url + "/simple/tiny-dep/")[0] == 200)
    assert proxy.pid == pid


def _eventually(check: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_non_normalized_name_redirects(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    status, headers, _ = get(proxy.url + "/simple/Tiny_App/?format=" + JSON_V1)
    assert status == 301 and headers["Location"] == f"../tiny-app/?format={JSON_V1}"
    status, headers, _ = get(proxy.url + "/simple/Tiny.App")
    assert status == 301 and headers["Location"] == "tiny-app/"


def test_html_and_json_pages_agree_and_carry_hashes(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    status, headers, body = get(proxy.url + "/simple/tiny-app/", {"Accept": JSON_V1})
    assert status == 200 and headers["Content-Type"] == JSON_V1
    assert headers["Vary"].startswith("Accept")
    data = orjson.loads(body)
    assert data["meta"]["api-version"] == "1.1"
    assert sorted(data["versions"]) == ["1.0", "2.0"]
    html = get(proxy.url + "/simple/tiny-app/", {"Accept": "text/html"})[2].decode()
    for f in data["files"]:
        assert f["url"].startswith("../../files/tiny-app/")
        assert f"{f['url']}#sha256={f['hashes']['sha256']}" in html
        assert f["size"] > 0 and f["upload-time"].endswith("Z")
    wheel = next(f for f in data["files"] if f["filename"] == published["app"].name)
    assert wheel["hashes"]["sha256"] == sha256_file(published["app"])
    assert wheel["requires-python"] == ">=3.8"
    assert 'data-requires-python="&gt;=3.8"' in html
    assert wheel["core-metadata"] == {
        "sha256": hashlib.sha256(wheel_metadata(published["app"])).hexdigest()
    }
    assert 'data-core-metadata="sha256=' in html and 'data-dist-info-metadata="sha256=' in html
    # The metadata file is served at the file URL + .metadata and matches its hash.
    meta = get(proxy.url + "/files/tiny-app/" + published["app"].name + ".metadata")
    assert meta[0] == 200 and meta[2] == wheel_metadata(published["app"])


def test_html_only_upstream_is_parsed(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path], tmp_path: Path,
) -> None:
    upstream.html_only = True
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    data = orjson.loads(get(proxy.url + "/simple/tiny-app/", {"Accept": JSON_V1})[2])
    assert {f["filename"] for f in data["files"]} == {
        published["app"].name, published["old"].name, published["sdist"].name,
    }
    assert pip_download(proxy.index_url, tmp_path / "dl", "tiny-app==2.0",
                        extra=["--no-deps"]).returncode == 0


def test_etag_304_gzip_and_head(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    url = proxy.url + "/simple/tiny-app/"
    status, headers, body = get(url)
    etag = headers["ETag"]
    assert get(url, {"If-None-Match": etag})[0] == 304
    status, gz_headers, gz_body = get(url, {"Accept-Encoding": "gzip"})
    assert gz_headers.get("Content-Encoding") == "gzip"
    assert gzip.decompress(gz_body) == body
    assert get(url, {"Accept-Encoding": "gzip", "If-None-Match": gz_headers["ETag"]})[0] == 304
    head = get(url, method="HEAD")
    assert head[0] == 200 and head[2] == b"" and head[1]["ETag"] == etag

    file_url = proxy.url + "/files/tiny-app/" + published["app"].name
    status, cold, data = get(file_url)  # streamed from upstream while it is cached
    assert status == 200 and hashlib.sha256(data).hexdigest() == sha256_file(published["app"])
    assert cold["ETag"] == f'"{sha256_file(published["app"])}"'
    assert get(file_url, {"If-None-Match": cold["ETag"]})[0] == 304
    status, warm, again = get(file_url)  # sendfile from the cache
    assert status == 200 and again == data
    assert get(file_url, {"If-None-Match": warm["ETag"]})[0] == 304
    ranged = get(file_url, {"Range": "bytes=0-9"})
    assert ranged[0] == 206 and ranged[2] == data[:10]
    assert get(file_url, method="HEAD")[1]["Content-Length"] == str(len(data))


def test_range_requests_on_a_file_still_arriving_and_once_cached(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    big = build_wheel(artifacts_dir, "ranged", "1.0", extra_bytes=2 * 2**20)
    upstream.add(big, with_metadata=False)
    data = big.read_bytes()
    size = len(data)
    # A timeout well past the stall: the transfer must survive it.
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 15}})
    url = f"{proxy.url}/files/ranged/{big.name}"
    # Upstream sends the first half, then stalls: the transfer is in flight
    # for as long as the stall lasts.
    upstream.fault("slow", path_prefix="/files/", seconds=5.0, phase="body")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        whole = pool.submit(get, url, None, "GET", 60)
        assert eventually(lambda: upstream.file_requests())
        status, headers, body = get(url, {"Range": "bytes=0-9"})
        assert status == 206 and body == data[:10]
        assert headers["Content-Range"] == f"bytes 0-9/{size}"
        assert headers["ETag"] == f'"{sha256_file(big)}"'
        # Answered only once every byte arrived and matched the sha256, which
        # is also when the whole answer gets its last byte (the stall would
        # hold that back for seconds more had the range come any sooner).
        assert eventually(whole.done, timeout=3.0)
        status, headers, body = get(url, {"Range": "bytes=-10"})
        assert status == 206 and body == data[-10:]
        assert headers["Content-Range"] == f"bytes {size - 10}-{size - 1}/{size}"
        assert whole.result()[0] == 200 and whole.result()[2] == data
    assert len([r for r in upstream.file_requests() if r[1].endswith(big.name)]) == 1
    # Cached now: the same answers from the file on disk.
    for rng, want in (("bytes=0-9", data[:10]), ("bytes=-10", data[-10:]),
                      (f"bytes={size - 5}-", data[-5:]), (f"bytes=-{size + 9}", data)):
        status, headers, body = get(url, {"Range": rng})
        assert (status, body) == (206, want), rng
    status, headers, _ = get(url, {"Range": f"bytes={size}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{size}"


def test_range_outside_an_uncached_file_is_416(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    path = published["app"]
    url = f"{proxy.url}/files/tiny-app/{path.name}"
    size = path.stat().st_size
    for rng in (f"bytes={size}-", "bytes=9-3", "pages=1-2"):
        status, headers, body = get(url, {"Range": rng})
        assert status == 416, rng
        assert headers["Content-Range"] == f"bytes */{size}"
    status, _, body = get(url)  # the refused ranges left the transfer usable
    assert status == 200 and body == path.read_bytes()


def test_tampered_upstream_file_is_refused_and_never_cached(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path], tmp_path: Path,
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    upstream.fault("tamper", path_prefix="/files/")
    result = pip_install(proxy.index_url, tmp_path / "t", "tiny-dep")
    assert result.returncode != 0
    assert installed_version(tmp_path / "t", "tiny-dep") is None
    metrics = get(proxy.url + "/metrics")[2].decode()
    assert "indexguard_hash_mismatches_total 0.0" not in metrics
    # Nothing was committed: the next request goes upstream again, and once the
    # upstream serves the right bytes the install works.
    upstream.clear_faults()
    upstream.clear_requests()
    healed = pip_install(proxy.index_url, tmp_path / "t2", "tiny-dep")
    assert healed.returncode == 0, healed.stderr
    assert upstream.file_requests()
    # The last byte goes out once verified; fsync and rename follow it.
    cache_dir = proxy.data_dir / "cache" / "files"
    want = sha256_file(published["dep"])
    assert eventually(lambda: want in {p.name for p in cache_dir.rglob("*") if p.is_file()})


def test_concurrent_cold_requests_make_one_upstream_fetch(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    big = build_wheel(artifacts_dir, "big-one", "1.0", extra_bytes=8 * 2**20)
    upstream.add(big)
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    assert get(proxy.url + "/simple/big-one/")[0] == 200
    upstream.fault("slow", path_prefix="/files/", seconds=0.5, phase="body")
    url = f"{proxy.url}/files/big-one/{big.name}"
    expected = sha256_file(big)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        bodies = list(pool.map(lambda _i: get(url, timeout=60), range(20)))
    assert all(s == 200 and hashlib.sha256(b).hexdigest() == expected for s, _h, b in bodies)
    assert len([r for r in upstream.file_requests() if r[1].endswith(big.name)]) == 1


def test_cache_stays_under_max_bytes(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    wheels = [build_wheel(artifacts_dir, f"sized-{i}", "1.0", extra_bytes=300_000)
              for i in range(4)]
    for w in wheels:
        upstream.add(w, with_metadata=False)
    proxy = make_proxy({"upstream": {"url": upstream.url}, "cache": {"max_bytes": "700KB"}})
    for i, w in enumerate(wheels):
        assert get(f"{proxy.url}/files/sized-{i}/{w.name}")[0] == 200
    cache_dir = proxy.data_dir / "cache" / "files"
    total = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    assert 0 < total <= 700_000
    # The last file is committed (and the cache trimmed) just after its client
    # had the last byte: wait for that, then exactly the two oldest are gone.
    evictions = re.compile(r"^indexguard_cache_evictions_total (\S+)$", re.M)

    def evicted() -> float:
        found = evictions.search(get(proxy.url + "/metrics")[2].decode())
        return float(found.group(1)) if found else -1.0

    assert eventually(lambda: evicted() == 2.0), evicted()


def test_bad_requests_are_4xx_never_500(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    cases = [
        ("/simple/tiny-app/", {"Accept": "application/json"}, 406),
        ("/simple/tiny-app/", {"Accept": f"{JSON_V1};q=high"}, 400),
        ("/simple/tiny-app/?format=text/xml", {}, 406),
        ("/files/tiny-app/..%2F..%2Fconfig.yaml", {}, 404),
        ("/files/tiny-app/%00", {}, 404),
        ("/files/tiny-app/nope-1.0.tar.gz", {}, 404),
        ("/files/tiny-app/" + published["app"].name + ".metadata.metadata", {}, 404),
        ("/simple/" + "a" * 300 + "/", {}, 404),
    ]
    for path, headers, expected in cases:
        status, _resp_headers, body = get(proxy.url + path, headers)
        assert status == expected, (path, status, body)

    # What no route takes is answered like the rest, and counted under one label.
    status, headers, body = get(proxy.url + "/no/such/thing")
    assert (status, body) == (404, b"Not found\n")
    status, headers, body = get(proxy.url + "/simple/tiny-app/", method="PUT")
    assert status == 405 and "GET" in headers["Allow"] and "PUT" not in headers["Allow"]
    status, headers, body = get(proxy.url + "/-/health", method="PROPFIND")
    assert status == 405
    metrics = get(proxy.url + "/metrics")[2].decode()
    assert 'route="unmatched",status="404"} 1.0' in metrics
    assert 'method="other",route="unmatched",status="405"} 1.0' in metrics
    assert "PROPFIND" not in metrics
    assert "Traceback" not in proxy.log_text()


def test_large_upstream_page_is_read_whole(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
) -> None:
    # content.read(n) returns what is buffered, not n bytes: a page larger than
    # one socket read (64 KiB) once came back truncated and answered 502.
    wheels = [build_wheel(artifacts_dir, "many-files", f"1.{i}") for i in range(250)]
    for wheel in wheels:
        upstream.add(wheel)
    proxy = make_proxy({"upstream": {"url": upstream.url}})
    status, _h, body = get(proxy.url + "/simple/many-files/", {"Accept": JSON_V1})
    assert status == 200
    assert len(body) > 64 * 1024
    assert len(orjson.loads(body)["files"]) == 250


def test_cached_files_keep_the_connection_alive(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    # A FileResponse prepared twice broke keep-alive after every cached file.
    import http.client

    proxy = make_proxy({"upstream": {"url": upstream.url}})
    path = "/files/tiny-app/" + published["app"].name
    assert get(proxy.url + path)[0] == 200  # cached now
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == 200
            assert hashlib.sha256(resp.read()).hexdigest() == sha256_file(published["app"])
            assert resp.getheader("Connection", "").lower() != "close"
    finally:
        conn.close()


def test_access_log_one_json_line_per_request_without_credentials(
    make_proxy: MakeProxy, upstream: FakeUpstream, published: dict[str, Path],
) -> None:
    proxy = make_proxy({"upstream": {"url": upstream.url}, "log": {"level": "info"}})
    page_url = proxy.url + "/simple/tiny-app/"
    wheel = published["app"].name
    requests = [
        (page_url, {}), (page_url, {}), (proxy.url + "/simple/no-such-thing-here/", {}),
        (f"{proxy.url}/files/tiny-app/{wheel}", {}),
        (page_url, {"Authorization": "Basic X190b2tlbl9fOnRvcC1zZWNyZXQtdmFsdWU="}),
    ]
    statuses = [get(url, headers)[0] for url, headers in requests]
    assert statuses == [200, 200, 404, 200, 401]

    def access_lines() -> list[dict[str, object]]:
        lines = [orjson.loads(line) for line in proxy.log_text().splitlines()
                 if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "indexguard.access"
                and line["path"] != "/-/health"]  # the harness's readiness probes

    deadline = time.monotonic() + 10
    while len(access_lines()) < len(requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    # A line is written when its response is done: a streamed file may finish
    # after the client has already sent its next request.
    lines = sorted(access_lines(), key=lambda line: (str(line["path"]), int(line["status"])))
    assert [(line["path"], line["status"]) for line in lines] == sorted(
        (url.removeprefix(proxy.url), status) for (url, _h), status in zip(
            requests, statuses, strict=True)
    )
    file_line, *_ = [line for line in lines if str(line["path"]).startswith("/files/")]
    size = published["app"].stat().st_size  # "bytes" counts the headers too
    assert file_line["cache"] == "upstream" and size < int(file_line["bytes"]) < size + 1024
    page_lines = [line for line in lines if line["path"] == "/simple/tiny-app/"]
    assert [line["cache"] for line in page_lines] == ["upstream"] * 2 + ["-"]
    assert [line["token"] for line in page_lines][:2] == ["anonymous", "anonymous"]
    for line in lines:
        assert line["msg"] == "request" and line["level"] == "info" and line["method"] == "GET"
        assert str(line["ts"]).endswith("Z") and isinstance(line["duration_ms"], float)
    assert "top-secret-value" not in proxy.log_text() and "X19" not in proxy.log_text()
