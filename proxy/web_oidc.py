"""GET /_/oidc/audience and POST /_/oidc/mint-token, answered as warehouse (PyPI) does.

uv, twine's users and pypa/gh-action-pypi-publish read these bodies: success is
{"success": true, "token", "expires"}; a refusal is 422 with {"message",
"errors": [{"code", "description"}]}, which uv prints whole.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from .errors import RequestTimeout, ServiceUnavailable
from .jwks import IssuerUnavailable
from .logs import CLIENT
from .oidc import Refusal, error_body
from .state import CONFIG, METRICS, TRUST

log = logging.getLogger("indexguard.oidc")

# {"token": "<a JWT of at most 16 KiB>"} with room for whitespace.
MAX_BODY = 64 * 1024


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def audience(request: web.Request) -> web.Response:
    auth = request.app[CONFIG].current.auth
    if not auth.trusted_publishers:
        return _json(403, json.dumps(
            {"message": "Trusted publishing functionality not enabled"}).encode())
    return _json(200, json.dumps({"audience": auth.oidc_audience}).encode())


async def _token_of(request: web.Request, idle: float) -> str:
    """The "token" of the JSON body. Raises Refusal (invalid-payload), RequestTimeout."""
    too_big = Refusal("invalid-payload", "oidc_malformed", f"Body larger than {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_big
    body = bytearray()
    try:
        while chunk := await asyncio.wait_for(request.content.read(MAX_BODY), idle):
            body += chunk
            if len(body) > MAX_BODY:
                raise too_big
    except TimeoutError:
        raise RequestTimeout(f"Request body stalled for {idle:g}s") from None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal("invalid-payload", "oidc_malformed",
                      'Expected a JSON body {"token": "<ID token>"}') from None
    token = payload.get("token") if isinstance(payload, dict) else None
    if not isinstance(token, str):
        raise Refusal("invalid-payload", "oidc_malformed",
                      'Expected a JSON body {"token": "<ID token>"}')
    return token


async def mint_token(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    metrics = request.app[METRICS]
    client = request.get(CLIENT) or request.remote or "-"
    try:
        token = await _token_of(request, config.limits.idle_timeout)
        upload_token, grant = await request.app[TRUST].mint(token, config.auth)
    except Refusal as exc:
        metrics.count(metrics.auth_failures, exc.label)
        log.warning("token request refused", extra={
            "reason": exc.label, "code": exc.code, "detail": exc.description, "client": client})
        return _json(422, error_body(exc))
    except (IssuerUnavailable, ServiceUnavailable) as exc:
        metrics.count(metrics.auth_failures, "oidc_unavailable")
        log.warning("token request failed: issuer or replay record unavailable",
                    extra={"detail": str(exc), "client": client})
        return _json(503, error_body(Refusal(
            "issuer-unavailable", "oidc_unavailable",
            f"Cannot verify the ID token now; try again later ({exc})")))
    log.info("upload token minted", extra={
        "publisher": grant.publisher, "claims": dict(grant.provenance),
        "expires": grant.expires, "client": client})
    return _json(200, json.dumps(
        {"success": True, "token": upload_token, "expires": grant.expires}).encode())
