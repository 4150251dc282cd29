"""aiohttp's own ceiling for a warm page on this machine, beside nginx in the same minute.

    .venv/bin/python bench/floor.py            # after one run of bench/run.py (the tree)

One aiohttp app with no logic returns the 50-file page's gzipped bytes with the proxy's
page headers, with one and with two processes (SO_REUSEPORT), under the page figure's
own load (loadgen.wrk: 64 connections, HTML Accept, Accept-Encoding: gzip). It bounds
what any aiohttp handler can reach here: RESULTS.md reads the proxy's warm-page figures
against it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import loadgen
import servers

BENCH = Path(__file__).resolve().parent
TREE = BENCH / ".cache" / "tree-full" / "www"

APP = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
headers = {"Vary": "Accept, Accept-Encoding", "Cache-Control": "max-age=0, must-revalidate",
           "ETag": '"0123456789abcdef01234567-gz"', "Content-Type": "text/html; charset=utf-8",
           "Content-Encoding": "gzip"}
async def page(request):
    return web.Response(body=body, headers=headers)
app = web.Application()
app.router.add_get("/simple/{project}/", page)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            reuse_port=True)
"""


def _wrk(url: str) -> float:
    return loadgen.wrk(url, loadgen.HTML_ACCEPT, 64, 5).rps


def main() -> int:
    page = TREE / "simple" / "bench-fifty" / "index.html.gz"
    if not page.is_file():
        print("no benchmark tree yet: run bench/run.py once", file=sys.stderr)
        return 2
    work = BENCH / ".work" / "floor"
    work.mkdir(parents=True, exist_ok=True)
    nginx = servers.Nginx(work / "nginx", TREE)
    nginx.start()
    try:
        figures = {"nginx": _wrk(nginx.page_url("bench-fifty"))}
        port = servers.free_port()
        for n in (1, 2):
            procs = [subprocess.Popen([sys.executable, "-c", APP, str(port), str(page)])
                     for _ in range(n)]
            try:
                servers.wait_http(f"http://127.0.0.1:{port}/simple/x/", procs[0])
                time.sleep(1.0)  # every process listening
                figures[f"aiohttp, no logic, {n} process(es)"] = _wrk(
                    f"http://127.0.0.1:{port}/simple/x/")
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait()
        figures["nginx, again"] = _wrk(nginx.page_url("bench-fifty"))
    finally:
        nginx.stop()
    for name, rps in figures.items():
        print(f"{name:34s} {rps:10,.0f} req/s  {rps / figures['nginx']:.2f}x nginx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
