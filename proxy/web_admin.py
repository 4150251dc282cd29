"""Admin API (scope `admin`): yank/unyank, delete a file, release a name, guard report."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from .dists import normalize_name, parse_version
from .errors import BadRequest
from .state import CONFIG, READER, STORE


async def _reason(request: web.Request) -> str:
    """The yank reason from a JSON body, a form, or ?reason=; "" when none."""
    if request.query.get("reason"):
        return request.query["reason"]
    if not request.can_read_body:
        return ""
    body = await request.read()
    if not body:
        return ""
    ctype = request.content_type
    try:
        if ctype == "application/json":
            data: Any = orjson.loads(body)
            return str(data.get("reason", "")) if isinstance(data, dict) else ""
        if ctype == "application/x-www-form-urlencoded":
            values = parse_qs(body.decode("utf-8", errors="replace")).get("reason", [""])
            return values[0]
    except orjson.JSONDecodeError:
        raise BadRequest("Invalid JSON body") from None
    return body.decode("utf-8", errors="replace")


async def yank(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    version = str(parse_version(request.match_info["version"]))
    reason = (await _reason(request)).strip()[:500]
    # PEP 592: a yank with no reason is `true`, with one it is the reason.
    count = await request.app[STORE].set_yanked(name, version, reason or True)
    return web.json_response({"project": name, "version": version, "yanked": reason or True,
                              "files": count})


async def unyank(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    version = str(parse_version(request.match_info["version"]))
    count = await request.app[STORE].set_yanked(name, version, False)
    return web.json_response({"project": name, "version": version, "yanked": False,
                              "files": count})


async def delete_file(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    filename = request.match_info["filename"]
    await request.app[STORE].delete(name, filename)
    return web.json_response({"project": name, "deleted": filename,
                              "note": "the name stays private until released"})


async def release(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    await request.app[STORE].release(name)
    return web.json_response({"project": name, "released": True})


async def guard_report(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    index = request.app[READER]
    return web.json_response({
        "private_only": list(config.guard.private_only),
        "allow_shadow": list(config.guard.allow_shadow),
        "upload_collision": config.guard.upload_collision,
        "min_age_seconds": config.guard.min_age,
        "forward": config.upstream.forward,
        "private_names": await request.app[STORE].names(),
        # Collisions are detected from the upstream's project list; without one
        # ("unavailable": the root gave none) they cannot be, and this says so.
        "upstream_names": index.ledger.names.report(config),
        "collisions": [
            {"name": c.name, "rule": c.rule, "count": c.count,
             "first_seen": c.first_seen, "last_seen": c.last_seen}
            for c in index.ledger.collisions()
        ],
    }, dumps=lambda obj: orjson.dumps(obj).decode())
