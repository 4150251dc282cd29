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
        {"filename": "../../abs/path/canary", "url": "a", "hashes": {}},
        {"filename": "x-1.0.tar.gz", "url": "x-1.0.tar.gz", "hashes": {"sha256": "a" * 64}},
    ]})
    page = parse_page(body, JSON_V1, "http://u/simple/x/", NormalizedName("x"))
    assert [f.filename for f in page.files] == ["x-1.0.tar.gz"]
    html_body = b'<a href="../%2e%2e%2fevil.tar.gz">evil</a><a href="x-1.0.tar.gz">x</a>'
    page = parse_page(html_body, "text/html", "http://u/simple/x/", NormalizedName("x"))
    assert [f.filename for f in page.files] == ["x-1.0.tar.gz"]


# --- hostile upstream values (issue 10, items 1, 3, 4) --------------------------------

SHA = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SHA, SHA),
        (SHA.upper(), SHA),  # hex is case-insensitive: a correct file must match
        (SHA[:-1], None),
        (SHA + "0", None),
        ("g" * 64, None),
        ("/" + SHA[1:], None),
        ("../../config.yaml", None),
        (SHA[:-1] + "\n", None),
        ("\u0660" * 64, None),  # Arabic-Indic zeros: digits to Python, not hex
        ("\uff10" * 64, None),  # fullwidth zeros
        (12345, None),
        (None, None),
        ([SHA], None),
        ({SHA: SHA}, None),
        (True, None),
    ],
)
def test_sha256_hex_accepts_only_64_hex_digits(value: object, expected: str | None) -> None:
    from proxy.model import sha256_hex

    assert sha256_hex(value) == expected


def test_clean_hashes_keeps_each_algorithm_at_its_own_length() -> None:
    from proxy.model import clean_hashes

    assert clean_hashes({
        "sha256": SHA.upper(), "md5": "A" * 32, "sha512": "b" * 128, "sha384": "c" * 64,
        "blake2b_256": SHA, "../x": SHA, "sha1": 7,
    }) == {"sha256": SHA, "md5": "a" * 32, "sha512": "b" * 128}
    for odd in (["a"], "abc", 5, None, True):
        assert clean_hashes(odd) == {}


def _json_entry(**fields: object) -> dict[str, object]:
    entry: dict[str, object] = {"filename": "x-1.0.tar.gz", "url": "x-1.0.tar.gz",
                                "hashes": {"sha256": SHA}}
    entry.update(fields)
    return entry


def _parse_json_files(*entries: object, **page: object) -> ProjectPage:
    body = orjson.dumps({"meta": {"api-version": "1.1"}, "name": "x", "files": list(entries),
                         **page})
    return parse_page(body, JSON_V1, "http://u/simple/x/", NormalizedName("x"))


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        ({"hashes": {"sha256": "/abs/path/canary"}}, "hashes", {}),
        ({"hashes": {"sha256": SHA.upper()}}, "hashes", {"sha256": SHA}),
        ({"hashes": ["a"]}, "hashes", {}),
        ({"hashes": None}, "hashes", {}),
        ({"requires-python": 3.8}, "requires_python", None),
        ({"requires-python": [">=3"]}, "requires_python", None),
        ({"upload-time": 1700000000}, "upload_time", None),
        ({"upload-time": "yesterday"}, "upload_time", None),
        ({"upload-time": "2024-13-01T00:00:00Z"}, "upload_time", None),
        ({"upload-time": "2024-01-02T03:04:05.000000Z"}, "upload_time",
         "2024-01-02T03:04:05.000000Z"),
        ({"size": "12"}, "size", None),
        ({"size": -1}, "size", None),
        ({"size": True}, "size", None),
        ({"size": 1.5}, "size", None),
        ({"size": 0}, "size", 0),
        ({"yanked": {"a": 1}}, "yanked", False),
        ({"yanked": 1}, "yanked", False),
        ({"yanked": ""}, "yanked", False),
        ({"yanked": True}, "yanked", True),
        ({"yanked": "bad build"}, "yanked", "bad build"),
        ({"core-metadata": {"sha256": "zz"}}, "metadata_hashes", {}),
        ({"core-metadata": {"sha256": SHA.upper()}}, "metadata_hashes", {"sha256": SHA}),
        ({"core-metadata": 5}, "metadata_hashes", None),
        ({"core-metadata": True}, "metadata_hashes", {}),
        ({"dist-info-metadata": {"sha256": SHA}}, "metadata_hashes", {"sha256": SHA}),
    ],
)
def test_json_fields_of_the_wrong_type_or_form_are_dropped(
    fields: dict[str, object], attr: str, expected: object,
) -> None:
    (entry,) = _parse_json_files(_json_entry(**fields)).files
    assert getattr(entry, attr) == expected


