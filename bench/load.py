#!/usr/bin/env python3
"""Load test: many concurrent clients mixing page reads, cached downloads, cold
misses and uploads against a real proxy, plus a burst of clients on one cold file.

Self-contained and loopback only: it starts the test suite's fake upstream index
(tests/support) in this process and the real proxy (`python -m proxy serve`) as a
subprocess in a temporary directory, warms a set of projects, then runs the load.

The issue's full run (200 clients for 30 s, a 100-client cold burst):

    .venv/bin/python bench/load.py --clients 200 --seconds 30 --cold-burst 100

tests/faults/test_load.py drives it at a smaller scale. It checks, and exits 1
unless all hold: no 5xx answer; no file corrupted (every download and every
upload is verified by sha256, and the cache and store are audited on disk at the
end); the burst's file reached upstream exactly once. It reports the proxy's
peak RSS, sampled every 100 ms (with --json, everything goes to a file as well).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.artifacts import build_wheel, sha256_file  # noqa: E402
from tests.support.forms import multipart, upload_fields  # noqa: E402
from tests.support.server import ProxyServer  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

WRITER, SECRET = "load", "ig_load-test-secret-3c1f0e"
JSON_V1 = "application/vnd.pypi.simple.v1+json"
MIX = {"page": 45, "cached": 35, "cold": 12, "upload": 8}


@dataclass
class Project:
    name: str
    wheel: Path
    sha256: str


@dataclass
class Results:
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    server_errors: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # no answer, cut transfers
    acked: dict[str, str] = field(default_factory=dict)  # "project/filename" -> sha256

    def record(self, kind: str, status: int, elapsed: float, what: str) -> None:
        self.statuses[kind][status] += 1
        self.latencies[kind].append(elapsed)
        if status >= 500:
            self.server_errors.append(f"{kind} {what}: {status}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=200, help="concurrent clients (200)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the mixed load (30)")
    p.add_argument("--cold-burst", type=int, default=100,
                   help="clients asking for one cold file at once, mid-run (100)")
    p.add_argument("--projects", type=int, default=40, help="warm upstream projects (40)")
    p.add_argument("--cold-projects", type=int, default=600,
                   help="never-requested upstream projects for cold misses (600); once "
                        "used up, cold misses ask for unknown names")
    p.add_argument("--workers", type=int, default=1, help="proxy worker processes (1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (random)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it (logs, data)")
    return p


def _multipart(project: str, version: str, wheel: Path) -> tuple[bytes, str]:
    content = wheel.read_bytes()
    return multipart(upload_fields(project, version, content), (wheel.name, content))


class Load:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.rng = random.Random(args.seed)
        self.results = Results()
        self.upstream = FakeUpstream()
        self.proxy: ProxyServer | None = None
        self.warm: list[Project] = []
        self.cold: list[Project] = []
        self.burst: Project | None = None
        self.peak_rss = 0
        self.baseline_rss = 0
        self._uploads = 0

    # --------------------------------------------------------------- setup
    def setup(self) -> ProxyServer:
        rng = self.rng
        up = self.base / "upstream"
        for i in range(self.args.projects):
            wheel = build_wheel(up, f"warm-{i}", "1.0", extra_bytes=rng.randrange(10_000, 400_000))
            self.warm.append(Project(f"warm-{i}", wheel, sha256_file(wheel)))
        for i in range(self.args.cold_projects):
            wheel = build_wheel(up, f"cold-{i}", "1.0", extra_bytes=rng.randrange(1_000, 60_000))
            self.cold.append(Project(f"cold-{i}", wheel, sha256_file(wheel)))
        wheel = build_wheel(up, "burst-target", "1.0", extra_bytes=4 * 2**20)
        self.burst = Project("burst-target", wheel, sha256_file(wheel))
        for project in [*self.warm, *self.cold, self.burst]:
            self.upstream.add(project.wheel)
        self.upstream.start()
        # The burst's file takes a second to come: all its clients overlap it.
        self.upstream.fault("slow", path_prefix=f"/files/{wheel.name}", seconds=1.0,
                            phase="body")
        self.proxy = ProxyServer(self.base / "proxy", {
            "workers": self.args.workers,
            "log": {"level": "info"},
            "upstream": {"url": self.upstream.url, "timeout": 20},
            "limits": {"max_upload": "16MiB"},
            "auth": {"tokens": [{
                "name": WRITER, "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                "scopes": ["read", "write"],
            }]},
        })
        self.proxy.start()
        return self.proxy

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.upstream.stop()

    # --------------------------------------------------------------- one request each
    async def _get(self, session: aiohttp.ClientSession, kind: str, path: str,
                   want_sha: str | None = None, want: int = 200,
                   headers: dict[str, str] | None = None) -> int:
        assert self.proxy is not None
        started = time.monotonic()
        try:
            async with session.get(self.proxy.url + path, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.results.failures.append(f"{kind} {path}: {type(exc).__name__}")
            return 0
        what = path if status < 500 else f"{path} ({body[:200].decode(errors='replace')!r})"
        self.results.record(kind, status, time.monotonic() - started, what)
        if status != want and status < 500:
            self.results.failures.append(f"{kind} {path}: {status}")
        if status == 200 and want_sha is not None and hashlib.sha256(body).hexdigest() != want_sha:
            self.results.corrupted.append(f"{kind} {path}")
        return status

    async def page(self, session: aiohttp.ClientSession) -> None:
        project = self.rng.choice(self.warm)
        accept = self.rng.choice([JSON_V1, "text/html"])
        await self._get(session, "page", f"/simple/{project.name}/", headers={"Accept": accept})

    async def cached(self, session: aiohttp.ClientSession) -> None:
        project = self.rng.choice(self.warm)
        await self._get(session, "cached", f"/files/{project.name}/{project.wheel.name}",
                        want_sha=project.sha256)

    async def cold_miss(self, session: aiohttp.ClientSession) -> None:
        if not self.cold:
            await self._get(session, "cold", f"/simple/unknown-{uuid.uuid4().hex[:12]}/",
                            want=404)
            return
        project = self.cold.pop()
        if await self._get(session, "cold", f"/simple/{project.name}/") == 200:
            await self._get(session, "cold", f"/files/{project.name}/{project.wheel.name}",
                            want_sha=project.sha256)

    async def upload(self, session: aiohttp.ClientSession) -> None:
        assert self.proxy is not None
        self._uploads += 1
        project, version = f"load-private-{self._uploads % 16}", f"1.{self._uploads}"
        size = self.rng.randrange(1_000, 300_000)
        wheel = await asyncio.to_thread(build_wheel, self.base / "uploads" / version, project,
                                        version, extra_bytes=size)
        body, ctype = await asyncio.to_thread(_multipart, project, version, wheel)
        auth = "Basic " + base64.b64encode(f"{WRITER}:{SECRET}".encode()).decode()
        started = time.monotonic()
        try:
            async with session.post(self.proxy.url + "/", data=body, headers={
                "Content-Type": ctype, "Authorization": auth,
            }) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.results.failures.append(f"upload {wheel.name}: {type(exc).__name__}")
            return
        self.results.record("upload", status, time.monotonic() - started, wheel.name)
        if status == 200:
            self.results.acked[f"{project}/{wheel.name}"] = sha256_file(wheel)
        elif status < 500:
            self.results.failures.append(f"upload {wheel.name}: {status}")

    # --------------------------------------------------------------- phases
    async def warm_up(self, session: aiohttp.ClientSession) -> None:
        sem = asyncio.Semaphore(16)

        async def one(project: Project) -> None:
            async with sem:
                await self._get(session, "warmup", f"/simple/{project.name}/")
                await self._get(session, "warmup", f"/files/{project.name}/{project.wheel.name}",
                                want_sha=project.sha256)

        await asyncio.gather(*(one(p) for p in self.warm))

    async def client(self, session: aiohttp.ClientSession, deadline: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        actions = {"page": self.page, "cached": self.cached, "cold": self.cold_miss,
                   "upload": self.upload}
        while time.monotonic() < deadline:
            await actions[self.rng.choices(kinds, weights)[0]](session)

    async def cold_burst(self, session: aiohttp.ClientSession) -> int:
        """The burst's clients at once; returns how often upstream was asked for the file."""
        assert self.burst is not None
        project = self.burst
        path = f"/files/{project.name}/{project.wheel.name}"
        await self._get(session, "burst", f"/simple/{project.name}/")
        gate = asyncio.Event()

        async def one() -> None:
            await gate.wait()
            await self._get(session, "burst", path, want_sha=project.sha256)

        tasks = [asyncio.create_task(one()) for _ in range(self.args.cold_burst)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        wanted = f"/files/{project.wheel.name}"
        return sum(1 for _m, p in self.upstream.file_requests() if p == wanted)

    def _sample_rss(self, stop: threading.Event) -> None:
        assert self.proxy is not None
        while not stop.is_set():
            try:
                rss = self.proxy.rss_bytes(include_children=True)
            except RuntimeError:
                return
            self.peak_rss = max(self.peak_rss, rss)
            stop.wait(0.1)

    async def verify_uploads(self, session: aiohttp.ClientSession) -> None:
        sem = asyncio.Semaphore(32)

        async def one(key: str, sha: str) -> None:
            project, filename = key.split("/")
            async with sem:
                status = await self._get(session, "verify", f"/files/{project}/{filename}",
                                         want_sha=sha)
            if status != 200:
                self.results.corrupted.append(f"acked upload {key} answers {status}")

        await asyncio.gather(*(one(k, v) for k, v in self.results.acked.items()))

    def audit_disk(self) -> None:
        """Every cached artifact hashes to its name; every private file to its record."""
        assert self.proxy is not None
        data = self.proxy.data_dir
        for path in (data / "cache" / "files").rglob("*"):
            if path.is_file() and sha256_file(path) != path.name:
                self.results.corrupted.append(f"cache file {path.name}")
        for index in (data / "private").glob("*/index.json"):
            for entry in orjson.loads(index.read_bytes())["files"]:
                path = index.parent / "files" / entry["filename"]
                if not path.is_file() or sha256_file(path) != entry["hashes"]["sha256"]:
                    self.results.corrupted.append(f"stored file {entry['filename']}")

    async def run(self) -> dict[str, Any]:
        assert self.proxy is not None
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await self.warm_up(session)
            self.baseline_rss = self.proxy.rss_bytes(include_children=True)
            self.peak_rss = self.baseline_rss
            stop = threading.Event()
            sampler = threading.Thread(target=self._sample_rss, args=(stop,), daemon=True)
            sampler.start()
            started = time.monotonic()
            deadline = started + self.args.seconds
            clients = [asyncio.create_task(self.client(session, deadline))
                       for _ in range(self.args.clients)]
            await asyncio.sleep(self.args.seconds / 2)
            burst_fetches = await self.cold_burst(session) if self.args.cold_burst else 0
            await asyncio.gather(*clients)
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
            await self.verify_uploads(session)
        await asyncio.to_thread(self.audit_disk)
        r = self.results
        mixed = {k: v for k, v in r.statuses.items() if k in MIX}
        total = sum(sum(c.values()) for c in mixed.values())
        return {
            "clients": self.args.clients,
            "seconds": round(elapsed, 1),
            "requests": total,
            "requests_per_second": round(total / elapsed, 1),
            "statuses": {k: dict(sorted(c.items())) for k, c in sorted(r.statuses.items())},
            "latency_ms": {
                k: _percentiles(v) for k, v in sorted(r.latencies.items()) if k in MIX
            },
            "server_errors": len(r.server_errors),
            "server_error_samples": r.server_errors[:20],
            "corrupted": len(r.corrupted),
            "corrupted_samples": r.corrupted[:20],
            "failures": len(r.failures),
            "failure_samples": r.failures[:20],
            "uploads_acked_and_verified": len(r.acked),
            "cold_burst_clients": self.args.cold_burst,
            "cold_burst_upstream_fetches": burst_fetches,
            "rss_baseline_mib": round(self.baseline_rss / 2**20, 1),
            "rss_peak_mib": round(self.peak_rss / 2**20, 1),
            "proxy_problems": self._log_problems(),
        }

    def _log_problems(self) -> list[str]:
        """The proxy's warning and error log lines (the last 20)."""
        assert self.proxy is not None
        lines = [ln for ln in self.proxy.log_text().splitlines()
                 if '"level":"warning"' in ln or '"level":"error"' in ln]
        return lines[-20:]


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="indexguard-load-") as tmp:
        base = Path(tmp) if args.keep is None else args.keep
        load = Load(args, base)
        try:
            load.setup()
            report = asyncio.run(load.run())
        finally:
            load.close()
    report["seed"] = args.seed
    ok = (
        report["server_errors"] == 0
        and report["corrupted"] == 0
        and report["failures"] == 0
        and (not args.cold_burst or report["cold_burst_upstream_fetches"] == 1)
    )
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
