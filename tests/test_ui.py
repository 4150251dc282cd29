"""The web UI (issue 13) in a real headless Chromium against the real server.

Playwright's Python API drives Debian's /usr/bin/chromium (never a downloaded
browser). The run writes docs/ui-landing.png and docs/ui-project.png, the
README's screenshots. Pure parts (negotiation, search, descriptions) are
tested in process at the end.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from proxy import description, ui_model
from tests.conftest import MakeProxy
from tests.faults.helpers import (
    ADMIN,
    ADMIN_SECRET,
    WRITER,
    WRITER_SECRET,
    auth_config,
    basic,
    call,
    eventually,
    metric,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.browser import chromium
from tests.support.clients import (
    installed_version,
    pip_download,
    twine_upload,
    uv_install,
    uv_venv,
)
from tests.support.forms import multipart, upload_fields
from tests.support.server import DELETE, ProxyServer
from tests.support.upstream import FakeUpstream
from tests.test_publish import ADMIN_SECRET as PRIVATE_ADMIN_SECRET
from tests.test_publish import READER, READER_SECRET
from tests.test_publish import WRITER as PRIVATE_WRITER
from tests.test_publish import WRITER_SECRET as PRIVATE_WRITER_SECRET
from tests.test_publish import auth_config as private_auth_config

DOCS = Path(__file__).resolve().parents[1] / "docs"
ADMIN_AUTH = {"Authorization": basic(ADMIN, ADMIN_SECRET)}
# A description that would leave a trace if its script ran.
DESCRIPTION = """# Acme Lib

The **acme** helpers for our services.

## Usage

```python
import acme_lib
```

<script>window.__pwned = 1; console.log("pwned-by-description")</script>
<img src="nowhere.png" onerror="window.__pwned = 2">
[click](javascript:window.__pwned=3)
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


class Console:
    """Every console message and uncaught error of a page."""

    def __init__(self, page: Any) -> None:
        self.messages: list[tuple[str, str]] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.messages.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def problems(self) -> list[str]:
        return self.errors + [text for kind, text in self.messages if kind in ("error", "warning")]


def _proxy(make_proxy: MakeProxy, upstream: FakeUpstream, **extra: Any) -> ProxyServer:
    config = auth_config()
    config["upstream"] = {"url": upstream.url}
    config.update(extra)
    return make_proxy(config)


def _publish(proxy: ProxyServer, tmp: Path, name: str, version: str, **kwargs: Any) -> Path:
    wheel = build_wheel(tmp / f"{name}-{version}", name, version, **kwargs)
    answer = upload(proxy.url, wheel, name, version)
    assert answer.status == 200, answer.body
    return wheel


def _yank(proxy: ProxyServer, name: str, version: str, reason: str) -> None:
    answer = call(f"{proxy.url}/-/yank/{name}/{version}?reason={quote(reason)}", "POST",
                  headers={"Authorization": basic(ADMIN, ADMIN_SECRET)})
    assert answer.status == 200, answer.body


def test_landing_loads_without_console_errors_and_search_finds_a_substring(
    make_proxy: MakeProxy, upstream: FakeUpstream, browser: Any, tmp_path: Path,
) -> None:
    proxy = _proxy(make_proxy, upstream)
    for name, version in (("acme-billing", "3.1.0"), ("acme-lib", "2.0"),
                          ("platform-tools", "0.9")):
        _publish(proxy, tmp_path, name, version)
    upstream.add(build_wheel(tmp_path / "up", "requests", "2.32.3"))
    assert call(proxy.url + "/simple/requests/").status == 200  # an upstream name it served

    # Other clients keep today's answer at /.
    plain = call(proxy.url + "/")
    assert plain.status == 200 and plain.headers["content-type"].startswith("text/plain")
    assert call(proxy.url + "/", headers={"Accept": "*/*"}).body == plain.body

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console = Console(page)
    response = page.goto(proxy.url + "/")
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_load_state("networkidle")
    assert console.problems() == []
    # Newest upload first; the groups and indexes; every setup snippet.
    rows = page.locator("table.list tbody tr td:first-child").all_inner_texts()
    assert rows == ["platform-tools", "acme-lib", "acme-billing"]
    assert page.locator("pre#pip-conf").inner_text().strip() == (
        f"[global]\nindex-url = {proxy.url}/simple/")
    for key in ("pip-env", "uv-index", "poetry", "pypirc", "uv-publish"):
        assert proxy.url in page.locator(f"pre#{key}").inner_text()
    # The script ran (copy buttons are shown only by it) and the stylesheet applied.
    assert page.locator("button[data-copy='pip-conf']").is_visible()
    assert page.evaluate("getComputedStyle(document.querySelector('header.top')).display") \
        == "flex"
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-landing.png"), full_page=True)

    # Search by a substring, spelled as a name may be (case, '_' for '-').
    page.fill("form.big input[name=q]", "E_LI")
    page.click("form.big button")
    page.wait_for_load_state()
    assert page.locator("ul.results a").all_inner_texts() == ["acme-lib"]
    page.fill("header input[name=q]", "req")
    page.press("header input[name=q]", "Enter")
    page.wait_for_load_state()
    assert page.locator("ul.results a").all_inner_texts() == ["requests"]
    page.click("ul.results a")
    assert page.locator("p.why").inner_text().endswith("from upstream pypi")
    assert console.problems() == []
    page.close()