def test_json_entries_of_the_wrong_shape_are_skipped() -> None:
    page = _parse_json_files(
        42, "x", None, [], {"url": "a"}, _json_entry(filename=123), _json_entry(url=5),
        _json_entry(url="http://[::1/x"), _json_entry(filename="ok-1.0.tar.gz"),
        versions=[1, None, "1.0", {"a": 1}],
    )
    assert [f.filename for f in page.files] == ["ok-1.0.tar.gz"]
    assert page.versions == ("1.0",)
    assert _parse_json_files(versions="1.0").versions == ()


def test_html_digests_are_hex_or_dropped() -> None:
    anchors = [
        f'<a href="a-1.0.tar.gz#sha256={SHA.upper()}" data-core-metadata="sha256={SHA}">a</a>',
        '<a href="b-1.0.tar.gz#sha256=/abs/path/canary" data-core-metadata="sha256=../x">b</a>',
        f'<a href="c-1.0.tar.gz#md5={"a" * 32}&amp;sha256={SHA}">c</a>',
        '<a href="http://[bad/d-1.0.tar.gz">d</a>',
        '<a href="e-1.0.tar.gz" data-requires-python data-core-metadata="true">e</a>',
    ]
    body = ("<html><body>" + "".join(anchors) + "</body></html>").encode()
    page = parse_page(body, "text/html", "http://u/simple/x/", NormalizedName("x"))
    got = {f.filename: (dict(f.hashes), f.metadata_hashes, f.requires_python)
           for f in page.files}
    assert got == {
        "a-1.0.tar.gz": ({"sha256": SHA}, {"sha256": SHA}, None),
        "b-1.0.tar.gz": ({}, {}, None),
        "c-1.0.tar.gz": ({"md5": "a" * 32, "sha256": SHA}, None, None),
        "e-1.0.tar.gz": ({}, {}, None),
    }


def test_stored_pages_are_checked_again_when_read() -> None:
    """A page on disk from an older version holds whatever its upstream sent."""
    page = ProjectPage.from_json({
        "name": "x",
        "files": [
            {"filename": "x-1.0.tar.gz", "hashes": {"sha256": "/abs/path/canary", "md5": 5},
             "requires_python": 3.8, "yanked": [], "metadata_hashes": {"sha256": "../c"},
             "size": "big", "upload_time": 1700000000, "origin": 7},
            {"filename": "x-2.0.tar.gz", "hashes": {"sha256": SHA.upper()},
             "metadata_hashes": "sha256=zz", "upload_time": "2024-01-02T03:04:05Z"},
            "junk", 42, None, {"filename": 5},
        ],
        "versions": ["1.0", 2, None],
    })
    first, second = page.files
    assert first == FileEntry(filename="x-1.0.tar.gz", hashes={}, metadata_hashes={})
    assert second.sha256 == SHA and second.metadata_hashes is None
    assert second.upload_time == "2024-01-02T03:04:05Z"
    assert page.versions == ("1.0",)
    with pytest.raises(TypeError):
        ProjectPage.from_json({"name": "x", "files": "abc"})


def test_upstream_markup_is_escaped_in_html() -> None:
    """Even a model built without the checks (the constructor trusts its caller)."""
    script = '"><script>alert(1)</script>'
    page = ProjectPage(
        name=NormalizedName("x"),
        files=(FileEntry(filename='x-1.0"a.tar.gz', hashes={"sha256": script},
                         requires_python=script, yanked=script,
                         metadata_hashes={"sha256": script}),),
    )
    body = render_project_html(page).decode()
    assert "<script" not in body and '"a' not in body
    # The fragment, requires-python, yanked and both PEP 714 metadata attributes.
    assert body.count(html.escape(script)) == 5
