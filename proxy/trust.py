"""Trusted publishing: an ID token in, a minted upload token out; and both checked at use.

Ties the pure checks (oidc.py), the issuers' keys (jwks.py), the record of
exchanged tokens (replay.py) and the minted token (minted.py) together.
Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from . import minted, oidc
from .config import Auth, Config, TrustedPublisher
from .errors import ServiceUnavailable
from .jwks import IssuerUnavailable, KeySets
from .replay import ReplayGuard, SharedReplay


class TrustedPublishing:
    """Exchanges and checks tokens against the live auth config handed in per call."""

    def __init__(self, keysets: KeySets, replay: ReplayGuard, config: Config,
                 shared: SharedReplay | None = None) -> None:
        self._keysets = keysets
        self._replay = replay
        # Replicas on S3: the record every replica checks (the local one alone
        # would let an ID token be exchanged once per host).
        self._shared = shared
        # Where the signing key is, as at start: a reload does not move it.
        self._config = config
        self._key: bytes | None = None
        self._key_lock = asyncio.Lock()

    async def signing_key(self) -> bytes:
        """Raises minted.KeyFileError."""
        if self._key is None:
            async with self._key_lock:
                if self._key is None:
                    self._key = await asyncio.to_thread(minted.load_key, self._config)
        return self._key

    async def _verified(
        self, token: str, publishers: tuple[TrustedPublisher, ...], *, read: bool,
    ) -> tuple[TrustedPublisher, dict[str, Any]]:
        """Raises oidc.Refusal, IssuerUnavailable."""
        if not publishers:
            raise oidc.Refusal("not-enabled", "oidc_disabled",
                               "Trusted publishing is not enabled here (auth.trusted_publishers)")
        peeked = oidc.peek(token, publishers)
        jwk = await self._keysets.key(peeked.issuer, peeked.kid)
        claims = oidc.verify(token, jwk, peeked, publishers, require_jti=not read)
        return oidc.match(claims, publishers, read=read), claims

    async def mint(self, token: str, auth: Auth) -> tuple[str, minted.Minted]:
        """The upload token for a valid, unused ID token of a configured publisher.

        Raises oidc.Refusal (422), IssuerUnavailable and ServiceUnavailable (503).
        """
        publisher, claims = await self._verified(token, auth.trusted_publishers, read=False)
        try:
            key = await self.signing_key()
        except minted.KeyFileError as exc:
            raise ServiceUnavailable(f"Cannot mint: auth.signing_key_file: {exc}") from None
        try:
            fresh = await asyncio.to_thread(
                self._replay.claim, claims["iss"], claims["jti"],
                float(claims["exp"]) + oidc.LEEWAY)
        except sqlite3.Error:
            # Fail closed: an unchecked token could be a replay.
            raise ServiceUnavailable("Cannot check the ID token against replays now; "
                                     "try again later") from None
        if fresh and self._shared is not None:
            fresh = await self._shared.claim(claims["iss"], claims["jti"],
                                             float(claims["exp"]) + oidc.LEEWAY)
        if not fresh:
            raise oidc.Refusal("invalid-reuse-token", "oidc_replay",
                               "invalid token: already used (its jti was exchanged before)")
        return minted.sign(key, publisher.name, oidc.provenance(publisher, claims),
                           int(time.time()), auth.mint_lifetime)

    async def reader(self, token: str, auth: Auth) -> TrustedPublisher:
        """The publisher with read: true whose ID token this is. Not single-use:
        pip sends the same credentials with every request.

        Raises oidc.Refusal, ServiceUnavailable (the issuer's keys cannot be had).
        """
        try:
            publisher, _claims = await self._verified(token, auth.trusted_publishers, read=True)
        except IssuerUnavailable:
            raise ServiceUnavailable("The ID token's issuer cannot be reached to check it; "
                                     "try again later") from None
        return publisher

    async def uploader(self, token: str, auth: Auth) -> tuple[TrustedPublisher,
                                                              Mapping[str, str]]:
        """The publisher a minted token was made for, and its provenance.

        Raises minted.MintedRefused.
        """
        try:
            key = await self.signing_key()
        except minted.KeyFileError:
            raise minted.MintedRefused("minted_invalid", "Invalid upload token") from None
        grant = minted.verify(key, token)
        for publisher in auth.trusted_publishers:
            if publisher.name == grant.publisher:
                return publisher, grant.provenance
        raise minted.MintedRefused(
            "minted_invalid",
            f"Upload token of trusted publisher {grant.publisher}, which is no longer configured")