def test_project_page_versions_yank_description_sha256_and_copy(
    make_proxy: MakeProxy, upstream: FakeUpstream, browser: Any, tmp_path: Path,
) -> None:
    proxy = _proxy(make_proxy, upstream)
    _publish(proxy, tmp_path, "acme-lib", "1.0", description="# Old",
             description_content_type="text/markdown")
    _publish(proxy, tmp_path, "acme-lib", "1.1", requires_python=">=3.9")
    newest = _publish(proxy, tmp_path, "acme-lib", "2.0", requires_python=">=3.11",
                      description=DESCRIPTION, description_content_type="text/markdown")
    _yank(proxy, "acme-lib", "1.1", "Broken on Windows: use 2.0")

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=proxy.url)
    page = context.new_page()
    console = Console(page)
    response = page.goto(proxy.url + "/project/Acme_Lib")  # redirected to the normal name
    assert response.status == 200 and page.url == proxy.url + "/project/acme-lib/"
    page.wait_for_load_state("networkidle")

    assert page.locator("p.why").inner_text() == (
        "Resolves in group default: private in index default")
    assert page.locator(".release h3").all_inner_texts() == ["2.0", "1.1 yanked", "1.0"]
    yanked = page.locator(".release.yanked")
    assert yanked.locator(".yank-reason").inner_text() == "Yanked: Broken on Windows: use 2.0"
    assert page.locator(".release").first.locator("td").nth(3).inner_text() == ">=3.11"

    # The newest release's description, rendered by readme_renderer, its script inert.
    article = page.locator("article.description")
    assert article.locator("h1").inner_text() == "Acme Lib"
    assert article.locator("h2").inner_text() == "Usage"
    assert article.locator("script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert not any("pwned" in text for _kind, text in console.messages)

    # The sha256 shown is the file's, as served by the link beside it.
    row = page.locator(".release").first.locator("tbody tr").first
    shown = row.locator("code.sha256").inner_text()
    assert shown == sha256_file(newest)
    link = row.locator("td.filename a").evaluate("a => a.href")
    assert link == f"{proxy.url}/files/acme-lib/{newest.name}"
    served = context.request.get(link)
    assert hashlib.sha256(served.body()).hexdigest() == shown

    # Copy buttons put the text in the clipboard.
    page.click("button[data-copy='install-pip']")
    assert page.evaluate("navigator.clipboard.readText()") == (
        f"pip install --index-url {proxy.url}/simple/ acme-lib==2.0\n")
    row.locator("button.copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == shown
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "ui-project.png"), full_page=True)
    # Only failed loads may show: the description's <img> points at nothing.
    assert [p for p in console.problems() if "404" not in p] == []
    context.close()


