"""Issue 10.18: a reason phrase quotes what the client sent, never as a Python repr.

twine prints only the reason phrase, so `Invalid version '1.x\\x00'` (a repr, with
its escapes and switching quote styles) is what a person would read.
"""

from __future__ import annotations

import http.client
import re
from pathlib import Path

from proxy.auth import hash_secret
from tests.conftest import MakeProxy
from tests.faults.helpers import basic
from tests.support.artifacts import build_wheel
from tests.support.forms import multipart, upload_fields

SECRET = "ig_reasons-writer-secret"
# What a repr leaves behind: a quoted string in single quotes, or an escape.
REPR = re.compile(r"'[^']*'|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}")


def _reason(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.reason
    finally:
        conn.close()


def test_reasons_quote_client_text_without_a_repr(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = make_proxy({"auth": {"tokens": [
        {"name": "ci", "sha256": hash_secret(SECRET), "scopes": ["read", "write"]}]}})
    wheel = build_wheel(tmp_path, "reason-pkg", "1.0")
    content = wheel.read_bytes()
    auth = basic("ci", SECRET)
    cases = {
        "version": [("version", "1.x'\x01é")],
        "name": [("name", "bad name'\x01")],
        ":action": [(":action", "remove'\x7f")],
        "metadata_version": [("metadata_version", "9'9")],
    }
    for field, changed in cases.items():
        fields = [(k, v) for k, v in upload_fields("reason-pkg", "1.0", content)
                  if k not in dict(changed)] + changed
        body, ctype = multipart(fields, (wheel.name, content))
        status, reason = _reason(proxy.url, "POST", "/", body,
                                 {"Content-Type": ctype, "Authorization": auth})
        assert status == 400, (field, status, reason)
        assert '"' in reason and not REPR.search(reason), (field, reason)
    body, ctype = multipart(upload_fields("reason-pkg", "1.0", content),
                            ("reason_pkg-1.0-py3-none-any.egg'", content))
    status, reason = _reason(proxy.url, "POST", "/", body,
                             {"Content-Type": ctype, "Authorization": auth})
    assert status == 400 and not REPR.search(reason), reason
    status, reason = _reason(proxy.url, "GET", "/simple/reason-pkg/",
                             headers={"Accept": "text/html;q=x'1"})
    assert status == 400 and not REPR.search(reason), reason
    status, reason = _reason(proxy.url, "GET", "/simple/reason-pkg/?format=x'y")
    assert status == 406 and not REPR.search(reason), reason


def test_unknown_groups_and_indexes_are_404_with_the_name_quoted(make_proxy: MakeProxy) -> None:
    proxy = make_proxy()
    for path, what in (("/g/nope/simple/", b'No group named "nope"'),
                       ("/i/nope/simple/x/", b'No index named "nope"'),
                       ("/g/%00%ff'/simple/", b"No group named"),
                       ("/g/" + "a" * 3000 + "/simple/", b"No group named"),
                       ("/api/v4/projects/99/packages/pypi/simple/", b"No GitLab project")):
        status, reason = _reason(proxy.url, "GET", path)
        assert status == 404, (path, status, reason)
        assert what.decode() in reason and not REPR.search(reason), reason
    # The default group answers under its own name too.
    assert _reason(proxy.url, "GET", "/g/default/simple/")[0] == 200
