"""Issue 10, items 1, 3 and 4: a hostile upstream's pages, played against the real server.

The FakeUpstream scripts project pages (PEP 691 JSON and PEP 503 HTML) whose
hashes are paths, whose fields have the wrong types, and whose text is markup.
A hash must never name a file (canaries under tmp_path stay unread and
undeleted, eviction included), no odd value is a 500, and everything that
reaches the proxy's HTML is escaped behind a CSP.
"""

from __future__ import annotations

import hashlib
import html
import os
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import diskcache
import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import JSON_V1, Answer, call, eventually
from tests.support.artifacts import build_wheel, sha256_file, wheel_metadata
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.timeout(240)

HTML_V1 = "application/vnd.pypi.simple.v1+html"
HTML_FORMATS = ("text/html", HTML_V1)
LONG_AGO = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- pages a hostile upstream sends ------------------------------------------------


def json_page(name: str, files: list[Any], **extra: Any) -> dict[str, Any]:
    return {"meta": {"api-version": "1.1"}, "name": name, "files": files, **extra}


def json_file(
    upstream: FakeUpstream, filename: str, sha256: Any, meta_sha256: Any = None, **fields: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "filename": filename, "url": upstream.file_url(filename), "hashes": {"sha256": sha256},
    }
    if meta_sha256 is not None:
        entry["core-metadata"] = entry["dist-info-metadata"] = {"sha256": meta_sha256}
    entry.update(fields)
    return entry


def html_page(anchors: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><title>Links</title></head><body>\n"
        + "\n".join(anchors) + "\n</body></html>\n"
    )


def html_file(
    upstream: FakeUpstream, filename: str, fragment: str | None,
    meta: str | None = None, **attrs: str,
) -> str:
    href = upstream.file_url(filename) + (f"#{fragment}" if fragment is not None else "")
    parts = [f'href="{html.escape(href)}"']
    if meta is not None:
        parts.append(f'data-core-metadata="{html.escape(meta)}"')
    parts += [f'{k.replace("_", "-")}="{html.escape(v)}"' for k, v in attrs.items()]
    return f"<a {' '.join(parts)}>{html.escape(filename)}</a><br>"


# --- looking at what the proxy answered ----------------------------------------------


def get(proxy: ProxyServer, path: str, accept: str | None = None) -> Answer:
    return call(proxy.url + path, headers={"Accept": accept} if accept else None)


def assert_no_traceback(proxy: ProxyServer) -> None:
    log = proxy.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, proxy.log_tail()


def listed_files(proxy: ProxyServer, project: str) -> list[dict[str, Any]]:
    answer = get(proxy, f"/simple/{project}/", JSON_V1)
    assert answer.status == 200, (answer.status, answer.body[:300])
    files: list[dict[str, Any]] = orjson.loads(answer.body)["files"]
    return files


