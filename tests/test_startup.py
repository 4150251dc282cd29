"""Start-up reads no project (issue 12, item 7): what a crash left in a project is
swept under its lock on the first write to it, and a broken project cannot keep
the server from starting. bench/startup.py measures the time to first answer."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import MakeProxy
from tests.faults.helpers import auth_config, call, upload
from tests.support.artifacts import build_wheel


def test_start_up_reads_no_project_and_a_crash_leftover_goes_on_first_write(
    make_proxy: MakeProxy, artifacts_dir: Path,
) -> None:
    proxy = make_proxy(auth_config())
    wheel = build_wheel(artifacts_dir, "acme-kept", "1.0")
    assert upload(proxy.url, wheel, "acme-kept", "1.0").status == 200
    proxy.stop()
    private = proxy.data_dir / "private"
    # A project whose record does not parse: it must not stop the others.
    broken = private / "acme-broken"
    (broken / "files").mkdir(parents=True)
    (broken / "index.json").write_bytes(b"\x00 not json")
    # A file committed by an upload that died before its index commit.
    orphan = private / "acme-kept" / "files" / "acme_kept-9.0-py3-none-any.whl"
    orphan.write_bytes(b"half an upload")

    proxy.start()
    assert call(f"{proxy.url}/files/acme-kept/{wheel.name}").body == wheel.read_bytes()
    assert orphan.exists()  # nothing read at start
    newer = build_wheel(artifacts_dir, "acme-kept", "2.0")
    assert upload(proxy.url, newer, "acme-kept", "2.0").status == 200
    assert not orphan.exists()  # swept under the project's lock, before the commit
    page = call(proxy.index_url + "acme-kept/")
    assert page.status == 200 and b"acme_kept-9.0" not in page.body
