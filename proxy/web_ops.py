"""Operations endpoints: health, Prometheus metrics, a landing page."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .state import CONFIG, METRICS, READER


async def health(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    return web.json_response({
        "status": "ok",
        "version": __version__,
        "forward": config.upstream.forward,
        "upstream_up": all(m.client.last_ok for m in request.app[READER].mirrors.values()),
        "upstreams": {
            name: {"up": m.client.last_ok, "down_for": max(0.0, m.outage.until - time.time())}
            for name, m in request.app[READER].mirrors.items()
        },
        "time": time.time(),
    })


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def landing(request: web.Request) -> web.Response:
    return web.Response(
        text=f"indexguard {__version__}: the package index is at simple/\n",
        content_type="text/plain",
        # GET / answers browsers with the web UI (app._landing): caches must ask again.
        headers={"Vary": "Accept"},
    )
