"""Hostile text through every page of the web UI (issue 13), against the real server.

Upstream file names, requires-python and yank reasons, private yank reasons and
descriptions, search queries, URL segments and the Host header: each page must
show them as text (escaped), run nothing, and carry the UI's Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import ADMIN, ADMIN_SECRET, auth_config, basic, call, upload
from tests.support.artifacts import build_wheel
from tests.support.browser import chromium
from tests.support.server import ProxyServer
from tests.support.upstream import FakeUpstream

UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
          "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SIMPLE_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
ADMIN_AUTH = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
# Safe file names to the proxy (one printable path segment) that are markup to a browser.
FILE_BOLD = "evil-2.0-x.whl<b>bold<b>"
FILE_ATTR = "evil-2.1-x\"onmouseover='window.__pwned=4'.whl"
FILE_YOUNG = "evil-3.0-<i>young<i>.whl"
UPSTREAM_YANK = "<script>window.__pwned=1</script>upstream-yank"
REQUIRES = "\"><img src=x onerror=window.__pwned=2>"
PRIVATE_YANK = "</p><script>window.__pwned=5</script>private-yank"
QUERY = "<script>window.__pwned=6</script>"
DESCRIPTION = """# Hostile

<script>window.__pwned = 7</script>
<iframe src="javascript:window.__pwned=8"></iframe>
<style>body { display: none }</style>
<img src="x.png" onerror="window.__pwned=9">
<a href="javascript:window.__pwned=10">click</a>
<div onclick="window.__pwned=11" style="color: red">styled</div>
[md link](javascript:window.__pwned=12)
"""
# What must never survive as markup anywhere: each one leaves a trace when it runs.
PAYLOADS = ("<script>window", "<img src=x onerror", "<b>bold", "<i>young", "<iframe",
            "<style>", "onerror=\"window", "onclick=")


class Audit(HTMLParser):
    """Every element and attribute of a page, and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.text: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key.startswith("on") or key == "style":
                self.problems.append(f"<{tag} {key}={value!r}>")
            if key in ("href", "src", "action") and (value or "").strip().lower().startswith(
                    "javascript:"):
                self.problems.append(f"<{tag} {key}={value!r}>")
        if tag == "script":
            self.scripts.append(dict(attrs).get("src") or "")
        if tag in ("iframe", "object", "embed", "style", "base", "b", "i", "meta") and not (
                tag == "meta" and ("charset" in dict(attrs) or dict(attrs).get("name")
                                   == "viewport")):
            self.problems.append(f"<{tag}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def audit(proxy: ProxyServer, path: str, headers: dict[str, str] | None = None,
          status: int = 200) -> str:
    """The page's text, after checking that it is HTML under the UI's CSP whose
    only script is ours and where nothing hostile became markup."""
    answer = call(proxy.url + path, headers={"Accept": "text/html", **(headers or {})})
    assert answer.status == status, (path, answer.status, answer.body[:300])
    assert answer.headers["content-security-policy"] == UI_CSP
    assert answer.headers["x-content-type-options"] == "nosniff"
    body = answer.body.decode()
    for payload in PAYLOADS:
        assert payload not in body, (path, payload)
    parsed = Audit()
    parsed.feed(body)
    assert parsed.problems == [], (path, parsed.problems)
    assert len(parsed.scripts) == 1 and "-/static/ui.js?v=" in parsed.scripts[0], parsed.scripts
    return "".join(parsed.text)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture
def hostile(make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path) -> Iterator[
        ProxyServer]:
    config = auth_config()
    config["upstream"] = {"url": upstream.url}
    config["guard"] = {"min_age": "1d", "private_only": ["acme-*"]}
    proxy = make_proxy(config)
    old = _stamp(dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    young = _stamp(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    upstream.script("/simple/evil/", {
        "meta": {"api-version": "1.1"},
        "name": "evil",
        "files": [
            {"filename": "evil-1.0-py3-none-any.whl", "url": "../../files/evil-1.0.whl",
             "hashes": {"sha256": _sha("1")}, "yanked": UPSTREAM_YANK,
             "requires-python": REQUIRES, "upload-time": old, "size": 10},
            {"filename": FILE_BOLD, "url": "../../files/b.whl", "hashes": {"sha256": _sha("2")},
             "upload-time": old},
            {"filename": FILE_ATTR, "url": "../../files/c.whl", "hashes": {"sha256": _sha("3")},
             "upload-time": old},
            {"filename": FILE_YOUNG, "url": "../../files/d.whl", "hashes": {"sha256": _sha("4")},
             "upload-time": young},
        ],
    })
    assert call(proxy.url + "/simple/evil/").status == 200  # the proxy now knows the page
    for version, kwargs in (("1.0", {"description": DESCRIPTION,
                                     "description_content_type": "text/markdown"}),
                            ("2.0", {"description": ".. raw:: html\n\n   <script>x</script>\n",
                                     "description_content_type": "text/x-rst"})):
        wheel = build_wheel(tmp_path / version, "acme-lib", version, **kwargs)
        assert upload(proxy.url, wheel, "acme-lib", version).status == 200
    answer = call(f"{proxy.url}/-/yank/acme-lib/1.0?reason={quote(PRIVATE_YANK)}", "POST",
                  headers=ADMIN_AUTH)
    assert answer.status == 200, answer.body
    yield proxy


def test_hostile_upstream_text_is_escaped_on_every_page(
    hostile: ProxyServer, upstream: FakeUpstream,
) -> None:
    upstream.clear_requests()
    page = audit(hostile, "/project/evil/")
    # Shown, as text: the names, the reason, the requires-python.
    for text in ("evil-1.0-py3-none-any.whl", FILE_BOLD, FILE_ATTR, UPSTREAM_YANK, REQUIRES):
        assert text in page, text
    # min_age holds the young file back; the page says so, escaped.
    assert FILE_YOUNG in page
    guard = audit(hostile, "/guard/", ADMIN_AUTH)
    assert FILE_YOUNG in guard
    found = audit(hostile, "/search?q=evil")
    assert "evil" in found
    # None of it asked upstream for a page or a file (the guard's project list,
    # /simple/, is fetched in the background as for any read).
    assert [r for r in upstream.requests if r[1] != "/simple/"] == []


def test_hostile_private_text_is_escaped_and_descriptions_sanitized(
    hostile: ProxyServer,
) -> None:
    page = audit(hostile, "/project/acme-lib/")
    assert PRIVATE_YANK in page
    # 2.0's description (rst with a raw directive) falls back to text: no markup.
    assert "<script>x</script>" in page
    landing = audit(hostile, "/")
    assert "acme-lib" in landing
    # The 1.0 description (Markdown) is the one for the newest release only when
    # 2.0 is yanked: yank 2.0 to see it rendered and sanitized.
    answer = call(f"{hostile.url}/-/yank/acme-lib/2.0?reason=x", "POST", headers=ADMIN_AUTH)
    assert answer.status == 200
    answer = call(f"{hostile.url}/-/unyank/acme-lib/1.0", "POST", headers=ADMIN_AUTH)
    assert answer.status == 200
    page = audit(hostile, "/project/acme-lib/")
    assert "Hostile" in page and "styled" in page


def test_hostile_queries_paths_and_hosts(hostile: ProxyServer) -> None:
    text = audit(hostile, "/search?q=" + quote(QUERY))
    assert QUERY in text
    text = audit(hostile, "/", {"Host": "evil\"><script>window.__pwned=13</script>"})
    assert "window.__pwned=13" not in text
    for path in ("/project/%3Cscript%3E/", "/g/%3Cscript%3Ex/project/evil/",
                 "/g/%3Cscript%3Ex/search?q=a"):
        answer = call(hostile.url + path, headers={"Accept": "text/html"})
        assert answer.status == 404
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.headers["x-content-type-options"] == "nosniff"
    # The simple API's pages keep their own, stricter policy.
    simple = call(hostile.url + "/simple/evil/")
    assert simple.headers["content-security-policy"] == SIMPLE_CSP


@pytest.fixture(scope="module", name="chromium")
def chromium_fixture() -> Iterator[Any]:
    yield from chromium()


def test_nothing_hostile_runs_in_a_browser(hostile: ProxyServer, chromium: Any) -> None:
    context = chromium.new_context(http_credentials={"username": ADMIN,
                                                     "password": ADMIN_SECRET})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    for path in ("/", "/project/evil/", "/project/acme-lib/", "/guard/",
                 "/search?q=" + quote(QUERY)):
        page.goto(hostile.url + path)
        page.wait_for_load_state("networkidle")
        page.mouse.move(10, 10)
        for cell in page.locator("td.filename a").all():
            cell.hover()
        assert page.evaluate("typeof window.__pwned") == "undefined", path
        # Nothing hostile became an element either (the CSP alone would stop it
        # running: this is the escaping, the first wall).
        injected = page.evaluate(
            "document.querySelectorAll('body script, iframe, style, b, i, [onerror],"
            " [onclick], [onmouseover], [style]').length")
        assert injected == 0, path
    assert dialogs == []
    context.close()
