"""Load generators: wrk (with a Lua script for headers and exact percentiles), a small
aiohttp loader for when wrk is absent (the smoke run), and curl for parallel downloads.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"

_LUA = """
wrk.headers["Accept"] = "{accept}"
wrk.headers["Accept-Encoding"] = "gzip"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.bytes,
    summary.duration, latency:percentile(99), latency:percentile(50),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    bytes: int
    seconds: float
    p99_ms: float
    p50_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk(url: str, accept: str, connections: int, seconds: float,
        threads: int = 2) -> LoadResult:
    """One wrk run; Accept-Encoding: gzip as pip and uv send it."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_LUA.format(accept=accept))
        script = fh.name
    try:
        out = subprocess.run(
            ["wrk", "-t", str(min(threads, connections)), "-c", str(connections),
             "-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", script, url],
            check=True, capture_output=True, text=True, timeout=seconds + 60,
        ).stdout
    finally:
        Path(script).unlink(missing_ok=True)
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH "))
    reqs, nbytes, dur_us, p99, p50, errors = (int(x) for x in line.split()[1:])
    return LoadResult(reqs, nbytes, dur_us / 1e6, p99 / 1000, p50 / 1000, errors)


async def _aio_load(url: str, accept: str, connections: int, total: int) -> LoadResult:
    latencies: list[float] = []
    nbytes = 0
    errors = 0
    todo = iter(range(total))
    headers = {"Accept": accept, "Accept-Encoding": "gzip"}
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:

        async def worker() -> None:
            nonlocal nbytes, errors
            for _ in todo:
                t = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t)
                nbytes += len(body)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    p50 = latencies[len(latencies) // 2] * 1000
    return LoadResult(total, nbytes, elapsed, p99, p50, errors)


def pyload(url: str, accept: str, connections: int, total: int) -> LoadResult:
    """A fixed number of requests from aiohttp (slower than wrk: the client shares the CPU)."""
    return asyncio.run(_aio_load(url, accept, connections, total))


def load(url: str, accept: str, connections: int, seconds: float, smoke: bool) -> LoadResult:
    if have_wrk() and not smoke:
        return wrk(url, accept, connections, seconds)
    return pyload(url, accept, min(connections, 16), 200 if smoke else 2000)


@dataclass(frozen=True)
class ParallelGet:
    wall: float  # launch to last byte of the last transfer
    statuses: list[int]
    sizes: list[int]


def curl_parallel(url: str, count: int) -> ParallelGet:
    """count simultaneous GETs of url from one curl process (follows redirects)."""
    argv = ["curl", "-s", "-L", "-Z", "--parallel-immediate", "--parallel-max", str(count),
            "-w", "%{http_code} %{size_download}\\n"]
    for _ in range(count):
        argv += ["-o", "/dev/null", url]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    wall = time.perf_counter() - started
    rows = [ln.split() for ln in out.splitlines() if ln.strip()]
    return ParallelGet(wall, [int(r[0]) for r in rows], [int(r[1]) for r in rows])


async def _fetch_all(urls: list[str], accept: str, connections: int,
                     deadline: float) -> tuple[int, int]:
    ok = failed = 0
    todo = iter(urls)
    headers = {"Accept": accept, "Accept-Encoding": "gzip"}
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker() -> None:
            nonlocal ok, failed
            for url in todo:
                if time.monotonic() > deadline:
                    return
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        ok += resp.status == 200
                        failed += resp.status != 200
                except (aiohttp.ClientError, TimeoutError):
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return ok, failed


def fetch_all(urls: list[str], accept: str, connections: int,
              max_seconds: float) -> tuple[int, int, float]:
    """GET every URL once (stopping at max_seconds): (ok, failed, seconds)."""
    started = time.monotonic()
    ok, failed = asyncio.run(_fetch_all(urls, accept, connections, started + max_seconds))
    return ok, failed, time.monotonic() - started
