"""The web UI: landing, project pages, search, the guard page, and their static files.

Server-rendered with Jinja2 (autoescape on) under a strict Content-Security-Policy:
no inline script or style, scripts and styles from this server only. It shows
only what the stores and mirrors already know: an upstream is never asked for a
page or a file on the UI's account. Reads are authorized as the simple API's
(app.edge, web_simple.view_of); the guard page needs the admin scope.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
from aiohttp import web
from packaging.utils import NormalizedName

from .auth import ANONYMOUS, Identity
from .catalog import Catalog
from .config import Config
from .description import Renderings
from .dists import name_from_url
from .errors import NotFound
from .registry import GroupSpec
from .resolve import may_read_group, names_held_twice
from .state import CATALOG, CONFIG, IDENTITY, READER, UI_ASSETS
from .ui_model import (
    Asset,
    Snippet,
    install_snippets,
    setup_snippets,
    size_text,
    upload_time_text,
)
from .ui_model import search as search_names
from .web_simple import view_of

_HERE = Path(__file__).resolve().parent
# The UI's pages: nothing inline may run or apply, scripts and styles come from
# this server, forms post back here only, no frame may hold the page.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_HTML_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
    # GET / is negotiated (app._landing); the other pages are HTML only.
    "Vary": "Accept",
}
_ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml"}
# A page lists at most this many releases (an upstream page may list thousands).
MAX_VERSIONS = 50
# Landing: the newest private projects shown.
MAX_LANDING_PROJECTS = 50


async def setup(app: web.Application) -> None:
    """Templates (autoescape on, undefined names an error) and the static files,
    read once, off the loop."""
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(str(_HERE / "templates")), autoescape=True,
        undefined=jinja2.StrictUndefined, auto_reload=False,
    )
    app[UI_ASSETS] = await asyncio.to_thread(_read_assets, _HERE / "static")
    app[CATALOG] = Catalog(app[READER], Renderings())


def _read_assets(folder: Path) -> dict[str, Asset]:
    assets = {}
    for path in sorted(folder.iterdir()):
        ctype = _ASSET_TYPES.get(path.suffix)
        if ctype is not None:
            body = path.read_bytes()
            digest = hashlib.sha256(body).hexdigest()[:16]
            assets[path.name] = Asset(body, ctype, f'"{digest}"')
    return assets


async def asset(request: web.Request) -> web.StreamResponse:
    """/-/static/<name>: links carry ?v=<its hash>, so it may be kept for a year."""
    found = request.app[UI_ASSETS].get(request.match_info["asset"])
    if found is None:
        raise NotFound("No such static file")
    headers = {"Content-Type": found.content_type, "ETag": found.etag,
               "Cache-Control": "public, max-age=31536000, immutable",
               "X-Content-Type-Options": "nosniff"}
    if request.headers.get("If-None-Match", "").strip() == found.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers=headers)


# --- rendering -------------------------------------------------------------------

def _root(request: web.Request) -> str:
    """The relative way from this page back to the server's root ("" at /), so that
    every link works behind a reverse proxy's path prefix too."""
    depth = request.rel_url.raw_path.count("/") - 1
    return "../" * depth


async def _page(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200,
) -> web.Response:
    env = aiohttp_jinja2.get_env(request.app)
    assets = request.app[UI_ASSETS]
    root = _root(request)
    identity = request.get(IDENTITY, ANONYMOUS)
    context = {
        **context, "root": root, "is_admin": "admin" in identity.scopes, "quote": _quote,
        **{key: f"{root}-/static/{name}?v={assets[name].etag.strip(chr(34))}"
           for key, name in (("css", "ui.css"), ("js", "ui.js"), ("icon", "favicon.svg"))},
    }
    # A 50-release page is thousands of nodes, and a template's first use reads
    # its file: both off the loop.
    body = await asyncio.to_thread(_render, env, template, context)
    return web.Response(status=status, body=body, headers=_HTML_HEADERS)


def _render(env: jinja2.Environment, template: str, context: dict[str, Any]) -> bytes:
    return env.get_template(template).render(context).encode()


def _quote(segment: str) -> str:
    return quote(segment, safe="")


def _base_url(request: web.Request, config: Config) -> str:
    """This server as the browser reached it, for snippets to copy. The scheme of
    X-Forwarded-Proto counts only from a trusted proxy (listen.trusted_proxies)."""
    scheme = request.scheme
    proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    if proto in ("http", "https") and _trusted(request.remote, config):
        scheme = proto
    host = request.host if _plain_host(request.host) else "localhost"
    return f"{scheme}://{host}"


def _plain_host(host: str) -> bool:
    return 0 < len(host) <= 255 and all(c.isalnum() or c in ".-:[]_" for c in host)


def _trusted(peer: str | None, config: Config) -> bool:
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return False
    return any(address in net for net in config.listen.trusted_proxies)


# --- who may see what ------------------------------------------------------------

def _readable_groups(identity: Identity, config: Config) -> list[GroupSpec]:
    """Groups this caller may read: all when reading is anonymous (edge let it
    through), else those its token's group patterns cover."""
    groups = list(config.registry.groups)
    if identity is ANONYMOUS:
        return groups
    return [g for g in groups if may_read_group(identity, g.name)]


def _group_prefix(group: str, config: Config) -> str:
    """The path of a group's pages below the root: "" for the default group."""
    return "" if group == config.registry.default_group.name else f"g/{group}/"


# --- landing ---------------------------------------------------------------------

