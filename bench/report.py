"""The results table (medians, ratios against nginx and each peer, targets) and RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from figures import Results

PEERS = ("nginx", "proxpi", "devpi")
# Metrics where a bigger number is better (ratios read "x of peer" either way).
HIGHER_IS_BETTER = ("req/s", "MiB/s", "pages/s (cold)")


@dataclass(frozen=True)
class Verdict:
    text: str
    met: bool


Target = Callable[[Results, str, str, str], Verdict | None]


def _ratio(res: Results, fig: str, metric: str, a: str, b: str) -> float | None:
    va, vb = res.median(fig, metric, a), res.median(fig, metric, b)
    if va is None or vb is None or vb == 0:
        return None
    return va / vb


def _pages_target(res: Results, fig: str, metric: str, srv: str) -> Verdict | None:
    if not fig.startswith("warm page"):
        return None
    if metric == "p99 ms":
        v = res.median(fig, metric, srv)
        return None if v is None else Verdict("< 20 ms", v < 20)
    parts, ok = [], True
    of_nginx = _ratio(res, fig, metric, srv, "nginx")
    if of_nginx is not None:
        parts.append(">= 30% nginx")
        ok &= of_nginx >= 0.30
    for peer in ("proxpi", "devpi"):
        r = _ratio(res, fig, metric, srv, peer)
        if r is not None:
            parts.append(f">= 10x {peer}")
            ok &= r >= 10
    return Verdict(", ".join(parts), ok) if parts else None


def _simple(fig_prefix: str, metric: str, text: str,
            check: Callable[[Results, str, str], bool | None]) -> Target:
    def target(res: Results, fig: str, m: str, srv: str) -> Verdict | None:
        if not fig.startswith(fig_prefix) or m != metric:
            return None
        met = check(res, fig, srv)
        return None if met is None else Verdict(text, met)
    return target


def _vs(metric: str, ref: str, limit: float, higher: bool) -> Callable[[Results, str, str],
                                                                       bool | None]:
    def check(res: Results, fig: str, srv: str) -> bool | None:
        r = _ratio(res, fig, metric, srv, ref)
        if r is None:
            return None
        return r >= limit if higher else r <= limit
    return check


def _abs(metric: str, limit: float, higher: bool = False) -> Callable[[Results, str, str],
                                                                     bool | None]:
    def check(res: Results, fig: str, srv: str) -> bool | None:
        v = res.median(fig, metric, srv)
        if v is None:
            return None
        return v >= limit if higher else v <= limit
    return check


def _last_byte(res: Results, fig: str, srv: str) -> bool | None:
    last, single = res.median(fig, "last byte s", srv), res.median(fig, "single s", srv)
    if last is None or not single:
        return None
    return last / single <= 1.5


def _one_fetch(res: Results, fig: str, srv: str) -> bool | None:
    fetches = res.median(fig, "upstream fetches", srv)
    return None if fetches is None else fetches == 1


TARGETS: tuple[Target, ...] = (
    _pages_target,
    _simple("cached file", "MiB/s", ">= 90% nginx", _vs("MiB/s", "nginx", 0.9, True)),
    _simple("group page", "req/s", ">= 0.9x indexguard-w1",
            _vs("req/s", "indexguard-w1", 0.9, True)),
    _simple("s3 page", "req/s", ">= 0.9x indexguard-w1 (local)",
            _vs("req/s", "indexguard-w1", 0.9, True)),
    _simple("s3 cached file", "MiB/s", ">= 0.9x indexguard-w1 (local)",
            _vs("MiB/s", "indexguard-w1", 0.9, True)),
    _simple("uv pip install", "cold s", "<= 1.2x nginx", _vs("cold s", "nginx", 1.2, False)),
    _simple("uv pip install", "warm s", "<= 1.05x nginx", _vs("warm s", "nginx", 1.05, False)),
    _simple("", "upstream fetches", "== 1", _one_fetch),
    _simple("", "last byte s", "<= 1.5x own single cold fetch", _last_byte),
    _simple("twine upload", "peak RSS growth MiB", "<= 64 MB", _abs("peak RSS growth MiB",
                                                                     64e6 / 2**20)),
    _simple("RSS under page load", "peak MiB per worker", "<= 100 MiB", _abs(
        "peak MiB per worker", 100)),
    _simple("RSS after", "total MiB", "<= 300 MiB", _abs("total MiB", 300)),
)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio_cell(res: Results, fig: str, metric: str, srv: str, peer: str) -> str:
    if srv == peer:
        return ""
    r = _ratio(res, fig, metric, srv, peer)
    return "-" if r is None else f"{r:.2f}x"


def table(res: Results) -> tuple[str, list[str]]:
    """Markdown table of medians and ratios; and the list of missed targets."""
    rows = ["| figure | metric | server | median | runs | vs nginx | vs proxpi | vs devpi "
            "| target | met |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    missed: list[str] = []
    for (fig, metric), by_server in res.values.items():
        for srv, vals in by_server.items():
            verdict = None
            if srv.startswith("indexguard"):
                for target in TARGETS:
                    verdict = target(res, fig, metric, srv)
                    if verdict is not None:
                        break
            met = "" if verdict is None else ("yes" if verdict.met else "**NO**")
            if verdict is not None and not verdict.met:
                missed.append(f"{fig} / {metric} / {srv}: {_fmt(res.median(fig, metric, srv))}"
                              f" (target {verdict.text})")
            ratios = " | ".join(_ratio_cell(res, fig, metric, srv, p) for p in PEERS)
            rows.append(f"| {fig} | {metric} | {srv} | {_fmt(res.median(fig, metric, srv))} | "
                        f"{len(vals)} | {ratios} | {verdict.text if verdict else ''} | {met} |")
    return "\n".join(rows), missed


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def machine() -> dict[str, str]:
    bench = Path(__file__).resolve().parent
    root = bench.parent
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())

    def pip_show(venv: str, pkg: str) -> str:
        python = bench / ".venvs" / venv / "bin" / "python"
        return _version([str(python), "-c",
                         f"import importlib.metadata as m; print(m.version('{pkg}'))"])

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores ({cpu}), {int(mem) / 2**20:.1f} GiB memory, "
                   f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "indexguard": _version([str(root / ".venv" / "bin" / "python"), "-m", "proxy",
                                "--version"]),
        "aiohttp": _version([str(root / ".venv" / "bin" / "python"), "-c",
                             "import aiohttp; print(aiohttp.__version__)"]),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
        "uv": _version([str(root / ".venv" / "bin" / "uv"), "--version"]),
        "twine": _version([str(root / ".venv" / "bin" / "twine"), "--version"]),
        "proxpi": pip_show("proxpi", "proxpi"),
        "gunicorn": pip_show("proxpi", "gunicorn"),
        "devpi-server": pip_show("devpi", "devpi-server"),
    }


def source_state(source: Path | None) -> str:
    """Which proxy code ran: the repo's commit (and whether proxy/ had local edits)."""
    root = Path(__file__).resolve().parent.parent
    commit = _version(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "proxy"],
                           capture_output=True, text=True).stdout.strip()
    state = f"repo {commit}" + (" with uncommitted changes in proxy/" if dirty else "")
    return state if source is None else f"scratch copy {source} (based on {state})"


def source_digest(source: Path | None) -> str:
    """A short hash of the proxy/*.py that ran, to tell work-tree states apart."""
    import hashlib
    root = source or Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted((root / "proxy").glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def render(res: Results, header: str, info: dict[str, str]) -> tuple[str, list[str]]:
    body, missed = table(res)
    lines = [header, "", *(f"- {k}: {v}" for k, v in info.items()), "", body, ""]
    if missed:
        lines += ["Missed targets:", "", *(f"- {m}" for m in missed), ""]
    else:
        lines += ["Every target that applies was met.", ""]
    if res.notes:
        lines += ["Notes from the run:", "", *(f"- {n}" for n in res.notes), ""]
    return "\n".join(lines), missed


def write_results(path: Path, generated: str, analysis: str) -> None:
    """RESULTS.md: the generated table, then the hand-written analysis kept between runs."""
    marker = "<!-- analysis: kept across runs -->"
    kept = analysis
    if path.exists() and marker in path.read_text():
        kept = path.read_text().split(marker, 1)[1].lstrip("\n")
    path.write_text(f"{generated}\n{marker}\n\n{kept}")
