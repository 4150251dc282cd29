"""The OIDC issuers' signing keys: discovery document -> JWKS, cached per issuer.

The one place that talks to an issuer. Only issuers some trusted publisher names
are ever asked (oidc.peek refuses the others first); the JWKS must sit on the
issuer's own origin; no redirect is followed; every body and wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .errors import quoted
from .oidc import Refusal

log = logging.getLogger("indexguard.oidc")

# A discovery document or a JWKS larger than this is not an issuer's.
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_KEYS = 100
TIMEOUT = 5.0
# Keys are kept this long; an unknown kid refetches sooner (key rotation).
KEYS_TTL = 900.0
# After a refetch for an unknown kid, the next such refetch of that issuer waits
# this long: a flood of made-up kids costs the issuer one request per window.
UNKNOWN_KID_COOLDOWN = 10.0


class IssuerUnavailable(Exception):
    """The issuer's keys cannot be had now (down, slow, or answering garbage)."""


@dataclass(slots=True)
class _KeySet:
    keys: dict[str, dict[str, Any]]
    fetched: float
    refetched_for_kid: float = -1e9
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class KeySets:
    """JWKS per issuer. start() and close() own the HTTP session."""

    def __init__(self, user_agent: str, timeout: float = TIMEOUT) -> None:
        self._user_agent = user_agent
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._sets: dict[str, _KeySet] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": self._user_agent, "Accept": "application/json"},
            # An issuer's proxy settings are not ours to take from the environment.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key(self, issuer: str, kid: str) -> dict[str, Any]:
        """The JWK the issuer publishes under kid.

        Raises Refusal (oidc_unknown_key) when the issuer does not publish it,
        even after one refetch; IssuerUnavailable when its keys cannot be had.
        """
        known = self._sets.get(issuer)
        now = time.monotonic()
        if known is not None and kid in known.keys and now - known.fetched < KEYS_TTL:
            return known.keys[kid]
        if known is None:
            known = self._sets.setdefault(issuer, _KeySet({}, -1e9))
        async with known.lock:  # one fetch per issuer at a time; the others wait for it
            now = time.monotonic()
            fresh = now - known.fetched < KEYS_TTL
            if kid in known.keys and fresh:
                return known.keys[kid]
            if not fresh or now - known.refetched_for_kid >= UNKNOWN_KID_COOLDOWN:
                if fresh:
                    known.refetched_for_kid = now
                try:
                    known.keys = await self._fetch(issuer)
                    known.fetched = time.monotonic()
                except IssuerUnavailable:
                    if kid in known.keys:  # the issuer is down: its known keys still sign
                        log.warning("issuer keys not refreshed; using the ones held",
                                    extra={"issuer": issuer})
                        return known.keys[kid]
                    raise
            if kid in known.keys:
                return known.keys[kid]
        raise Refusal("invalid-token", "oidc_unknown_key",
                      f"ID token signed by key {quoted(kid, 60)}, which its issuer does "
                      "not publish")

    async def _fetch(self, issuer: str) -> dict[str, dict[str, Any]]:
        discovery = issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self._get_json(discovery)
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            raise IssuerUnavailable(f"{discovery} names another issuer")
        jwks_uri = doc.get("jwks_uri")
        # The keys must come from the issuer's own origin: a discovery document
        # is not allowed to send the proxy anywhere else.
        if not isinstance(jwks_uri, str) or _origin(jwks_uri) != _origin(issuer):
            raise IssuerUnavailable(f"{discovery}: jwks_uri is not on the issuer's origin")
        jwks = await self._get_json(jwks_uri)
        raw = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(raw, list):
            raise IssuerUnavailable(f"{jwks_uri} holds no keys list")
        keys: dict[str, dict[str, Any]] = {}
        for item in raw[:MAX_KEYS]:
            if isinstance(item, dict) and isinstance(item.get("kid"), str):
                keys[item["kid"]] = item
        log.info("issuer keys fetched", extra={"issuer": issuer, "keys": len(keys)})
        return keys

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            raise IssuerUnavailable("not started")
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise IssuerUnavailable(f"{url} answered {resp.status}")
                if (resp.content_length or 0) > MAX_DOCUMENT_BYTES:
                    raise IssuerUnavailable(f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise IssuerUnavailable(
                            f"{url} is larger than {MAX_DOCUMENT_BYTES} bytes")
            return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            raise IssuerUnavailable(f"{url}: {type(exc).__name__}") from None