class _Markup(HTMLParser):
    """Every tag and attribute of a page, to prove no markup came from upstream."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def markup(body: bytes) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Markup()
    parser.feed(body.decode())
    parser.close()
    return parser.tags


# --- 1. a hash is data, never a path ------------------------------------------------


def _canary(tmp_path: Path) -> tuple[Path, bytes]:
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()
    content = b"canary " + os.urandom(16).hex().encode() + b"\n"
    canary.write_bytes(content)
    return canary, content


def _path_hashes(proxy: ProxyServer, canary: Path) -> list[str]:
    """Hashes that name files outside data_dir, as the cache root would join them
    (files/<sha[:2]>/<sha>: a hash starting with '..' climbs from data/cache)."""
    from_cache = proxy.data_dir / "cache"
    return [
        str(canary),
        os.path.relpath(canary, from_cache),
        "../../config.yaml",  # the proxy's own config, as in the issue
        str(proxy.config_path),
    ]


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_hash_that_is_a_path_is_never_served_nor_evicted(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, tmp_path: Path,
    fmt: str,
) -> None:
    canary, canary_bytes = _canary(tmp_path)
    # Two real ~300 KB wheels through a 400 KB cache: the second evicts the first.
    wheels = [build_wheel(artifacts_dir, "evict-me", f"{i}.0", extra_bytes=300_000)
              for i in (1, 2)]
    for wheel in wheels:
        upstream.add(wheel, with_metadata=False)
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5},
                        "cache": {"max_bytes": "400KB"}})
    config_bytes = proxy.config_path.read_bytes()
    hostile = _path_hashes(proxy, canary)
    assert hostile[1].startswith("../") and (proxy.data_dir / "cache" / hostile[1]).exists()
    names = [f"victim-{i}.0-py3-none-any.whl" for i in range(len(hostile))]

    if fmt == "json":
        page: Any = json_page("victim", [
            json_file(upstream, n, sha, meta_sha256=sha)
            for n, sha in zip(names, hostile, strict=True)
        ] + [json_file(upstream, w.name, sha256_file(w)) for w in wheels])
    else:
        page = html_page([
            html_file(upstream, n, f"sha256={sha}", meta=f"sha256={sha}")
            for n, sha in zip(names, hostile, strict=True)
        ] + [html_file(upstream, w.name, f"sha256={sha256_file(w)}") for w in wheels])
    upstream.script("/simple/victim/", page)

    served: dict[str, Answer] = {}
    for filename in names:
        for suffix in ("", ".metadata"):
            served[filename + suffix] = get(proxy, f"/files/victim/{filename}{suffix}")
    # Real files through the cache, so that LRU eviction runs.
    for wheel in wheels:
        answer = get(proxy, f"/files/victim/{wheel.name}")
        assert answer.status == 200 and answer.body == wheel.read_bytes()
    first = proxy.data_dir / "cache" / "files" / sha256_file(wheels[0])[:2] / sha256_file(wheels[0])
    assert eventually(lambda: not first.exists()), "eviction never ran"

    problems = [f"{path}: {a.status} {a.body[:60]!r}" for path, a in served.items()
                if a.status != 404 or b"sha256" not in a.body  # a 404 that says why
                or canary_bytes in a.body or config_bytes in a.body]
    for target, content in ((canary, canary_bytes), (proxy.config_path, config_bytes)):
        if not target.exists() or target.read_bytes() != content:
            problems.append(f"{target} was deleted or changed")
    assert not problems, "\n".join(problems)
    assert not any(f.get("core-metadata") for f in listed_files(proxy, "victim")
                   if f["filename"] in names)
    assert_no_traceback(proxy)


def test_hostile_page_cached_by_an_older_version_is_checked_again(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """Pages on disk are checked when read: an older version stored what upstream sent."""
    canary, canary_bytes = _canary(tmp_path)
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5},
                        "guard": {"min_age": "1d"}}, start=False)
    config_bytes = proxy.config_path.read_bytes()
    filename = "stale-1.0-py3-none-any.whl"
    stored = {
        "page": {
            "name": "stale",
            "files": [
                {"filename": filename, "hashes": {"sha256": str(canary)},
                 "requires_python": 3.8, "yanked": {"why": 1},
                 "metadata_hashes": {"sha256": "../../config.yaml"},
                 "size": "big", "upload_time": 1700000000,
                 "origin": upstream.file_url(filename)},
                {"filename": "stale-0.9.tar.gz", "hashes": ["not", "a", "dict"],
                 "requires_python": ["x"], "yanked": 5, "metadata_hashes": "sha256=zz",
                 "size": True, "upload_time": "yesterday", "origin": 7},
                "not an entry", 42, None,
            ],
            "versions": [1, None, "1.0"],
        },
        "fetched_at": time.time(), "etag": None, "last_modified": None,
    }
    pages = diskcache.Cache(str(proxy.data_dir / "cache" / "pages"))
    try:
        pages.set("stale", orjson.dumps(stored))
    finally:
        pages.close()
    proxy.start()

    for accept in (JSON_V1, *HTML_FORMATS):
        answer = get(proxy, "/simple/stale/", accept)
        assert answer.status == 200, (accept, answer.status, answer.body[:200])
    for path in (filename, filename + ".metadata", "stale-0.9.tar.gz"):
        answer = get(proxy, f"/files/stale/{path}")
        assert answer.status == 404 and b"no sha256" in answer.body, (path, answer.status)
        assert canary_bytes not in answer.body and config_bytes not in answer.body
    assert canary.read_bytes() == canary_bytes
    assert proxy.config_path.read_bytes() == config_bytes
    assert upstream.file_requests() == []
    assert_no_traceback(proxy)


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_uppercase_sha256_of_a_real_file_is_served(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, fmt: str,
) -> None:
    wheel = build_wheel(artifacts_dir, "shouty", "1.0")
    upstream.add(wheel)
    sha, meta = sha256_file(wheel), wheel_metadata(wheel)
    meta_sha = hashlib.sha256(meta).hexdigest()
    if fmt == "json":
        page: Any = json_page("shouty", [
            json_file(upstream, wheel.name, sha.upper(), meta_sha256=meta_sha.upper())
        ])
    else:
        page = html_page([
            html_file(upstream, wheel.name, f"sha256={sha.upper()}",
                      meta=f"sha256={meta_sha.upper()}")
        ])
    upstream.script("/simple/shouty/", page)
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5}})

    for _ in range(2):  # streamed from upstream, then from the cache
        answer = get(proxy, f"/files/shouty/{wheel.name}")
        assert (answer.status, answer.complete) == (200, True), answer.body[:200]
        assert answer.body == wheel.read_bytes()
        answer = get(proxy, f"/files/shouty/{wheel.name}.metadata")
        assert (answer.status, answer.body) == (200, meta)
    (listed,) = listed_files(proxy, "shouty")
    assert listed["hashes"] == {"sha256": sha}  # what clients check: lowercase hex
    assert listed["core-metadata"] == {"sha256": meta_sha}
    assert_no_traceback(proxy)


# --- 4. typed parsing: odd values are dropped, never a 500 ----------------------------


def _odd_values(upstream: FakeUpstream, good: dict[str, Any]) -> dict[str, Any]:
    """Strings where hex is expected, numbers where strings are: each entry is
    well-shaped, so the old parser listed them all."""
    def entry(i: int, sha: Any = "a" * 64, **fields: Any) -> dict[str, Any]:
        return json_file(upstream, f"odd-{i}.0.tar.gz", sha, **fields)

    return json_page("odd", [
        entry(1, "zz"), entry(2, "g" * 64), entry(3, "a" * 63), entry(4, "\u0000" * 64),
        entry(5, "../" * 21 + "x"), entry(6, "a" * 64 + "\n"), entry(7, 12345),
        entry(8, None), entry(9, ["a" * 64]), entry(10, {"a": "b"}), entry(11, True),
        entry(12, meta_sha256="zz"), entry(13, meta_sha256=7),
        entry(14, **{"requires-python": 3.8}), entry(15, **{"upload-time": 1700000000}),
        entry(16, **{"upload-time": "yesterday"}), entry(17, **{"upload-time": "2024-13-45"}),
        entry(18, size="big"), entry(19, size=-1), entry(20, size=True), entry(21, size=1.5),
        entry(22, yanked={"why": 1}), entry(23, yanked=5), entry(24, yanked=[]),
        entry(25, **{"requires-python": {"a": 1}}), entry(26, **{"upload-time": []}),
        good,
    ], versions=[1, None, {"a": 1}, "1.0"])


def _odd_shapes(upstream: FakeUpstream, good: dict[str, Any]) -> dict[str, Any]:
    """Entries and fields of the wrong shape: the old parser gave up on the page."""
    name = "shapes-1.0.tar.gz"
    return json_page("shapes", [
        42, "a string", None, [], {"filename": name},
        {"filename": 123, "url": upstream.file_url(name), "hashes": {}},
        {"filename": name, "url": 5, "hashes": {}},
        {"filename": name, "url": "http://[::1/x", "hashes": {}},
        {"filename": "shapes-2.0.tar.gz", "url": upstream.file_url(name), "hashes": ["a"]},
        {"filename": "shapes-3.0.tar.gz", "url": upstream.file_url(name), "hashes": "abc"},
        {"filename": "shapes-4.0.tar.gz", "url": upstream.file_url(name), "hashes": None,
         "core-metadata": 5},
        {"filename": "shapes-5.0.tar.gz", "url": upstream.file_url(name),
         "hashes": {"sha256": "b" * 64}, "core-metadata": {"sha256": {"a": 1}}},
        good,
    ], versions="1.0")


def _odd_html(upstream: FakeUpstream, wheel: Path) -> str:
    return html_page([
        '<a href="http://[bad/odd-1.0.tar.gz#sha256=' + "a" * 64 + '">x</a>',
        html_file(upstream, "odd-2.0.tar.gz", "sha256=zz"),
        html_file(upstream, "odd-3.0.tar.gz", "sha256="),
        html_file(upstream, "odd-4.0.tar.gz", "sha256"),
        html_file(upstream, "odd-5.0.tar.gz", "sha256=" + "\u00e9" * 64),
        html_file(upstream, "odd-6.0.tar.gz", "sha256=../x&sha256=" + "c" * 64),
        html_file(upstream, "odd-7.0.tar.gz", None, meta="sha256=zz"),
        html_file(upstream, "odd-8.0.tar.gz", None, meta="sha256"),
        '<a href="odd-9.0.tar.gz" data-requires-python data-yanked>odd</a>',
        html_file(upstream, wheel.name, f"sha256={sha256_file(wheel)}"),
    ])


@pytest.mark.parametrize("shape", ["values", "shapes", "html"])
def test_odd_types_on_upstream_pages_are_dropped_never_a_500(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path, shape: str,
) -> None:
    project = {"values": "odd", "shapes": "shapes", "html": "odd"}[shape]
    wheel = build_wheel(artifacts_dir, project, "9.0")
    upstream.add(wheel, with_metadata=False)
    good = json_file(upstream, wheel.name, sha256_file(wheel), **{"upload-time": LONG_AGO})
    page: Any = {
        "values": lambda: _odd_values(upstream, good),
        "shapes": lambda: _odd_shapes(upstream, good),
        "html": lambda: _odd_html(upstream, wheel),
    }[shape]()
    upstream.script(f"/simple/{project}/", page)
    # min_age reads every upload-time the page kept.
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5},
                        "guard": {"min_age": "1d"}})

    for accept in (JSON_V1, *HTML_FORMATS):
        answer = get(proxy, f"/simple/{project}/", accept)
        assert answer.status == 200, (accept, answer.status, answer.body[:300])
    files = listed_files(proxy, project)
    assert wheel.name in [f["filename"] for f in files]
    for f in files:
        for value in f["hashes"].values():
            assert len(value) in (32, 40, 56, 64, 96, 128) and int(value, 16) >= 0
        assert isinstance(f.get("requires-python", ""), str)
        assert isinstance(f.get("size", 0), int) and not isinstance(f.get("size"), bool)
        assert isinstance(f["yanked"], bool | str)
        for suffix in ("", ".metadata"):
            answer = get(proxy, f"/files/{project}/{f['filename']}{suffix}")
            assert answer.status in (200, 404), (f["filename"], suffix, answer.status)
            if answer.status == 404:
                assert answer.body.strip(), "a 404 says why"
    answer = get(proxy, f"/files/{project}/{wheel.name}")
    assert answer.status == 200 and answer.body == wheel.read_bytes()
    assert_no_traceback(proxy)


# --- 3. no stored XSS: escaped, and behind a CSP ------------------------------------

SCRIPT = '"><script>alert(1)</script>'
IMG = "'><img src=x onerror=alert(2)>"
JS = "javascript:alert(3)//"
# Printable ASCII with no space or slash: a file name the parser keeps.
NAME = 'xss-1.0"onmouseover="alert(4)".tar.gz'
_TAGS = {"html", "head", "meta", "title", "body", "h1", "a", "br"}
_ATTRS = {"href", "name", "content", "data-requires-python", "data-yanked",
          "data-core-metadata", "data-dist-info-metadata"}


def _xss_page(upstream: FakeUpstream, fmt: str) -> Any:
    if fmt == "json":
        return json_page("xss", [
            json_file(upstream, "xss-1.0.tar.gz", SCRIPT, meta_sha256=SCRIPT,
                      **{"requires-python": SCRIPT, "yanked": IMG}),
            json_file(upstream, "xss-2.0.tar.gz", "a" * 64, meta_sha256=JS,
                      **{"requires-python": JS, "yanked": JS}),
            json_file(upstream, NAME, "b" * 64, **{"requires-python": IMG}),
        ], versions=[SCRIPT])
    return html_page([
        html_file(upstream, "xss-1.0.tar.gz", f"sha256={SCRIPT}", meta=f"sha256={SCRIPT}",
                  data_requires_python=SCRIPT, data_yanked=IMG),
        html_file(upstream, "xss-2.0.tar.gz", "sha256=" + "a" * 64, meta=f"sha256={JS}",
                  data_requires_python=JS, data_yanked=JS),
        html_file(upstream, NAME, "sha256=" + "b" * 64, data_requires_python=IMG),
    ])


@pytest.mark.parametrize("fmt", ["json", "html"])
def test_upstream_markup_renders_escaped_behind_a_csp(
    make_proxy: MakeProxy, upstream: FakeUpstream, fmt: str,
) -> None:
    upstream.script("/simple/xss/", _xss_page(upstream, fmt))
    proxy = make_proxy({"upstream": {"url": upstream.url, "timeout": 5}})

    for accept in HTML_FORMATS:
        answer = get(proxy, "/simple/xss/", accept)
        assert answer.status == 200, answer.body[:300]
        body = answer.body.decode()
        assert "<script" not in body and "<img" not in body, body
        tags = markup(answer.body)
        assert {tag for tag, _ in tags} <= _TAGS, tags
        anchors = [attrs for tag, attrs in tags if tag == "a"]
        assert len(anchors) == 3
        for attrs in anchors:
            assert set(attrs) <= _ATTRS, attrs
            assert (attrs["href"] or "").startswith("../../files/xss/"), attrs
            assert SCRIPT not in (attrs["href"] or "")
            assert JS not in (attrs.get("data-core-metadata") or "")
        # Kept, and escaped rather than stripped: the values read back as sent.
        assert anchors[0]["data-requires-python"] == SCRIPT
        assert anchors[0]["data-yanked"] == IMG
        assert anchors[1]["data-yanked"] == JS
        assert anchors[2]["data-requires-python"] == IMG
        assert html.unescape(body).count(NAME) == 1  # the link text; the href is %-quoted
        assert "default-src 'none'" in answer.headers.get("content-security-policy", "")
        assert answer.headers.get("x-content-type-options") == "nosniff"

    answer = get(proxy, "/simple/xss/", JSON_V1)
    assert answer.status == 200
    assert answer.headers.get("x-content-type-options") == "nosniff"
    for accept, wanted in (("text/html", "csp"), (JSON_V1, "nosniff")):
        root = get(proxy, "/simple/", accept)
        assert root.status == 200
        assert root.headers.get("x-content-type-options") == "nosniff"
        if wanted == "csp":
            assert "default-src 'none'" in root.headers.get("content-security-policy", "")
    missing = get(proxy, "/files/xss/xss-1.0.tar.gz")
    assert missing.status == 404 and missing.headers.get("x-content-type-options") == "nosniff"
    assert_no_traceback(proxy)