def test_every_page_works_without_javascript(
    make_proxy: MakeProxy, upstream: FakeUpstream, browser: Any, tmp_path: Path,
) -> None:
    """Search is a plain form, pages are plain HTML; only the copy buttons need the
    script, and without it they are not shown at all."""
    proxy = _proxy(make_proxy, upstream)
    _publish(proxy, tmp_path, "acme-lib", "1.0")
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(proxy.url + "/")
    assert page.locator("pre#pip-conf").is_visible()
    assert page.locator("button[data-copy]").count() == 6
    assert not page.locator("button[data-copy]").first.is_visible()
    page.fill("form.big input[name=q]", "lib")
    page.click("form.big button")
    page.click("ul.results a")
    assert page.url == proxy.url + "/project/acme-lib/"
    assert page.locator(".release h3").all_inner_texts() == ["1.0"]
    assert not page.locator("button.copy").first.is_visible()
    context.close()


def test_a_reader_token_does_not_see_the_guard_page(
    make_proxy: MakeProxy, upstream: FakeUpstream, browser: Any, tmp_path: Path,
) -> None:
    """anonymous_read: false: a browser without credentials is asked for them
    (401 + WWW-Authenticate: its Basic-auth prompt); a reader reads but never
    sees the guard; an admin does."""
    proxy = make_proxy(private_auth_config(upstream.url))
    wheel = build_wheel(tmp_path, "acme-lib", "1.0")
    assert upload(proxy.url, wheel, "acme-lib", "1.0", user=PRIVATE_WRITER,
                  secret=PRIVATE_WRITER_SECRET).status == 200

    from playwright.sync_api import Error as PlaywrightError

    anonymous = browser.new_context()
    for path in ("/", "/project/acme-lib/", "/search?q=acme"):
        answer = anonymous.request.get(proxy.url + path, headers={"Accept": "text/html"})
        assert answer.status == 401
        assert answer.headers["www-authenticate"].startswith("Basic realm=")
        # A headless browser meets the challenge with its auth prompt; with no
        # credentials to give, the navigation fails as such.
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(proxy.url + path)
    anonymous.close()

    reader = browser.new_context(http_credentials={"username": READER, "password": READER_SECRET})
    page = reader.new_page()
    assert page.goto(proxy.url + "/").status == 200
    assert page.locator("table.list a").all_inner_texts() == ["acme-lib"]
    assert page.locator("header nav a").count() == 0
    answer = page.goto(proxy.url + "/guard/")
    assert answer.status == 403
    assert "guard" not in page.content().lower().replace("/guard/", "")
    reader.close()

    admin = browser.new_context(http_credentials={"username": "admin",
                                                  "password": PRIVATE_ADMIN_SECRET})
    page = admin.new_page()
    page.goto(proxy.url + "/")
    page.click("header nav a")
    assert page.url == proxy.url + "/guard/"
    assert page.locator("h1").inner_text() == "Guard"
    assert "acme-lib" in page.locator("ul.inline").inner_text()
    admin.close()


# --- the registry: why a name resolves where it does, without asking upstream -------

def _registry_proxy(make_proxy: MakeProxy, pypi: FakeUpstream, torch: FakeUpstream) -> ProxyServer:
    config = auth_config()
    config.update({
        "upstream": DELETE,
        "indexes": [{"name": "platform", "owns": ["acme-*"]}, {"name": "ml"}],
        "upstreams": [
            {"name": "pytorch", "url": torch.url, "not_found": [403, 404]},
            {"name": "pypi", "url": pypi.url},
        ],
        "groups": [
            {"name": "default", "reserved": ["acme-*", "secret-*"], "members": [
                {"index": "platform"}, {"index": "ml"},
                {"upstream": "pytorch", "names": ["torch", "nvidia-*"]},
                {"upstream": "pypi"}]},
            {"name": "ml", "members": [{"index": "ml"}, {"upstream": "pypi"}]},
        ],
        "gitlab": {"projects": {"42": "platform", "acme/ml": "ml"}, "groups": {"acme": "default"}},
    })
    return make_proxy(config)


@pytest.fixture
def torch_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def _why(proxy: ProxyServer, path: str) -> tuple[int, str]:
    answer = call(proxy.url + path, headers={"Accept": "text/html"})
    found = re.search(r'<p class="why[^"]*"><strong>[^<]*</strong> ([^<]*)</p>',
                      answer.body.decode())
    assert found is not None, answer.body[:500]
    return answer.status, found.group(1)


