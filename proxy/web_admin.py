"""Admin API (scope `admin`): yank/unyank, delete a file, release a name, guard report.

/-/... acts on the first index; /i/<index>/-/... on that index, for a token
whose `indexes` patterns cover it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web
from packaging.utils import NormalizedName

from .auth import ANONYMOUS
from .dists import normalize_name, parse_version
from .errors import BadRequest, Forbidden, NotFound
from .resolve import may_admin, names_held_twice
from .state import CONFIG, IDENTITY, READER, STORES
from .store import PrivateStore

# Files listed under trusted_publishing.published in the guard report.
PUBLISHED_SHOWN = 1000


def _store(request: web.Request) -> PrivateStore:
    """The index the route names (or the first); raises NotFound, Forbidden."""
    config = request.app[CONFIG].current
    name = request.match_info.get("index") or config.registry.first_index.name
    store = request.app[STORES].get(name)
    if store is None or config.registry.index(name) is None:
        raise NotFound(f"No index named {name}")
    identity = request.get(IDENTITY, ANONYMOUS)
    if not may_admin(identity, name):
        raise Forbidden(f"Token {identity.name} may not administer index {name}")
    return store


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
    count = await _store(request).set_yanked(name, version, reason or True)
    return web.json_response({"project": name, "version": version, "yanked": reason or True,
                              "files": count})


async def unyank(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    version = str(parse_version(request.match_info["version"]))
    count = await _store(request).set_yanked(name, version, False)
    return web.json_response({"project": name, "version": version, "yanked": False,
                              "files": count})


async def delete_file(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    filename = request.match_info["filename"]
    await _store(request).delete(name, filename)
    return web.json_response({"project": name, "deleted": filename,
                              "note": "the name stays private until released"})


async def release(request: web.Request) -> web.Response:
    name = normalize_name(request.match_info["project"])
    await _store(request).release(name)
    return web.json_response({"project": name, "released": True})


async def guard_report(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    reader = request.app[READER]
    stores = request.app[STORES]
    held_by = {name: await store.names() for name, store in stores.items()}
    first = config.registry.first_index.name
    return web.json_response({
        "private_only": list(config.guard.private_only),
        "allow_shadow": list(config.guard.allow_shadow),
        "upload_collision": config.guard.upload_collision,
        "min_age_seconds": config.guard.min_age,
        "forward": config.upstream.forward,
        "private_names": held_by.get(first, []),
        "indexes": {name: {"private_names": names} for name, names in held_by.items()},
        "groups": {
            group.name: {
                "members": [
                    {"index": m.name} if m.kind == "index"
                    else {"upstream": m.name, "names": list(m.names) if m.names else None}
                    for m in group.members
                ],
                "reserved": list(group.reserved),
                "forward": group.forward and config.upstream.forward,
                # Only the first index's files answer; the others' are hidden.
                "held_twice": names_held_twice(group, held_by),
            }
            for group in config.registry.groups
        },
        # Collisions are detected from the upstream's project list; without one
        # ("unavailable": the root gave none) they cannot be, and this says so.
        "upstream_names": reader.ledger.names.report(config),
        "collisions": [
            {"name": c.name, "rule": c.rule, "count": c.count,
             "first_seen": c.first_seen, "last_seen": c.last_seen}
            for c in reader.ledger.collisions()
        ],
        "trusted_publishing": {
            "publishers": [
                {"name": p.name, "issuer": p.issuer, "audience": p.audience,
                 "claims": dict(p.claims), "index": p.index, "projects": list(p.projects),
                 "read": p.read}
                for p in config.auth.trusted_publishers
            ],
            "published": await _published(stores, held_by),
        },
    }, dumps=lambda obj: orjson.dumps(obj).decode())


async def _published(
    stores: dict[str, PrivateStore], held_by: dict[str, list[NormalizedName]],
) -> list[dict[str, Any]]:
    """The files a trusted publisher sent, newest first (at most PUBLISHED_SHOWN),
    each with the publisher and the CI claims recorded with it."""
    found: list[dict[str, Any]] = []
    for index, names in held_by.items():
        for name in names:
            page = await stores[index].page(name)
            for entry in page.files if page is not None else ():
                if entry.published_by:
                    found.append({"index": index, "project": name, "filename": entry.filename,
                                  "upload_time": entry.upload_time,
                                  "published_by": dict(entry.published_by)})
    found.sort(key=lambda f: f["upload_time"] or "", reverse=True)
    return found[:PUBLISHED_SHOWN]
