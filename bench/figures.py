"""The measurements of issue 5, one function per figure; each adds per-run values to Results.

Every server under test is started fresh where the figure needs an empty cache,
and stopped before the next one starts, so that they never share the CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import loadgen
import servers
from dataset import FIFTY, MANY, Dataset
from servers import Server

ServerFactory = Callable[[Path], Server]
UV = servers.ROOT / ".venv" / "bin" / "uv"
TWINE = servers.ROOT / ".venv" / "bin" / "twine"


@dataclass
class Results:
    """(figure, metric) -> server -> values, one per run; plus notes for the report."""

    values: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: str, metric: str, server: str, value: float) -> None:
        self.values.setdefault((figure, metric), {}).setdefault(server, []).append(value)

    def median(self, figure: str, metric: str, server: str) -> float | None:
        vals = self.values.get((figure, metric), {}).get(server)
        return statistics.median(vals) if vals else None


@dataclass
class Ctx:
    ds: Dataset
    upstream: Server  # nginx, or the Python fallback when nginx is missing
    baseline: bool  # the upstream is nginx, and so a baseline
    proxies: dict[str, ServerFactory]  # indexguard variants and peers, by name
    runs: int
    seconds: float
    smoke: bool
    work: Path
    res: Results
    log: Callable[[str], None]
    profile: bool = False
    failures: list[str] = field(default_factory=list)
    _n: int = 0

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A measurement that fails becomes a note; the rest of the run goes on."""
        try:
            yield
        except Exception as exc:
            text = f"{what} failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.failures.append(text)
            self.res.notes.append(text)
            self.log("  " + text)

    def fresh(self, name: str, upstream: str | None = None) -> Server:
        self._n += 1
        work = self.work / f"{self._n:03d}-{name}"
        shutil.rmtree(work, ignore_errors=True)
        factory = self.proxies[name]
        srv = factory(work) if upstream is None else factory(work, upstream=upstream)
        srv.name = name  # the table's row name
        srv.start()
        return srv

    @contextlib.contextmanager
    def running(self, name: str, upstream: str | None = None) -> Iterator[Server]:
        srv = self.fresh(name, upstream)
        try:
            yield srv
        finally:
            srv.stop()
            if not self.smoke:
                shutil.rmtree(srv.work / "data", ignore_errors=True)
                shutil.rmtree(srv.work / "cache", ignore_errors=True)
                shutil.rmtree(srv.work / "server", ignore_errors=True)

    def targets(self, include_log: bool = False) -> list[str]:
        return [n for n in self.proxies
                if (include_log or not n.endswith("-log"))
                and not n.endswith(("-group", "-s3"))]

    def with_baseline(self, names: list[str]) -> list[str]:
        return (["nginx"] if self.baseline else []) + names


def _get(url: str, accept: str = loadgen.HTML_ACCEPT) -> bytes:
    return servers.http_get(url, {"Accept": accept}, timeout=300)


def file_url(srv: Server, project: str, filename: str) -> str:
    """The server's own link to a file, read from its HTML page."""
    page_url = srv.page_url(project)
    body = _get(page_url).decode()
    for href in re.findall(r'href="([^"]+)"', body):
        if href.split("#", 1)[0].endswith("/" + filename) or href.split("#", 1)[0] == filename:
            return urljoin(page_url, href.split("#", 1)[0].replace("&amp;", "&"))
    raise RuntimeError(f"{srv.name}: no link to {filename} on {page_url}")


def _peak_rss(pids: list[int]) -> float:
    return max((servers.hwm_mib(p) for p in pids), default=0.0)


