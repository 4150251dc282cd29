"""HTTP Basic credentials -> token, scopes, expiry; failed logins limited per (client, user).

Secrets are only ever hashed (sha256) and compared in constant time; nothing here
logs or stores a secret. The limit counts failures only: valid credentials are
never refused by it, and a request without credentials never meets it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import NoReturn

from .config import Auth, IPNetwork, Token
from .errors import Forbidden, TooManyRequests, Unauthorized
from .login_limit import FailureLimit
from .minted import PREFIX as MINTED_PREFIX
from .minted import MintedRefused
from .oidc import Refusal
from .trust import TrustedPublishing

log = logging.getLogger("indexguard.auth")

# Scopes a request without credentials has while auth.anonymous_read is on.
OPEN_SCOPES = frozenset({"read", "metrics"})
# X-Forwarded-For hops looked at, from the right.
_MAX_HOPS = 32
# The username that sends a CI's OIDC ID token as the password (reads).
OIDC_USER = "__oidc__"


class CredentialsRefused(Unauthorized):
    """An Unauthorized with the bounded reason it is counted under."""

    def __init__(self, reason: str, label: str) -> None:
        super().__init__(reason)
        self.label = label


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    scopes: frozenset[str]
    # fnmatch patterns of the token: the indexes it writes to (and reads alone),
    # the groups it reads. Default: all.
    indexes: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ("*",)
    # The names it may publish (a trusted publisher's projects). Default: all.
    projects: tuple[str, ...] = ("*",)
    # Who published, for the file record: a minted token's publisher and CI claims.
    provenance: tuple[tuple[str, str], ...] = ()


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


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...],
) -> str:
    """Whom a failed login is charged to: the peer, or, when the peer is a trusted
    proxy (listen.trusted_proxies), the right-most X-Forwarded-For address that
    is not one. Hops left of that were written by the client and prove nothing."""
    if peer is None:
        return "-"
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    client = peer
    for hop in reversed(forwarded_for.split(",")[-_MAX_HOPS:]):
        address = _ip(hop)
        if address is None:
            # A trusted proxy appends real addresses; this one came from the
            # client. Charge the proxy rather than let the client pick its key.
            return peer
        client = str(address)
        if not any(address in net for net in trusted):
            return client
    return client


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    address = _ip(peer)
    return address is not None and any(address in net for net in trusted)


class Authenticator:
    """Checks credentials against the live auth config; counts failures in a FailureLimit."""

    def __init__(self, failures: FailureLimit, trust: TrustedPublishing | None = None) -> None:
        self._failures = failures
        self._trust = trust
        self._store_warned = 0.0

    async def identify(
        self, header: str | None, auth: Auth, client: str, today: dt.date | None = None,
        *, any_user: bool = False,
    ) -> Identity:
        """The caller's identity. Raises Unauthorized, or TooManyRequests when this
        (client, username) failed too often: only ever for credentials that fail.

        any_user: the username is ignored, as GitLab does on its package URLs
        (CI sends gitlab-ci-token); failures are then charged to one key per
        client, so that a new username per guess buys no extra tries."""
        try:
            creds = parse_basic(header)
        except Unauthorized as exc:
            await self._failed(client, "", exc)
        if creds is None:
            return ANONYMOUS
        user, password = creds
        if self._trust is not None and auth.trusted_publishers:
            if password.startswith(MINTED_PREFIX) and (any_user or user == "__token__"):
                return await self._minted(password, auth, client, user)
            if user == OIDC_USER:
                return await self._id_token(password, auth, client)
        token = self._match(user, password, auth.tokens, any_user)
        if any_user:
            user = "*"
        if token is None:
            await self._failed(client, user, Unauthorized("Invalid credentials"))
        if token.expires is not None and token.expires < (today or dt.date.today()):
            await self._failed(client, user, Unauthorized(
                f"Token {token.name} expired on {token.expires.isoformat()}"))
        return Identity(token.name, token.scopes, token.indexes, token.groups)

    async def _minted(self, password: str, auth: Auth, client: str, user: str) -> Identity:
        """A trusted publisher's minted upload token: write to its index, its names."""
        assert self._trust is not None
        try:
            publisher, provenance = await self._trust.uploader(password, auth)
        except MintedRefused as exc:
            await self._failed(client, user, CredentialsRefused(exc.reason, exc.label))
        return Identity(f"oidc:{publisher.name}", frozenset({"write"}), (publisher.index,), (),
                        projects=publisher.projects, provenance=tuple(provenance.items()))

    async def _id_token(self, password: str, auth: Auth, client: str) -> Identity:
        """A CI's ID token (username __oidc__) of a publisher with read: true."""
        assert self._trust is not None
        try:
            publisher = await self._trust.reader(password, auth)
        except Refusal as exc:
            await self._failed(client, OIDC_USER, CredentialsRefused(
                f"ID token refused: {exc.description}", exc.label))
        return Identity(f"oidc:{publisher.name}", frozenset({"read"}), (publisher.index,),
                        publisher.groups, projects=())

    async def _failed(self, client: str, user: str, exc: Unauthorized) -> NoReturn:
        try:
            over = await asyncio.to_thread(self._failures.fail, client, user)
        except sqlite3.Error as err:
            # Fail open: credentials are still checked, only the count is lost.
            over = False
            if time.monotonic() - self._store_warned > 60:
                self._store_warned = time.monotonic()
                log.warning("failed-login count unavailable", extra={"reason": str(err)})
        if over:
            raise TooManyRequests()
        raise exc

    @staticmethod
    def _match(
        user: str, password: str, tokens: tuple[Token, ...], any_user: bool = False,
    ) -> Token | None:
        digest = hash_secret(password)
        found: Token | None = None
        # Compare against every token so the time taken does not tell which matched.
        for token in tokens:
            name_ok = any_user or user in ("__token__", token.name)
            if hmac.compare_digest(digest, token.sha256) and name_ok and found is None:
                found = token
        return found

    @staticmethod
    def require(identity: Identity, scope: str, auth: Auth) -> None:
        """Raises Unauthorized (no credentials) or Forbidden (missing scope)."""
        if scope in OPEN_SCOPES and auth.anonymous_read:
            return
        if scope in identity.scopes or (scope == "metrics" and "admin" in identity.scopes):
            return
        if identity is ANONYMOUS:
            raise Unauthorized("Authentication required")
        raise Forbidden(f"Token {identity.name} lacks the {scope} scope")
