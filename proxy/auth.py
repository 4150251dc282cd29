"""HTTP Basic credentials -> token, scopes, expiry; failures rate-limited per client.

Secrets are only ever hashed (sha256) and compared in constant time; nothing here
logs or stores a secret.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from .config import Auth, Token
from .errors import Forbidden, TooManyRequests, Unauthorized

# Failed attempts allowed per client in a window before 429s (brute-force guard).
MAX_FAILURES = 20
FAILURE_WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    scopes: frozenset[str]


ANONYMOUS = Identity("anonymous", frozenset())


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return "ig_" + secrets.token_urlsafe(32)


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(username, password) from an Authorization header, None when absent.

    Raises Unauthorized for a malformed header.
    """
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("Only HTTP Basic authentication is supported")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("Malformed Basic credentials") from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise Unauthorized("Malformed Basic credentials")
    return user, password


class Authenticator:
    """Checks credentials against the live auth config; remembers failures per client."""

    def __init__(self) -> None:
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def limiting(self) -> bool:
        """Whether any client is being counted toward the failure limit."""
        return bool(self._failures)

    def identify(
        self, header: str | None, auth: Auth, client: str, today: dt.date | None = None,
    ) -> Identity:
        """The caller's identity. Raises Unauthorized, TooManyRequests."""
        self._check_rate(client)
        creds = parse_basic(header)
        if creds is None:
            return ANONYMOUS
        user, password = creds
        token = self._match(user, password, auth.tokens)
        if token is None:
            self._fail(client)
            raise Unauthorized("Invalid credentials")
        if token.expires is not None and token.expires < (today or dt.date.today()):
            self._fail(client)
            raise Unauthorized(f"Token {token.name} expired on {token.expires.isoformat()}")
        return Identity(token.name, token.scopes)

    @staticmethod
    def _match(user: str, password: str, tokens: tuple[Token, ...]) -> Token | None:
        digest = hash_secret(password)
        found: Token | None = None
        # Compare against every token so the time taken does not tell which matched.
        for token in tokens:
            name_ok = user in ("__token__", token.name)
            if hmac.compare_digest(digest, token.sha256) and name_ok and found is None:
                found = token
        return found

    @staticmethod
    def require(identity: Identity, scope: str, auth: Auth) -> None:
        """Raises Unauthorized (no credentials) or Forbidden (missing scope)."""
        if scope == "read" and auth.anonymous_read:
            return
        if scope in identity.scopes:
            return
        if identity is ANONYMOUS:
            raise Unauthorized("Authentication required")
        raise Forbidden(f"Token {identity.name} lacks the {scope!r} scope")

    def _check_rate(self, client: str) -> None:
        stamps = self._failures.get(client)
        if stamps is None:
            return
        cutoff = time.monotonic() - FAILURE_WINDOW
        while stamps and stamps[0] < cutoff:
            stamps.pop(0)
        if not stamps:
            del self._failures[client]
        elif len(stamps) >= MAX_FAILURES:
            raise TooManyRequests()

    def _fail(self, client: str) -> None:
        self._failures.setdefault(client, []).append(time.monotonic())
        self._failures.move_to_end(client)
        while len(self._failures) > 10_000:
            self._failures.popitem(last=False)
