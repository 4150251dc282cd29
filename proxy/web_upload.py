"""POST / and /legacy/: stream the legacy upload form's parts to the Publisher.

Uses request.multipart() (never request.post(), which buffers and caps at 1 MiB).
Messages go in the reason phrase: it is the only server text twine prints.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from packaging.utils import NormalizedName

from .auth import ANONYMOUS
from .config import Config
from .errors import BadRequest, NotFound, ProxyError, RequestTimeout, TooLarge, quoted
from .guard import matches_any
from .publish import (
    CHUNK,
    MAX_FIELD_BYTES,
    Publisher,
    Refusal,
    Spooled,
    UploadForm,
    check_form_header,
)
from .resolve import upload_refusal
from .state import CONFIG, IDENTITY, METRICS, PUBLISHERS

T = TypeVar("T")

# Form fields and multipart framing on top of the file itself.
_ENVELOPE = 64 * 2**20


async def _within(idle: float, read: Awaitable[T]) -> T:
    """One read of the body; a client that stalls longer than `idle` is cut off.

    aiohttp has no body-read timeout of its own, so without this a slowloris
    client holds a connection and a temp file open forever.
    """
    try:
        async with asyncio.timeout(idle):
            return await read
    except TimeoutError:
        raise RequestTimeout(f"Request body stalled for {idle:g}s; upload cut off") from None


async def _part_chunks(part: BodyPartReader, idle: float) -> AsyncIterator[bytes]:
    while True:
        chunk = await _within(idle, part.read_chunk(CHUNK))
        if not chunk:
            return
        yield chunk


async def _read_field(part: BodyPartReader, idle: float) -> bytes:
    buf = bytearray()
    while True:
        chunk = await _within(idle, part.read_chunk(64 * 1024))
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_FIELD_BYTES:
            raise BadRequest(
                f"Form field {quoted(part.name)} is larger than {MAX_FIELD_BYTES} bytes"
            )
    return bytes(buf)


async def _read_form(
    request: web.Request, publisher: Publisher, limit: int, idle: float, refusal: Refusal,
) -> tuple[UploadForm, Spooled | None]:
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError, LookupError):
        raise BadRequest("Expected a multipart/form-data upload") from None
    form = UploadForm()
    spooled: Spooled | None = None
    try:
        while True:
            part = await _within(idle, reader.next())
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("Nested multipart bodies are not accepted")
            form.count_part()
            if part.name == "content":
                if spooled is not None:
                    raise BadRequest("More than one file in one upload")
                if ":action" in form.fields:
                    check_form_header(form, refusal)  # fail fast, before the bytes arrive
                spooled = await publisher.spool(
                    _part_chunks(part, idle), part.filename or "", limit
                )
            elif part.name:
                form.add(part.name, await _read_field(part, idle))
            else:
                await part.release()
    except (
        ValueError, AssertionError, RuntimeError, LookupError, UnicodeError, HttpProcessingError,
        web.RequestPayloadError,
    ) as exc:
        if spooled is not None:
            spooled.path.unlink(missing_ok=True)
        raise BadRequest(f"Malformed multipart body: {type(exc).__name__}") from None
    except BaseException:
        if spooled is not None:
            spooled.path.unlink(missing_ok=True)
        raise
    return form, spooled


def index_of(request: web.Request, config: Config) -> str:
    """The index an upload goes to: /i/<index>/, a GitLab project's alias, or the
    first index for / and /legacy/. Raises NotFound."""
    info = request.match_info
    registry = config.registry
    if "index" in info:
        name = info["index"]
    elif "gl_project" in info:
        alias = registry.gitlab.project(info["gl_project"])
        if alias is None:
            raise NotFound(f"No GitLab project {quoted(info['gl_project'])} (gitlab.projects)")
        name = alias.index
    else:
        name = registry.first_index.name
    if registry.index(name) is None or name not in request.app[PUBLISHERS]:
        raise NotFound(f"No index named {name}")
    return name


async def upload(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    metrics = request.app[METRICS]
    limit = config.limits.max_upload
    try:
        index = index_of(request, config)
        publisher = request.app[PUBLISHERS][index]
        identity = request.get(IDENTITY, ANONYMOUS)

        def refusal(name: NormalizedName) -> str | None:
            if not matches_any(name, identity.projects):
                metrics.count(metrics.auth_failures, "oidc_scope")
                return f"Token {identity.name} may not publish {name} (its projects)"
            why = upload_refusal(identity, index, name, config.registry)
            if why is not None and identity.provenance:
                metrics.count(metrics.auth_failures, "oidc_scope")
            return why

        if request.content_length is not None and request.content_length > limit + _ENVELOPE:
            raise TooLarge(f"File too large: the limit is {limit} bytes (limits.max_upload)")
        form, spooled = await _read_form(
            request, publisher, limit, config.limits.idle_timeout, refusal
        )
        if spooled is None:
            check_form_header(form, refusal)
            raise BadRequest("Missing the 'content' file part")
        outcome = await publisher.publish(form, spooled, config, refusal,
                                          published_by=dict(identity.provenance) or None)
    except ProxyError as exc:
        # After a 413 aiohttp lingers, discarding what the client still sends,
        # so that twine gets to read the reason instead of a broken pipe.
        metrics.uploads.labels("rejected" if exc.status < 500 else "error").inc()
        raise
    metrics.uploads.labels(outcome).inc()
    # GitLab answers a stored upload with 201; twine takes any 2xx.
    status = 201 if "gl_project" in request.match_info and outcome == "stored" else 200
    if outcome == "duplicate":
        return web.Response(text="OK: identical file already stored; nothing changed\n")
    return web.Response(status=status, text="OK\n")