def test_the_project_page_says_why_a_name_resolves_where_it_does(
    make_proxy: MakeProxy, upstream: FakeUpstream, torch_upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    proxy = _registry_proxy(make_proxy, upstream, torch_upstream)
    torch_upstream.add(build_wheel(tmp_path / "t", "torch", "2.5.0"))
    upstream.add(build_wheel(tmp_path / "p", "torch", "9.9.9"))
    upstream.add(build_wheel(tmp_path / "p", "six", "1.16.0"))
    assert call(proxy.url + "/simple/torch/").status == 200
    assert call(proxy.url + "/simple/six/").status == 200
    assert call(proxy.url + "/files/torch/torch-2.5.0-py3-none-any.whl").status == 200
    wheel = build_wheel(tmp_path / "m", "ml-kit", "1.0")
    content = wheel.read_bytes()
    body, ctype = multipart(upload_fields("ml-kit", "1.0", content), (wheel.name, content))
    assert call(proxy.url + "/i/ml/", "POST", body=body, headers={
        "Content-Type": ctype, "Authorization": basic(WRITER, WRITER_SECRET)}).status == 200
    upstream.clear_requests()
    torch_upstream.clear_requests()

    assert _why(proxy, "/project/torch/") == (200, "from upstream pytorch (routed by torch)")
    assert _why(proxy, "/project/six/") == (200, "from upstream pypi")
    assert _why(proxy, "/project/ml-kit/") == (200, "private in index ml")
    assert _why(proxy, "/g/ml/project/ml-kit/") == (200, "private in index ml")
    assert _why(proxy, "/project/acme-secret/") == (
        404, "reserved by acme-* in group default: never forwarded")
    assert _why(proxy, "/project/never-seen/") == (
        404, "would be asked of upstream pypi; the proxy has not fetched it yet "
             "(an install fetches it)")
    assert _why(proxy, "/project/nvidia-cublas/") == (
        404, "would be asked of upstream pytorch (routed by nvidia-*); the proxy has not "
             "fetched it yet (an install fetches it)")
    # The page of the routed name lists only the answering upstream's files.
    torch_page = call(proxy.url + "/project/torch/").body.decode()
    assert "torch-2.5.0-py3-none-any.whl" in torch_page and "9.9.9" not in torch_page
    # Which files the proxy holds: the one fetched, not the other.
    assert "<th>Cached</th>" in torch_page and "<td>yes</td>" in torch_page
    six_page = call(proxy.url + "/project/six/").body.decode()
    assert "<td>no</td>" in six_page and "<td>yes</td>" not in six_page
    # None of that asked an upstream anything.
    assert upstream.requests == [] and torch_upstream.requests == []
    # The landing lists the GitLab URLs this server answers.
    landing = call(proxy.url + "/", headers={"Accept": "text/html"}).body.decode()
    for path in ("/api/v4/projects/42/packages/pypi/simple/",
                 "/api/v4/projects/acme%2Fml/packages/pypi/simple/",
                 "/api/v4/groups/acme/-/packages/pypi/simple/"):
        assert f"<code>{path}</code>" in landing
    # A group page for an unknown group, a name that is no name: 404 with the reason.
    assert call(proxy.url + "/g/nope/project/six/").status == 404
    assert call(proxy.url + "/project/-x-/").status == 404


def test_blocked_collisions_are_named_on_the_project_and_guard_pages(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """A private or reserved name that also exists upstream (from the upstream's
    project list, never by asking for the name) says so; the guard page lists it."""
    upstream.add(build_wheel(tmp_path / "up", "corp-lib", "6.6.6"))
    upstream.add(build_wheel(tmp_path / "up", "acme-secret", "6.6.6"))
    proxy = _proxy(make_proxy, upstream, guard={"private_only": ["acme-*"]})
    _publish(proxy, tmp_path, "corp-lib", "1.0")
    for name in ("corp-lib", "acme-secret"):
        call(proxy.url + f"/simple/{name}/")  # what a client's install would ask
    assert eventually(lambda: metric(proxy, "indexguard_blocked_collisions_total",
                                     project="corp-lib") == 1)
    # From here on only people look: no guard decision, no collision is counted.
    before = (metric(proxy, "indexguard_guard_decisions_total"),
              metric(proxy, "indexguard_blocked_collisions_total"))

    def page(path: str) -> str:
        return call(proxy.url + path, headers={"Accept": "text/html"}).body.decode()

    collision = "blocked collision: the same name exists upstream"
    assert collision in page("/project/corp-lib/")
    assert _why(proxy, "/project/corp-lib/") == (200, "private in index default")
    assert collision in page("/project/acme-secret/")
    assert _why(proxy, "/project/acme-secret/") == (
        404, "reserved by acme-* in group default: never forwarded")
    assert "corp-lib" in page("/search?q=corp") and "corp-lib" in page("/")
    guard = call(proxy.url + "/guard/", headers=ADMIN_AUTH).body.decode()
    assert "<td><code>acme-secret</code></td><td>reserved</td>" in guard
    assert "<td><code>corp-lib</code></td><td>private</td>" in guard
    assert (metric(proxy, "indexguard_guard_decisions_total"),
            metric(proxy, "indexguard_blocked_collisions_total")) == before
    # Asked of upstream: its project list only, never either name.
    assert [r for r in upstream.requests if "corp-lib" in r[1] or "acme-secret" in r[1]] == []


def test_a_token_sees_only_the_groups_it_may_read(
    make_proxy: MakeProxy, upstream: FakeUpstream, torch_upstream: FakeUpstream,
    tmp_path: Path,
) -> None:
    config = private_auth_config(upstream.url)
    config["auth"]["tokens"].append({
        "name": "ml-only", "sha256": hashlib.sha256(b"ml-only-secret").hexdigest(),
        "scopes": ["read"], "groups": ["ml"]})
    config.update({
        "upstream": DELETE,
        "indexes": [{"name": "platform"}, {"name": "ml"}],
        "upstreams": [{"name": "pypi", "url": upstream.url}],
        "groups": [
            {"name": "default", "members": [{"index": "platform"}, {"index": "ml"},
                                            {"upstream": "pypi"}]},
            {"name": "ml", "members": [{"index": "ml"}, {"upstream": "pypi"}]},
        ],
    })
    proxy = make_proxy(config)
    assert upload(proxy.url, build_wheel(tmp_path / "a", "secret-thing", "1.0"),
                  "secret-thing", "1.0", user=PRIVATE_WRITER,
                  secret=PRIVATE_WRITER_SECRET).status == 200
    ml_only = {"Accept": "text/html", "Authorization": basic("ml-only", "ml-only-secret")}
    landing = call(proxy.url + "/", headers=ml_only)
    assert landing.status == 200 and b"secret-thing" not in landing.body
    assert b"/g/ml/simple/" in landing.body or b'href="g/ml/simple/"' in landing.body
    assert call(proxy.url + "/project/secret-thing/", headers=ml_only).status == 403
    assert call(proxy.url + "/search?q=secret", headers=ml_only).status == 403
    found = call(proxy.url + "/g/ml/search?q=secret", headers=ml_only)
    assert found.status == 200 and b"secret-thing" not in found.body


def _snippets(html_text: str) -> dict[str, str]:
    return {key: html.unescape(text) for key, text in
            re.findall(r'<pre id="([a-z-]+)"><code>(.*?)</code></pre>', html_text, re.S)}


def test_the_snippets_work_as_copied_with_twine_and_pip(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """What the landing and a project page give to copy, with the token filled in,
    publishes with twine and installs with pip and uv (reading needs a token)."""
    proxy = make_proxy(private_auth_config(upstream.url))
    as_reader = {"Accept": "text/html", "Authorization": basic(READER, READER_SECRET)}
    setup = _snippets(call(proxy.url + "/", headers=as_reader).body.decode())
    assert setup["pip-env"].startswith("export PIP_INDEX_URL=http://__token__:<token>@")
    repository = next(line.split(" = ", 1)[1] for line in setup["pypirc"].splitlines()
                      if line.startswith("repository = "))
    wheel = build_wheel(tmp_path / "w", "acme-lib", "1.0")
    published = twine_upload(repository, [wheel], "__token__", PRIVATE_WRITER_SECRET)
    assert published.returncode == 0, published.stderr
    index_url = setup["pip-env"].strip().split("=", 1)[1].replace("<token>", READER_SECRET)
    got = pip_download(index_url, tmp_path / "pip", "acme-lib")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "pip" / wheel.name).read_bytes() == wheel.read_bytes()
    install = _snippets(call(proxy.url + "/project/acme-lib/", headers=as_reader).body.decode())
    argv = install["install-uv"].replace("<token>", READER_SECRET).split()
    assert argv[:4] == ["uv", "pip", "install", "--index-url"] and argv[5] == "acme-lib==1.0"
    venv = uv_venv(tmp_path / "venv")
    assert uv_install(argv[4], venv, argv[5]).returncode == 0
    assert installed_version(tmp_path / "venv", "acme-lib") == "1.0"


def test_static_files_are_open_immutable_and_named_by_their_hash(
    make_proxy: MakeProxy, upstream: FakeUpstream,
) -> None:
    """CSS and script carry nothing private: served without credentials even when
    reading needs them, kept a year, revalidated by ETag; nothing else is served."""
    proxy = make_proxy(private_auth_config(upstream.url))
    page = call(proxy.url + "/", headers={
        "Accept": "text/html", "Authorization": basic(READER, READER_SECRET)}).body.decode()
    links = re.findall(r'(?:href|src)="(-/static/[^"]+)"', page)
    assert sorted(link.split("?")[0] for link in links) == [
        "-/static/favicon.svg", "-/static/ui.css", "-/static/ui.js"]
    for link in links:
        answer = call(f"{proxy.url}/{link}")
        assert answer.status == 200
        assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert link.endswith("?v=" + answer.headers["etag"].strip('"'))
        assert answer.headers["etag"].strip('"') == hashlib.sha256(answer.body).hexdigest()[:16]
        again = call(f"{proxy.url}/{link}", headers={"If-None-Match": answer.headers["etag"]})
        assert again.status == 304 and again.body == b""
    for missing in ("/-/static/nope.css", "/-/static/..%2Fweb_ui.py", "/-/static/"):
        assert call(proxy.url + missing).status == 404


# --- pure parts, in process -----------------------------------------------------------

@pytest.mark.parametrize(("accept", "is_html"), [
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("text/html", True),
    ("application/xhtml+xml", True),
    ("text/html;q=0", False),
    ("*/*", False),
    (None, False),
    ("", False),
    ("application/vnd.pypi.simple.v1+json", False),
    ("text/html;q=bogus", False),
])
def test_only_browsers_get_the_html_landing(accept: str | None, is_html: bool) -> None:
    assert ui_model.wants_html(accept) is is_html


def test_search_is_normalized_like_names_prefix_first() -> None:
    names = ["acme-lib", "lib-acme", "libfoo", "other", "acme-libx"]
    assert ui_model.search("LIB", names) == ["lib-acme", "libfoo", "acme-lib", "acme-libx"]
    assert ui_model.search("Acme_Lib", names) == ["acme-lib", "acme-libx"]
    assert ui_model.search("-lib", names) == ["acme-lib", "acme-libx"]
    assert ui_model.search("   ", names) == []
    assert ui_model.search("x" * 1000, names) == []


def test_descriptions_render_as_pypi_does_and_are_kept_bounded() -> None:
    md = description.render("# T\n\n<script>x()</script>", "text/markdown")
    assert md.html.startswith("<h1") and "<script" not in md.html
    rst = description.render("Title\n=====\n\ntext", None)
    assert "<h1>Title" in rst.html and rst.content_type == "text/x-rst"
    raw = description.render(".. raw:: html\n\n   <script>x()</script>\n", "text/x-rst")
    assert raw.content_type == "text/plain" and "<script" not in raw.html and raw.note
    assert description.render("<b>x</b>", "text/plain").html == "&lt;b&gt;x&lt;/b&gt;"
    assert description.render("<b>x</b>", "application/weird").content_type == "text/plain"
    meta = b"Metadata-Version: 2.1\nName: a\nDescription-Content-Type: text/markdown\n\n# Hi\n"
    assert description.from_metadata(meta) == ("# Hi\n", "text/markdown")
    assert description.from_metadata(b"Metadata-Version: 2.1\nName: a\n\n") is None
    kept = description.Renderings(max_entries=2, max_chars=100)
    for key in "abc":
        kept.put(key, description.Description("x" * 40, "text/plain"))
    assert len(kept) == 2 and kept.get("a") == (False, None)
    kept.put("big", description.Description("x" * 101, "text/plain"))
    assert kept.get("big") == (False, None)
