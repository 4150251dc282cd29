"""The short-lived upload token a trusted publisher gets for its ID token.

Self-contained: an HS256 JWT (PyJWT) signed with the key in
auth.signing_key_file, so any replica holding the same key verifies it without
asking anyone. It names the publisher and carries the CI claims (provenance);
what the publisher may do is read from the live config at every use.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt

from .config import Config

log = logging.getLogger("indexguard.oidc")

# What tells a minted token from a configured one in the password field.
PREFIX = "igm_"
_ISSUER = "indexguard"
_AUDIENCE = "indexguard-upload"
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
DEFAULT_KEY_NAME = "oidc-mint.key"
# Provenance carried in a token: at most this many claims.
_MAX_CLAIMS = 32


class KeyFileError(Exception):
    """The signing key file cannot be used; the message says why, on one line."""


class MintedRefused(Exception):
    """A minted token that is not (or no longer) valid. label: the metric reason."""

    def __init__(self, label: str, reason: str) -> None:
        self.label = label
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Minted:
    publisher: str
    provenance: Mapping[str, str]
    expires: int


def key_path(config: Config) -> Path:
    return config.auth.signing_key_file or config.data_dir / DEFAULT_KEY_NAME


def load_key(config: Config) -> bytes:
    """The signing key. Without auth.signing_key_file, data_dir/oidc-mint.key,
    created (mode 0600) when missing: fine for one host; replicas must share one.
    Blocking. Raises KeyFileError.
    """
    path = key_path(config)
    if config.auth.signing_key_file is None and not path.exists():
        _create(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is not a regular file")
        if info.st_size > MAX_KEY_BYTES:
            raise KeyFileError(f"{path} is larger than {MAX_KEY_BYTES} bytes")
        key = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyFileError(f"{path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are "
                           "needed (openssl rand -base64 48)")
    if info.st_mode & 0o007:
        log.warning("signing key file is readable by others: whoever reads it can mint "
                    "upload tokens", extra={"path": str(path)})
    return key


def _create(path: Path) -> None:
    """A new random key, written whole before it appears (two workers starting
    at once: the second link fails and that worker reads the first one's key)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
            log.info("created a signing key for minted upload tokens; replicas must share "
                     "it (auth.signing_key_file)", extra={"path": str(path)})
        except FileExistsError:
            pass
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def sign(key: bytes, publisher: str, provenance: Mapping[str, str], now: int,
         lifetime: float) -> tuple[str, Minted]:
    """(the token, what it says). Pure."""
    expires = now + int(lifetime)
    claims = dict(list(provenance.items())[:_MAX_CLAIMS])
    token = jwt.encode({
        "iss": _ISSUER, "aud": _AUDIENCE, "sub": publisher, "iat": now, "nbf": now,
        "exp": expires, "jti": uuid.uuid4().hex, "oidc": claims,
    }, key, algorithm="HS256")
    return PREFIX + token, Minted(publisher, claims, expires)


def verify(key: bytes, token: str) -> Minted:
    """What a minted token says, once its signature and lifetime hold.

    Raises MintedRefused (minted_expired, minted_invalid).
    """
    if not token.startswith(PREFIX) or len(token) > 16 * 1024:
        raise MintedRefused("minted_invalid", "Invalid upload token")
    try:
        # No leeway: the token was made by this clock (or a replica's, kept in sync).
        claims = jwt.decode(
            token[len(PREFIX):], key, algorithms=["HS256"], audience=_AUDIENCE,
            issuer=_ISSUER, options={"require": ["exp", "iat", "sub", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise MintedRefused("minted_expired",
                            "Upload token expired; mint a new one (they live 15 minutes)"
                            ) from None
    except jwt.PyJWTError:
        raise MintedRefused("minted_invalid", "Invalid upload token") from None
    raw = claims.get("oidc")
    provenance = ({str(k): str(v) for k, v in raw.items()}
                  if isinstance(raw, dict) else {})
    return Minted(str(claims["sub"]), provenance, int(claims["exp"]))
