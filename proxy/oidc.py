"""A CI's OIDC ID token checked against the configured trusted publishers.

Pure: the signing key comes in as a JWK (jwks.py fetches it); nothing here does
I/O or keeps state. Signatures are PyJWT's (with cryptography), never ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from .config import TrustedPublisher
from .errors import one_line, quoted

# Asymmetric only: an HMAC algorithm would let anyone holding the public key sign.
ALGORITHMS = ("RS256", "ES256")
# Clock skew forgiven on exp, nbf and iat (warehouse's _JWT_LEEWAY).
LEEWAY = 30
# GitHub's and GitLab's ID tokens are about 1.5 KiB; a bigger one is not theirs.
MAX_TOKEN_BYTES = 16 * 1024
# Claims kept as the record of who published a file (provenance), each bounded.
PROVENANCE_CLAIMS = (
    # GitLab
    "project_path", "namespace_path", "ref", "ref_type", "ref_protected", "pipeline_source",
    "pipeline_id", "job_id", "ci_config_ref_uri", "environment",
    # GitHub
    "repository", "repository_owner", "job_workflow_ref", "workflow_ref", "workflow",
    "run_id", "event_name",
    # both
    "sub", "sha",
)
_MAX_CLAIM_CHARS = 200


class Refusal(Exception):
    """Why an ID token is not accepted.

    code: warehouse's error code (what uv and gh-action-pypi-publish show);
    label: the bounded reason of indexguard_auth_failures_total;
    description: one printable line, never the token.
    """

    def __init__(self, code: str, label: str, description: str) -> None:
        self.code = code
        self.label = label
        self.description = one_line(description)
        super().__init__(self.description)


def _malformed(why: str) -> Refusal:
    return Refusal("invalid-payload", "oidc_malformed", f"Malformed ID token: {why}")


@dataclass(frozen=True, slots=True)
class Peeked:
    """What an unverified token says of itself: enough to pick the key to check it with."""

    issuer: str
    kid: str
    alg: str


def peek(token: str, publishers: tuple[TrustedPublisher, ...]) -> Peeked:
    """The token's issuer, key id and algorithm, read without trusting them.

    Raises Refusal for a token that is malformed, uses another algorithm, or
    comes from an issuer no publisher names (so that nobody else is ever asked).
    """
    if not isinstance(token, str) or not token:
        raise _malformed("expected a JWT string")
    if len(token) > MAX_TOKEN_BYTES:
        raise _malformed(f"longer than {MAX_TOKEN_BYTES} bytes")
    try:
        header = jwt.get_unverified_header(token)
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _malformed("not a signed JWT") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise Refusal("invalid-token", "oidc_algorithm",
                      f"ID token algorithm {quoted(alg, 20)} is not accepted "
                      f"(only {', '.join(ALGORITHMS)})")
    issuer = payload.get("iss")
    if not isinstance(issuer, str):
        raise _malformed("no iss claim")
    if not any(p.issuer == issuer for p in publishers):
        raise Refusal("invalid-payload", "oidc_issuer",
                      f"Unknown trusted publishing issuer {quoted(issuer)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 200:
        raise _malformed("no kid (key id) in its header")
    return Peeked(issuer=issuer, kid=kid, alg=alg)


def _key(jwk: Mapping[str, Any], alg: str) -> Any:
    """The public key of a JWK for alg. Raises Refusal when it cannot be one."""
    if jwk.get("alg") not in (None, alg) or jwk.get("use") not in (None, "sig"):
        raise Refusal("invalid-token", "oidc_signature",
                      f"ID token key {quoted(jwk.get('kid'))} is not a {alg} signing key")
    if alg == "ES256" and (jwk.get("kty") != "EC" or jwk.get("crv") != "P-256"):
        raise Refusal("invalid-token", "oidc_signature", "ES256 needs a P-256 key")
    if alg == "RS256" and jwk.get("kty") != "RSA":
        raise Refusal("invalid-token", "oidc_signature", "RS256 needs an RSA key")
    try:
        return jwt.PyJWK(dict(jwk), algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        raise Refusal("invalid-token", "oidc_signature",
                      f"ID token key {quoted(jwk.get('kid'))} is not a usable {alg} key") from None


def verify(
    token: str, jwk: Mapping[str, Any], peeked: Peeked,
    publishers: tuple[TrustedPublisher, ...], *, require_jti: bool = True,
) -> dict[str, Any]:
    """The token's claims, once its signature, iss, aud, exp, nbf and iat hold.

    Raises Refusal naming the first check that fails.
    """
    audiences = sorted({p.audience for p in publishers if p.issuer == peeked.issuer})
    required = ["iss", "aud", "exp", "iat"] + (["jti"] if require_jti else [])
    try:
        claims: dict[str, Any] = jwt.decode(
            token, _key(jwk, peeked.alg), algorithms=[peeked.alg], audience=audiences,
            issuer=peeked.issuer, leeway=LEEWAY,
            options={"require": required, "verify_signature": True, "verify_exp": True,
                     "verify_nbf": True, "verify_iat": True, "verify_aud": True,
                     "verify_iss": True},
        )
    except jwt.ExpiredSignatureError:
        raise Refusal("invalid-token", "oidc_expired", "ID token expired") from None
    except jwt.ImmatureSignatureError as exc:
        raise Refusal("invalid-token", "oidc_not_yet_valid",
                      f"ID token not yet valid ({exc})") from None
    except jwt.InvalidAudienceError:
        raise Refusal("invalid-token", "oidc_audience",
                      "ID token audience (aud) is not this index's; ask GET /_/oidc/audience "
                      "for the one to request") from None
    except jwt.InvalidIssuerError:
        raise Refusal("invalid-token", "oidc_issuer", "ID token issuer (iss) differs") from None
    except jwt.InvalidSignatureError:
        raise Refusal("invalid-token", "oidc_signature",
                      "ID token signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise _malformed(f"the {exc.claim} claim is missing") from None
    except jwt.PyJWTError as exc:
        raise _malformed(type(exc).__name__) from None
    aud = claims["aud"]
    if isinstance(aud, list):
        if len(aud) != 1:
            raise Refusal("invalid-token", "oidc_audience",
                          f"ID token has {len(aud)} audiences; exactly one is accepted")
        claims["aud"] = aud[0]
    jti = claims.get("jti")
    if require_jti and (not isinstance(jti, str) or not jti or len(jti) > 200):
        raise _malformed("jti is not a string")
    return claims


def _text(value: Any) -> str | None:
    """A claim as text, the way config compares it (GitLab sends "true" as text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return None


def match(
    claims: Mapping[str, Any], publishers: tuple[TrustedPublisher, ...], *, read: bool = False,
) -> TrustedPublisher:
    """The first publisher (config order) whose issuer, audience and every claim
    equal the verified token's; with read, only publishers with `read: true`.

    Raises Refusal naming a claim that differs (never the value wanted).
    """
    candidates = [p for p in publishers
                  if p.issuer == claims.get("iss") and p.audience == claims.get("aud")]
    differing: list[str] = []
    no_reads: TrustedPublisher | None = None
    for publisher in candidates:
        wrong = [k for k, v in publisher.claims.items() if _text(claims.get(k)) != v]
        if not wrong and (publisher.read or not read):
            return publisher
        if not wrong:
            no_reads = no_reads or publisher
        differing.extend(k for k in wrong if k not in differing)
    if no_reads is not None:
        raise Refusal("invalid-publisher", "oidc_claims",
                      f"Trusted publisher {no_reads.name} does not allow reads with its ID "
                      "token (read: true)")
    shown = ", ".join(differing[:5]) or "none configured"
    raise Refusal("invalid-publisher", "oidc_claims",
                  f"Valid ID token, but no trusted publisher matches its claims "
                  f"(claims that differ: {shown})")


def provenance(publisher: TrustedPublisher, claims: Mapping[str, Any]) -> dict[str, str]:
    """Who published: the publisher, the issuer and the CI claims worth keeping."""
    found = {"publisher": publisher.name, "issuer": publisher.issuer}
    for key in PROVENANCE_CLAIMS:
        text = _text(claims.get(key))
        if text:
            found[key] = one_line(text, _MAX_CLAIM_CHARS)
    return found


def error_body(refusal: Refusal) -> bytes:
    """Warehouse's 422 body, which uv prints whole."""
    return json.dumps({
        "message": "Token request failed",
        "errors": [{"code": refusal.code, "description": refusal.description}],
    }).encode()
