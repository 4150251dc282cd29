"""Issue 6.3: SIGKILL at random points during uploads and cache fills, many times.

After every restart: each file the store lists is complete and matches its
recorded sha256, no temp file is left, every upload that was answered 200
before the kill is there, and every cached artifact hashes to its name.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MakeProxy
from tests.faults.helpers import (
    JSON_V1,
    audit_cache,
    audit_store,
    auth_config,
    call,
    sha256_hex,
    temp_files,
    upload,
)
from tests.support.artifacts import build_wheel, sha256_file
from tests.support.upstream import FakeUpstream

# A hang fails this module's test, not the whole run.
pytestmark = pytest.mark.timeout(240)

KILLS = 24
UPLOADS_PER_ROUND = 3
FILLS_PER_ROUND = 2


def test_sigkill_during_uploads_and_cache_fills(
    make_proxy: MakeProxy, upstream: FakeUpstream, artifacts_dir: Path,
    figures: dict[str, Any],
) -> None:

    seed = int(os.environ.get("FAULTS_SEED", secrets.randbits(32)))
    rng = random.Random(seed)
    # Cache fills take a few hundred ms (a stall mid-body), so kills land inside them.
    upstream.fault("slow", path_prefix="/files/", seconds=0.3, phase="body")
    fills: list[tuple[str, Path]] = []
    for i in range(KILLS * FILLS_PER_ROUND):
        wheel = build_wheel(artifacts_dir / "up", f"fill-{i}", "1.0",
                            extra_bytes=rng.randrange(100_000, 2_000_000))
        upstream.add(wheel, with_metadata=False)
        fills.append((f"fill-{i}", wheel))
    config: dict[str, Any] = auth_config()
    config["upstream"] = {"url": upstream.url, "timeout": 5}
    proxy = make_proxy(config)

    acked: dict[str, str] = {}  # "project/filename" -> sha256, answered 200
    lock = threading.Lock()
    orphans: set[str] = set()
    for round_ in range(KILLS):
        wheels = [
            build_wheel(artifacts_dir / f"r{round_}", f"crash-{i}", f"{round_}.0",
                        extra_bytes=rng.randrange(50_000, 3_000_000))
            for i in range(UPLOADS_PER_ROUND)
        ]
        # Pages first (cheap), so the fills below are file transfers.
        batch = fills[round_ * FILLS_PER_ROUND:(round_ + 1) * FILLS_PER_ROUND]
        for name, _wheel in batch:
            assert call(f"{proxy.url}/simple/{name}/").status == 200

        def send(wheel: Path, project: str, version: str) -> None:
            try:
                answer = upload(proxy.url, wheel, project, version, timeout=10)
            except OSError:
                return  # killed before it was answered: may or may not be stored
            if answer.status == 200:
                with lock:
                    acked[f"{project}/{wheel.name}"] = sha256_file(wheel)

        def fetch(name: str, wheel: Path) -> None:
            # Killed mid-transfer (OSError) is the point.
            with contextlib.suppress(OSError):
                call(f"{proxy.url}/files/{name}/{wheel.name}", timeout=10)

        threads = [
            threading.Thread(target=send, args=(w, f"crash-{i}", f"{round_}.0"))
            for i, w in enumerate(wheels)
        ] + [threading.Thread(target=fetch, args=item) for item in batch]
        for t in threads:
            t.start()
        threading.Event().wait(rng.uniform(0.0, 0.8))
        proxy.kill()
        for t in threads:
            t.join(timeout=30)
        proxy.start()

        where = f"round {round_} (FAULTS_SEED={seed})"
        assert not temp_files(proxy.data_dir), where
        audit = audit_store(proxy.data_dir)
        assert not audit.problems, (where, audit.problems)
        missing = {k: v for k, v in acked.items() if audit.listed.get(k) != v}
        assert not missing, (where, missing)
        # Not visible to clients and replaced by the next upload of that name;
        # counted for the report rather than failed on.
        orphans.update(audit.unlisted)
        _cached, problems = audit_cache(proxy.data_dir)
        assert not problems, (where, problems)

    # What the store says over HTTP agrees, byte for byte, with what was acked.
    for key, sha in sorted(acked.items()):
        project, filename = key.split("/")
        page = call(f"{proxy.url}/simple/{project}/", headers={"Accept": JSON_V1})
        listed = {f["filename"]: f["hashes"]["sha256"] for f in orjson.loads(page.body)["files"]}
        assert listed.get(filename) == sha, key
        got = call(f"{proxy.url}/files/{project}/{filename}")
        assert got.status == 200 and got.complete and sha256_hex(got.body) == sha, key
    assert acked, "no upload finished before its kill in any round"
    cached, _ = audit_cache(proxy.data_dir)
    figures["crash: SIGKILLs survived"] = KILLS
    figures["crash: uploads acked before a kill, all intact"] = len(acked)
    figures["crash: verified cache entries after the last restart"] = cached
    figures["crash: unlisted leftovers (committed file, no index entry)"] = len(orphans)
    figures["crash: seed"] = seed