def _py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    spy = servers.VENVS / "tools" / "bin" / "py-spy"
    with contextlib.suppress(Exception):
        servers.ensure_venv("tools")
    if not spy.exists():
        return None
    return subprocess.Popen([str(spy), "record", "-o", str(out), "-d", str(int(seconds)),
                             "-p", str(pid), "-r", "200", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- figure: warm project pages --------------------------------------------------------


@contextlib.contextmanager
def _all_started(ctx: Ctx, names: list[str]) -> Iterator[dict[str, Server]]:
    """Every server up at once (idle ones cost no CPU), so that each run can visit
    all of them in turn: drift on a shared machine then hits every ratio alike."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Server] = {}
        for name in names:
            with ctx.guard(f"starting {name}"):
                started[name] = (ctx.upstream if name == "nginx"
                                 else stack.enter_context(ctx.running(name)))
        yield started


def pages(ctx: Ctx) -> None:
    projects = ((FIFTY, "50-file"), (MANY, f"{ctx.ds.many_files:,}-file"))
    names = ctx.with_baseline(ctx.targets(include_log=not ctx.smoke))
    with _all_started(ctx, names) as started:
        workers = {name: srv.worker_pids() for name, srv in started.items()}
        for pids in workers.values():
            for p in pids:
                servers.reset_hwm(p)
        for project, label in projects:
            for fmt, accept in (("HTML", loadgen.HTML_ACCEPT), ("JSON", loadgen.JSON_ACCEPT)):
                _warm_page(ctx, f"warm page, {label} {fmt}", started, workers, project, accept)
        for name, pids in workers.items():
            ctx.res.add("RSS under page load", "peak MiB per worker", name, _peak_rss(pids))


def group_pages(ctx: Ctx) -> None:
    """Issue 11: a warm page through a group of five indexes and two upstreams,
    side by side with the one-index, one-upstream server, in the same runs."""
    names = ["indexguard-w1", "indexguard-w1-group"]
    with _all_started(ctx, names) as started:
        workers = {name: srv.worker_pids() for name, srv in started.items()}
        for fmt, accept in (("HTML", loadgen.HTML_ACCEPT), ("JSON", loadgen.JSON_ACCEPT)):
            _warm_page(ctx, f"group page, 50-file {fmt}", started, workers, FIFTY, accept)


def s3_mode(ctx: Ctx) -> None:
    """Issue 12: warm pages and a warm cached file with the store on S3, side by side
    with the local store in the same runs (the replica's local tier serves both)."""
    names = [n for n in ("indexguard-w1", "indexguard-w1-s3") if n in ctx.proxies]
    with _all_started(ctx, names) as started:
        workers = {name: srv.worker_pids() for name, srv in started.items()}
        for fmt, accept in (("HTML", loadgen.HTML_ACCEPT), ("JSON", loadgen.JSON_ACCEPT)):
            _warm_page(ctx, f"s3 page, 50-file {fmt}", started, workers, FIFTY, accept)
        fig = f"s3 cached file {ctx.ds.big_size / 1e6:.0f} MB, 16 conns"
        urls: dict[str, str] = {}
        for name, srv in started.items():
            with ctx.guard(f"{fig} on {name}"):
                url = file_url(srv, ctx.ds.big_project, ctx.ds.big_filename)
                got = loadgen.curl_parallel(url, 1)
                assert got.sizes == [ctx.ds.big_size], f"{name}: bad download {got}"
                urls[name] = url
        _file_runs(ctx, fig, urls)


def _warm_page(ctx: Ctx, fig: str, started: dict[str, Server], workers: dict[str, list[int]],
               project: str, accept: str) -> None:
    """One page figure: each server warmed, then every run visits them all in turn."""
    urls: dict[str, str] = {}
    for name, srv in started.items():
        with ctx.guard(f"{fig} on {name}"):
            for _ in range(3):
                _get(srv.page_url(project), accept)
            urls[name] = srv.page_url(project)
    for run in range(ctx.runs):
        for name, url in urls.items():
            with ctx.guard(f"{fig} on {name}"):
                _page_run(ctx, fig, name, url, accept, workers[name], run)
    ctx.log(f"  {fig}: " + ", ".join(
        f"{n} {ctx.res.median(fig, 'req/s', n) or 0:.0f}/s" for n in urls))


def _page_run(ctx: Ctx, fig: str, name: str, url: str, accept: str, workers: list[int],
              run: int) -> None:
    spy = None
    if ctx.profile and run == 0 and name == "indexguard-w1":
        out = ctx.work / f"profile-{fig.replace(' ', '-').replace(',', '')}.svg"
        spy = _py_spy(workers[0], out, ctx.seconds)
    r = loadgen.load(url, accept, 64, ctx.seconds, ctx.smoke)
    if spy is not None:
        spy.wait(timeout=60)
    if r.errors:
        ctx.res.notes.append(f"{name} {fig}: {r.errors} errors in run {run}")
    ctx.res.add(fig, "req/s", name, r.rps)
    ctx.res.add(fig, "p99 ms", name, r.p99_ms)


# --- figure: cached file download ------------------------------------------------------


def _download_rate(url: str, ctx: Ctx) -> float:
    if loadgen.have_wrk() and not ctx.smoke:
        return loadgen.wrk(url, "*/*", 16, ctx.seconds).mib_s
    got = loadgen.curl_parallel(url, 16)
    return sum(got.sizes) / 2**20 / got.wall


def cached_file(ctx: Ctx) -> None:
    fig = f"cached file {ctx.ds.big_size / 1e6:.0f} MB, 16 conns"
    with _all_started(ctx, ctx.with_baseline(ctx.targets())) as started:
        urls: dict[str, str] = {}
        for name, srv in started.items():
            with ctx.guard(f"cached file on {name}"):
                url = file_url(srv, ctx.ds.big_project, ctx.ds.big_filename)
                got = loadgen.curl_parallel(url, 1)
                assert got.sizes == [ctx.ds.big_size], f"{name}: bad download {got}"
                for _ in range(60):  # until cached: proxpi redirects upstream meanwhile
                    if _is_cached(url):
                        break
                    time.sleep(0.5)
                urls[name] = url
        _file_runs(ctx, fig, urls)


def _file_runs(ctx: Ctx, fig: str, urls: dict[str, str]) -> None:
    """Each run downloads from every server in turn: drift hits every ratio alike."""
    for _ in range(ctx.runs):
        for name, url in urls.items():
            with ctx.guard(f"{fig} on {name}"):
                ctx.res.add(fig, "MiB/s", name, _download_rate(url, ctx))
    ctx.log(f"  {fig}: " + ", ".join(
        f"{n} {ctx.res.median(fig, 'MiB/s', n) or 0:.0f}" for n in urls))


def _is_cached(url: str) -> bool:
    """True when a GET is answered without a redirect (proxpi's 'not yet cached')."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=60) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# --- figure: uv pip install -----------------------------------------------------------


def _uv_install(index: str, ctx: Ctx) -> float:
    # On tmpfs when there is one: the install writes ~1 GB, and disk flushes on a
    # shared machine would swamp the difference between the indexes.
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else ctx.work
    venv = scratch / f"indexguard-bench-uv-{os.getpid()}"
    tmp = venv.with_name(venv.name + "-tmp")
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = {**os.environ, "UV_NO_CONFIG": "1", "TMPDIR": str(tmp)}
    for key in ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_FIND_LINKS",
                "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(key, None)
    subprocess.run([str(UV), "venv", "-q", "--python", sys.executable, str(venv)],
                   check=True, env=env)
    started = time.perf_counter()
    subprocess.run([str(UV), "pip", "install", "-q", "--no-cache", "--index-url", index,
                    "--python", str(venv / "bin" / "python"), "-r", str(ctx.ds.install_reqs)],
                   check=True, env=env, timeout=900)
    took = time.perf_counter() - started
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return took


def uv_install(ctx: Ctx) -> None:
    fig = "uv pip install --no-cache, whole set"
    for _ in range(ctx.runs):
        for name in ctx.targets():
            # Straight from nginx right before each proxy's pair: drift hits both alike.
            direct = _uv_install(ctx.upstream.simple, ctx)
            ctx.res.add(fig, "cold s", ctx.upstream.name, direct)
            ctx.res.add(fig, "warm s", ctx.upstream.name, direct)
            with ctx.guard(f"uv install via {name}"), ctx.running(name) as srv:
                ctx.res.add(fig, "cold s", name, _uv_install(srv.simple, ctx))
                time.sleep(1)  # let the cache commit what the cold install fetched
                ctx.res.add(fig, "warm s", name, _uv_install(srv.simple, ctx))
        ctx.log(f"  run done: direct {ctx.res.median(fig, 'cold s', ctx.upstream.name):.2f}s")


# --- figure: 100 concurrent requests for one uncached file -----------------------------


def cold_concurrency(ctx: Ctx) -> None:
    """Single-flight: n clients at once for a file the proxy has not cached.

    Twice when nginx is there: from the loopback upstream, and from nginx's
    throttled listener (10 MiB/s per connection, like a WAN link to PyPI), where
    the time to the last byte can be compared with one cold fetch.
    """
    n = 20 if ctx.smoke else 100
    variants = [("loopback upstream", ctx.upstream.simple)]
    slow = getattr(ctx.upstream, "slow_simple", None)
    if slow and not ctx.smoke:
        variants.append((f"upstream at {servers.Nginx.SLOW_RATE[:-1]} MiB/s", slow))
    for label, upstream in variants:
        fig = (f"{n} concurrent GETs of one uncached {ctx.ds.big_size / 1e6:.0f} MB file, "
               f"{label}")
        for _ in range(ctx.runs):
            base = upstream.rsplit("/simple/", 1)[0]
            direct = f"{base}/files/{ctx.ds.big_project}/{ctx.ds.big_filename}"
            ctx.res.add(fig, "single s", ctx.upstream.name, loadgen.curl_parallel(direct, 1).wall)
            ctx.res.add(fig, "last byte s", ctx.upstream.name,
                        loadgen.curl_parallel(direct, n).wall)
            for name in ctx.targets():
                for metric, clients in (("single s", 1), ("last byte s", n)):
                    with ctx.guard(f"cold GETs via {name}"), ctx.running(name, upstream) as srv:
                        _cold_gets(ctx, srv, fig, metric, clients)
        ctx.log(f"  {fig}: done")


def _cold_gets(ctx: Ctx, srv: Server, fig: str, metric: str, clients: int) -> None:
    count = getattr(ctx.upstream, "count", None)
    path = f"/files/{ctx.ds.big_project}/{ctx.ds.big_filename}"
    # The page first, so that only the file is cold.
    url = file_url(srv, ctx.ds.big_project, ctx.ds.big_filename)
    before = count(path) if count else 0
    got = loadgen.curl_parallel(url, clients)
    time.sleep(0.3)
    bad = [(s, z) for s, z in zip(got.statuses, got.sizes, strict=True)
           if s != 200 or z != ctx.ds.big_size]
    if bad or len(got.statuses) != clients:
        ctx.res.notes.append(f"{srv.name} {fig}: {len(bad)} of {clients} transfers failed "
                             f"(status, bytes) {bad[:3]}")
    ctx.res.add(fig, metric, srv.name, got.wall)
    if clients > 1 and count is not None:
        ctx.res.add(fig, "upstream fetches", srv.name, count(path) - before)


# --- figure: twine upload of a big file -------------------------------------------------


def upload(ctx: Ctx) -> None:
    size_mib = ctx.ds.upload_file.stat().st_size / 2**20
    fig = f"twine upload of a {size_mib:.0f} MiB wheel"
    names = [n for n in ctx.targets() if n.startswith(("indexguard", "devpi"))]
    if not TWINE.exists():
        ctx.res.notes.append("twine is not installed in .venv: upload figure skipped")
        return
    for _ in range(ctx.runs):
        for name in names:
            with ctx.guard(f"upload to {name}"), ctx.running(name) as srv:
                url = getattr(srv, "upload_url", srv.base + "/")
                user, password = ((servers.UPLOAD_USER, servers.UPLOAD_SECRET)
                                  if name.startswith("indexguard")
                                  else ("root", servers.DEVPI_ROOT_PASSWORD))
                pids = srv.all_pids()
                exact = all(servers.reset_hwm(p) for p in pids)
                base = {p: servers.rss_mib(p) for p in pids}
                sampler = servers.RssSampler(pids)
                sampler.start()
                env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
                started = time.perf_counter()
                done = subprocess.run(
                    [str(TWINE), "upload", "--non-interactive", "--disable-progress-bar",
                     "--repository-url", url, "-u", user, "-p", password,
                     str(ctx.ds.upload_file)], capture_output=True, text=True, env=env)
                took = time.perf_counter() - started
                sampler.stopped.set()
                sampler.join()
                if done.returncode != 0:
                    ctx.res.notes.append(f"{name} upload failed: {done.stdout[-300:]}"
                                         f"{done.stderr[-300:]}")
                    continue
                growth = max(max(sampler.peak[p], servers.hwm_mib(p) if exact else 0) - base[p]
                             for p in pids)
                ctx.res.add(fig, "wall s", name, took)
                ctx.res.add(fig, "peak RSS growth MiB", name, growth)
        ctx.log("  run done")


# --- figure: RSS after many distinct pages ------------------------------------------------


def rss_pages(ctx: Ctx) -> None:
    n = len(ctx.ds.page_names)
    fig = f"RSS after {n:,} distinct project pages"
    cap = 60.0 if ctx.smoke else 30.0  # seconds per server: peers may be far slower
    for _ in range(ctx.runs):
        for name in ctx.targets():
            with ctx.guard(f"distinct pages via {name}"), ctx.running(name) as srv:
                urls = [srv.page_url(p) for p in ctx.ds.page_names]
                ok, failed, took = loadgen.fetch_all(urls, loadgen.JSON_ACCEPT, 16, cap)
                time.sleep(0.5)
                workers = srv.worker_pids()
                ctx.res.add(fig, "total MiB", name, srv.rss_total())
                ctx.res.add(fig, "max MiB per worker",
                            name, max(servers.rss_mib(p) for p in workers))
                ctx.res.add(fig, "pages/s (cold)", name, ok / took)
                if ok < n:
                    ctx.res.notes.append(f"{name} {fig}: only {ok} of {n} pages in {took:.0f}s "
                                         f"({failed} failed); RSS measured there")
        ctx.log("  run done")


FIGURES: dict[str, Callable[[Ctx], None]] = {
    "pages": pages,
    "group": group_pages,
    "s3": s3_mode,
    "file": cached_file,
    "uv": uv_install,
    "cold": cold_concurrency,
    "upload": upload,
    "rss": rss_pages,
}
