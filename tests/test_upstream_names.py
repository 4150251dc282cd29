"""upstream_names: the project-list scanner and the saved copy (pure parts, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.upstream_names import (
    NameList,
    NameScanner,
    NamesUnavailable,
    load_list,
    name_key,
    save_list,
    url_key,
)


def test_name_scanner_reads_pep_691_and_pep_503_across_chunk_boundaries() -> None:
    names = ["Foo_Bar", "baz.qux", "A", "x" * 300, "-bad-", "zope.interface"]
    json_body = json.dumps({"meta": {"api-version": "1.0"}, "projects": [
        {"name": n, "_last-serial": i} for i, n in enumerate(names)]}).encode()
    html_body = ("<html><body>" + "".join(
        f'<a href="/simple/{n}/">{n.replace("_", "&#95;")}</a>\n' for n in names)
        + "</body></html>").encode()
    expected = sorted({name_key(n) for n in ("foo-bar", "baz-qux", "a", "zope-interface")})
    for fmt, body in (("json", json_body), ("html", html_body)):
        for size in (1, 7, 64, len(body)):
            scanner = NameScanner(fmt)  # type: ignore[arg-type]
            for i in range(0, len(body), size):
                scanner.feed(body[i:i + size])
            assert list(scanner.finish()) == expected, (fmt, size)
    not_a_list = NameScanner("json")
    not_a_list.feed(b'{"message": "name": "x"}')
    with pytest.raises(NamesUnavailable, match="not a PEP 691 project list"):
        not_a_list.finish()


def test_saved_list_round_trips_and_damage_reads_as_none(tmp_path: Path) -> None:
    scanner = NameScanner("html")
    scanner.feed(b'<a href="a/">alpha</a><a href="b/">Beta_Two</a><a href="a/">ALPHA</a>')
    keys = scanner.finish()
    names = NameList(keys, url_key("https://up.example/simple/"), '"e1"', 0.0, "html")
    path = tmp_path / "names"
    mtime = save_list(path, tmp_path, names)
    loaded = load_list(path, url_key("https://up.example/simple/"))
    assert loaded is not None and loaded.fetched_at == mtime and loaded.etag == '"e1"'
    assert loaded.has("beta-two") and loaded.has("alpha") and not loaded.has("gamma")
    assert list(loaded.keys) == sorted({name_key("alpha"), name_key("beta-two")})
    assert load_list(path, url_key("https://other.example/simple/")) is None
    path.write_bytes(path.read_bytes()[:-3])  # cut short
    assert load_list(path, url_key("https://up.example/simple/")) is None