async def landing(request: web.Request) -> web.StreamResponse:
    """GET / for a browser; app.py authorizes it as a read first."""
    config = request.app[CONFIG].current
    identity = request.get(IDENTITY, ANONYMOUS)
    groups = _readable_groups(identity, config)
    # Each index's projects link to the first readable group that holds it.
    where: dict[str, str] = {}
    for group in sorted(groups, key=lambda g: g is not config.registry.default_group):
        for index in group.index_names:
            where.setdefault(index, group.name)
    newest, total = await request.app[CATALOG].newest_private(where, MAX_LANDING_PROJECTS)
    projects = [{
        "name": p.name, "index": p.index, "version": p.latest,
        "href": f"{_group_prefix(where[p.index], config)}project/{_quote(p.name)}/",
        "uploaded": upload_time_text(p.uploaded) or "",
    } for p in newest]
    base = _base_url(request, config)
    default = config.registry.default_group
    shown_group = default if default in groups else (groups[0] if groups else None)
    snippets: tuple[Snippet, ...] = ()
    if shown_group is not None:
        snippets = setup_snippets(
            base, f"/{_group_prefix(shown_group.name, config)}simple/", "/legacy/",
            not config.auth.anonymous_read)
    return await _page(request, "landing.html", {
        "title": "indexguard",
        "projects": projects,
        "more": max(0, total - MAX_LANDING_PROJECTS),
        "gitlab": _gitlab_aliases(config, {g.name for g in groups}),
        "groups": [{"spec": g, "prefix": _group_prefix(g.name, config)} for g in groups],
        "indexes": [config.registry.index(i) for i in where
                    if config.registry.index(i) is not None],
        "first_index": config.registry.first_index.name,
        "snippets": snippets,
        "shown_group": shown_group.name if shown_group else None,
        "base": base,
    })


def _gitlab_aliases(config: Config, readable: set[str]) -> list[dict[str, str]]:
    """GitLab's URLs this server answers (gitlab.projects / gitlab.groups), for the
    groups the caller reads."""
    gitlab = config.registry.gitlab
    rows = [{"kind": "project", "id": ident, "path": f"api/v4/projects/{_quote(ident)}/"
             "packages/pypi/simple/", "group": alias.group, "index": alias.index}
            for ident, alias in sorted(gitlab.projects.items()) if alias.group in readable]
    rows += [{"kind": "group", "id": ident, "path": f"api/v4/groups/{_quote(ident)}/-/"
              "packages/pypi/simple/", "group": group, "index": ""}
             for ident, group in sorted(gitlab.groups.items()) if group in readable]
    return rows


# --- search ----------------------------------------------------------------------

async def search(request: web.Request) -> web.StreamResponse:
    """?q= over the view's private names and the upstream names it has served."""
    config = request.app[CONFIG].current
    view = view_of(request, config)
    query = request.query.get("q", "")[:200]
    names = await request.app[READER].root_names(config, view)
    found = search_names(query, names)
    return await _page(request, "search.html", {
        "title": f"Search: {query}" if query else "Search",
        "query": query, "results": found, "group": view.name,
        "prefix": _group_prefix(view.name, config),
    })


# --- project ---------------------------------------------------------------------

def _project_name(raw: str) -> NormalizedName:
    name = name_from_url(raw)
    if name is None:
        raise NotFound("Not a valid project name")
    return name


async def project_no_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(f"{_quote(_project_name(request.match_info['project']))}/")


async def project(request: web.Request) -> web.StreamResponse:
    """A project as the view resolves it: where and why, releases, files, description."""
    raw = request.match_info["project"]
    name = _project_name(raw)
    if raw != name:
        raise web.HTTPMovedPermanently(f"../{_quote(name)}/")
    config = request.app[CONFIG].current
    view = view_of(request, config)
    found = await request.app[CATALOG].project(name, view, config)
    prefix = _group_prefix(view.name, config)
    current = next((v for v in found.versions if not v.yanked),
                   found.versions[0] if found.versions else None)
    install: tuple[Snippet, ...] = ()
    if current is not None:
        index_url = f"{_base_url(request, config)}/{prefix}simple/"
        install = install_snippets(name, current.version, index_url,
                                   not config.auth.anonymous_read)
    return await _page(request, "project.html", {
        "title": f"{name} - indexguard", "name": name, "group": view.name, "prefix": prefix,
        "why": found.why, "source": found.source, "description": found.description,
        "versions": found.versions[:MAX_VERSIONS],
        "older": max(0, len(found.versions) - MAX_VERSIONS),
        "current": current.version if current is not None else None,
        "install": install, "held_back": found.held_back,
        "size_text": size_text, "time_text": _stamp,
    }, 200 if found.source is not None else 404)


def _stamp(when: float | None) -> str:
    if when is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


# --- guard -----------------------------------------------------------------------

async def guard(request: web.Request) -> web.StreamResponse:
    """/guard/ (admin): per group its members, reserved patterns, names two indexes
    hold, files held back by min_age; every index's private names; collisions seen."""
    config = request.app[CONFIG].current
    reader = request.app[READER]
    catalog = request.app[CATALOG]
    held_by = {name: await store.names() for name, store in reader.stores.items()}
    groups = [{
        "spec": group, "forward": group.forward and config.upstream.forward,
        "held_twice": names_held_twice(group, held_by),
        "held_back": await catalog.held_back(group, config),
    } for group in config.registry.groups]
    return await _page(request, "guard.html", {
        "title": "Guard - indexguard", "groups": groups, "held_by": held_by,
        "collisions": reader.ledger.collisions(),
        "names_report": reader.ledger.names.report(config),
        "upload_collision": config.guard.upload_collision, "time_text": _stamp,
    })
