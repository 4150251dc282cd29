"""A minimal static simple index (aiohttp): the upstream when nginx is not installed.

Used by the smoke run only; logs one line per file GET so fetches can be counted.
Usage: python staticserver.py TREE PORT
"""

from __future__ import annotations

import sys
from pathlib import Path


def _serve_static(tree: Path, port: int) -> None:
    from aiohttp import web

    async def page(request: web.Request) -> web.StreamResponse:
        fmt = "json" if "+json" in request.headers.get("Accept", "") else "html"
        name = request.match_info.get("name", "")
        path = tree / "simple" / name / f"index.{fmt}" if name else tree / "simple" / "index.html"
        if not path.is_file():
            raise web.HTTPNotFound()
        ctype = "application/vnd.pypi.simple.v1+json" if fmt == "json" else "text/html"
        return web.Response(body=path.read_bytes(), content_type=ctype)

    async def file(request: web.Request) -> web.StreamResponse:
        print(f"GET {request.path}", flush=True)
        path = tree / "files" / request.match_info["name"] / request.match_info["filename"]
        if ".." in request.path or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/simple/", page)
    app.router.add_get("/simple/{name}/", page)
    app.router.add_get("/files/{name}/{filename}", file)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    _serve_static(Path(sys.argv[1]), int(sys.argv[2]))
