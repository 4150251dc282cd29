"""The wire format: negotiation, rendering and parsing, as pure functions."""

from __future__ import annotations

import html

import orjson
import pytest
from packaging.utils import NormalizedName

from proxy.errors import BadRequest, NotAcceptable
from proxy.model import FileEntry, ProjectPage
from proxy.simple_api import (
    HTML_V1,
    JSON_V1,
    TEXT_HTML,
    negotiate,
    parse_page,
    render_project_html,
    render_project_json,
    render_root_html,
    render_root_json,
)

PIP_ACCEPT = f"{JSON_V1}, {HTML_V1}; q=0.1, {TEXT_HTML}; q=0.01"


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, TEXT_HTML),
        ("", TEXT_HTML),
        ("*/*", TEXT_HTML),
        ("text/html", TEXT_HTML),
        (PIP_ACCEPT, JSON_V1),
        (f"{TEXT_HTML}, {JSON_V1};q=0.9", TEXT_HTML),
        (f"{TEXT_HTML};q=0.5, {JSON_V1}", JSON_V1),
        ("application/vnd.pypi.simple.latest+json", JSON_V1),
        ("application/vnd.pypi.simple.latest+html", HTML_V1),
        (f"{HTML_V1}", HTML_V1),
        ("application/*", HTML_V1),  # server order among equals: html before json
        (f"*/*;q=0.1, {JSON_V1}", JSON_V1),
        (f"{JSON_V1};q=0, */*", TEXT_HTML),  # q=0 means "not this one"
    ],
)
def test_negotiate_follows_pep_691(accept: str | None, expected: str) -> None:
    assert negotiate(accept)[1] == expected


def test_negotiate_406_when_nothing_fits() -> None:
    with pytest.raises(NotAcceptable):
        negotiate("application/json")
    with pytest.raises(NotAcceptable):
        negotiate(f"{JSON_V1};q=0")


def test_negotiate_bad_q_is_a_client_error() -> None:
    with pytest.raises(BadRequest):
        negotiate(f"{JSON_V1};q=abc")
    with pytest.raises(BadRequest):
        negotiate(f"{JSON_V1};q=2")


def test_format_query_overrides_accept() -> None:
    assert negotiate(TEXT_HTML, JSON_V1) == ("json", JSON_V1)
    with pytest.raises(NotAcceptable):
        negotiate(None, "application/xml")


def _page() -> ProjectPage:
    return ProjectPage(
        name=NormalizedName("foo-bar"),
        files=(
            FileEntry(
                filename="foo_bar-1.0-py3-none-any.whl",
                hashes={"sha256": "a" * 64},
                requires_python=">=3.8,<4",
                metadata_hashes={"sha256": "b" * 64},
                size=1234,
                upload_time="2024-01-02T03:04:05.000000Z",
                origin="https://files.example/foo_bar-1.0-py3-none-any.whl",
            ),
            FileEntry(
                filename="foo_bar-0.9.tar.gz",
                hashes={"sha256": "c" * 64},
                yanked="broken <build>",
            ),
        ),
    )


def test_html_carries_every_pep_attribute() -> None:
    body = render_project_html(_page()).decode()
    assert 'href="../../files/foo-bar/foo_bar-1.0-py3-none-any.whl#sha256=' + "a" * 64 in body
    assert 'data-requires-python="&gt;=3.8,&lt;4"' in body
    assert f'data-dist-info-metadata="sha256={"b" * 64}"' in body
    assert f'data-core-metadata="sha256={"b" * 64}"' in body
    assert f'data-yanked="{html.escape("broken <build>")}"' in body
    assert '<meta name="pypi:repository-version" content="1.1">' in body


def test_json_is_pep_691_v1_1_with_pep_700_fields() -> None:
    data = orjson.loads(render_project_json(_page()))
    assert data["meta"] == {"api-version": "1.1"}
    assert data["name"] == "foo-bar"
    assert data["versions"] == ["1.0", "0.9"]
    whl, sdist = data["files"]
    assert whl["url"] == "../../files/foo-bar/foo_bar-1.0-py3-none-any.whl"
    assert whl["core-metadata"] == whl["dist-info-metadata"] == {"sha256": "b" * 64}
    assert whl["size"] == 1234 and whl["upload-time"].endswith("Z")
    assert whl["yanked"] is False and whl["requires-python"] == ">=3.8,<4"
    assert sdist["yanked"] == "broken <build>" and sdist["core-metadata"] is False


def test_html_and_json_round_trip_to_the_same_page() -> None:
    page = _page()
    base = "http://proxy.test/simple/foo-bar/"
    from_html = parse_page(render_project_html(page), "text/html", base, page.name)
    from_json = parse_page(render_project_json(page), JSON_V1, base, page.name)
    for parsed in (from_html, from_json):
        assert [f.filename for f in parsed.files] == [f.filename for f in page.files]
        assert [f.sha256 for f in parsed.files] == [f.sha256 for f in page.files]
        assert [f.requires_python for f in parsed.files] == [f.requires_python for f in page.files]
        assert [f.yanked for f in parsed.files] == [f.yanked for f in page.files]
        assert parsed.files[0].metadata_hashes == {"sha256": "b" * 64}
        assert parsed.files[0].origin == (
            "http://proxy.test/files/foo-bar/foo_bar-1.0-py3-none-any.whl"
        )


def test_parse_rejects_garbage() -> None:
    from proxy.simple_api import PageParseError

    name = NormalizedName("x")
    with pytest.raises(PageParseError):
        parse_page(b"{not json", JSON_V1, "http://u/", name)
    with pytest.raises(PageParseError):
        parse_page(b'{"files": 3}', JSON_V1, "http://u/", name)
    with pytest.raises(PageParseError):
        parse_page(b"\xff\xfe", "text/html", "http://u/", name)
    with pytest.raises(PageParseError):
        parse_page(b"hello", "application/octet-stream", "http://u/", name)


def test_root_lists_projects_relatively() -> None:
    names = [NormalizedName("a"), NormalizedName("b-c")]
    assert '<a href="b-c/">b-c</a>' in render_root_html(names).decode()
    assert orjson.loads(render_root_json(names))["projects"] == [{"name": "a"}, {"name": "b-c"}]


def test_unsafe_upstream_filenames_are_dropped() -> None:
    body = orjson.dumps({"meta": {"api-version": "1.1"}, "name": "x", "files": [
        {"filename": "../../etc/passwd", "url": "a", "hashes": {}},
        {"filename": "x-1.0.tar.gz", "url": "x-1.0.tar.gz", "hashes": {"sha256": "a" * 64}},
    ]})
    page = parse_page(body, JSON_V1, "http://u/simple/x/", NormalizedName("x"))
    assert [f.filename for f in page.files] == ["x-1.0.tar.gz"]
    html_body = b'<a href="../%2e%2e%2fevil.tar.gz">evil</a><a href="x-1.0.tar.gz">x</a>'
    page = parse_page(html_body, "text/html", "http://u/simple/x/", NormalizedName("x"))
    assert [f.filename for f in page.files] == ["x-1.0.tar.gz"]
