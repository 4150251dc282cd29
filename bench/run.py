"""indexguard benchmark (issue 5): one command runs everything and prints the table.

    .venv/bin/python bench/run.py                 # full run, 3 runs per figure, with peers
    .venv/bin/python bench/run.py --smoke         # seconds: tiny generated set, no peers
    .venv/bin/python bench/run.py --only pages,file --no-peers --runs 1

nginx serves a static simple index (real wheels from bench/requirements.txt plus
generated projects) on loopback; it is both the upstream of every proxy and the
baseline. indexguard (1 and 2 workers), proxpi and devpi-server mirror it.
Everything downloaded or generated lives in the git-ignored bench/.cache,
bench/.venvs and bench/.work. The full run rewrites bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import dataset
import figures
import peers
import report
import servers

BENCH = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny generated set, one run, no peers, no PyPI downloads, no wrk")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median is reported)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    p.add_argument("--only", default="", help=f"comma-separated: {','.join(figures.FIGURES)}")
    p.add_argument("--no-peers", action="store_true", help="skip proxpi and devpi-server")
    p.add_argument("--proxy-src", type=Path, default=None,
                   help="run the `proxy` package found in this directory (a scratch copy "
                        "with a candidate fix) instead of the repo's")
    p.add_argument("--compare-src", type=Path, default=None,
                   help="also run indexguard-w1-alt and -w2-alt from this directory's `proxy`, "
                        "in the same run (a candidate fix against the repo)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy flame graphs of indexguard under page load (bench/.work)")
    return p


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _proxies(upstream: str, smoke: bool, with_peers: bool, source: Path | None,
             compare: Path | None, log: figures.Callable[[str], None], work: Path,
             notes: list[str]) -> dict[str, figures.ServerFactory]:
    ig = partial(servers.Indexguard, upstream=upstream, source=source)
    out: dict[str, figures.ServerFactory] = {
        "indexguard-w1": partial(ig, workers=1),
    }
    # Issue 11: the same page through a group of five indexes and two upstreams.
    out["indexguard-w1-group"] = partial(ig, workers=1, group=True)
    # Issue 12: the same server with its store on S3 (moto on loopback).
    if servers.PROXY_PYTHON.with_name("moto_server").exists():
        out["indexguard-w1-s3"] = partial(ig, workers=1, s3=True)
    if not smoke:
        out["indexguard-w2"] = partial(ig, workers=2)
        out["indexguard-w1-log"] = partial(ig, workers=1, access_log=True)
    if compare is not None:
        alt = partial(servers.Indexguard, upstream=upstream, source=compare)
        out["indexguard-w1-alt"] = partial(alt, workers=1)
        out["indexguard-w2-alt"] = partial(alt, workers=2)
    if not with_peers:
        return out
    candidates: dict[str, figures.ServerFactory] = {
        "proxpi": partial(peers.Proxpi, upstream=upstream),
        "devpi": partial(peers.Devpi, upstream=upstream),
    }
    for name, factory in candidates.items():
        log(f"checking that {name} starts (installing it on first use)")
        srv = factory(work / f"probe-{name}")
        try:
            srv.start()
            out[name] = factory
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            notes.append(f"peer {name} left out: it did not start ({exc})")
        finally:
            srv.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    selected = [f for f in args.only.split(",") if f] or list(figures.FIGURES)
    unknown = [f for f in selected if f not in figures.FIGURES]
    if unknown:
        print(f"--only: unknown {unknown}; choose from {list(figures.FIGURES)}", file=sys.stderr)
        return 2
    spec = dataset.SMOKE if args.smoke else dataset.FULL
    steps: list[str] = []
    ds = dataset.build(spec, steps)
    for step in steps:
        log(step)
    log(f"dataset: {ds.n_dists} projects, {ds.n_files} files, big file {ds.big_filename} "
        f"({ds.big_size / 1e6:.1f} MB), {len(ds.page_names)} page-only projects")
    work = dataset.WORK / ("smoke" if args.smoke else "run")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = figures.Results()
    baseline = shutil.which("nginx") is not None
    upstream: servers.Server = (servers.Nginx(work / "nginx", ds.tree) if baseline
                                else servers.PyStatic(work / "pystatic", ds.tree))
    if not baseline:
        res.notes.append("nginx is not installed: a Python static server is the upstream, "
                         "and there are no baseline figures")
    failed: list[str] = []
    source_at_start = report.source_state(args.proxy_src)
    try:
        upstream.start()
        log(f"upstream {upstream.name} at {upstream.simple}")
        proxies = _proxies(upstream.simple, args.smoke, not (args.no_peers or args.smoke),
                           args.proxy_src, args.compare_src, log, work, res.notes)
        ctx = figures.Ctx(ds=ds, upstream=upstream, baseline=baseline, proxies=proxies,
                          runs=1 if args.smoke else args.runs, seconds=args.seconds,
                          smoke=args.smoke, work=work, res=res, log=log, profile=args.profile)
        for name in selected:
            log(f"figure {name}")
            try:
                figures.FIGURES[name](ctx)
            except Exception as exc:
                traceback.print_exc()
                failed.append(name)
                res.notes.append(f"figure {name} failed: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        upstream.stop()
    info = report.machine()
    info["indexguard source"] = report.source_state(args.proxy_src)
    if info["indexguard source"] != source_at_start:
        res.notes.append(f"the proxy source changed during the run (at start: {source_at_start})")
    info["indexguard proxy/ digest"] = report.source_digest(args.proxy_src)
    title = "# indexguard benchmark (issue 5)" + (" — smoke run" if args.smoke else "")
    text, missed = report.render(res, title, info)
    print(text)
    (work / "results.json").write_text(json.dumps(
        {"info": info, "notes": res.notes,
         "values": [{"figure": f, "metric": m, "server": s, "runs": v}
                    for (f, m), d in res.values.items() for s, v in d.items()]}, indent=1))
    if (not args.smoke and not args.only and not failed and args.proxy_src is None
            and args.compare_src is None):
        report.write_results(BENCH / "RESULTS.md", text, "")
        log("wrote bench/RESULTS.md")
    log(f"done; {len(missed)} target(s) missed")
    if failed or (args.smoke and ctx.failures):
        return 1  # the smoke run must exercise every path: a failure there is rot
    return 0


if __name__ == "__main__":
    sys.exit(main())
