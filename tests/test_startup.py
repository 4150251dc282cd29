"""Start-up reads no project (issue 12, item 7): what a crash left in a project is
swept under its lock on the first write to it, and a broken project cannot keep
the server from starting. bench/startup.py measures the time to first answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import MakeProxy
from tests.faults.helpers import auth_config, call, upload
from tests.support.artifacts import build_wheel

REPO = Path(__file__).resolve().parents[1]


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


def test_a_local_server_never_loads_the_s3_client(tmp_path: Path) -> None:
    """botocore costs every worker about 25 MiB and 150 ms at start; the embedded
    local default must not pay for a backend it does not use."""
    script = f"""
import asyncio, sys
from aiohttp import web
from proxy.cli import main  # noqa: F401  (the command line's imports)
from proxy.app import create_app
from proxy.config import build_config

async def build():
    config = build_config({{"data_dir": {str(tmp_path / "data")!r},
                           "upstream": {{"url": "http://127.0.0.1:9/simple/"}}}})
    runner = web.AppRunner(await create_app(config))
    await runner.setup()  # startup: the stores, caches and background tasks open
    await runner.cleanup()

asyncio.run(build())
print(sorted(m for m in sys.modules if "botocore" in m))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
