"""The pure parts of trusted publishing, in process: ID token checks, minted tokens,
the jti record and the config keys. The server end to end is test_trusted_publishing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import minted, oidc
from proxy.config import ConfigError, TrustedPublisher, build_config
from proxy.replay import ReplayGuard
from tests.support.oidc_issuer import OIDCIssuer, github_claims, gitlab_claims

GITLAB = "https://gitlab.example.com"
GITHUB = "https://token.actions.githubusercontent.com"


@pytest.fixture(scope="module")
def keys() -> OIDCIssuer:
    return OIDCIssuer()  # keys only; not started


def _publishers() -> tuple[TrustedPublisher, ...]:
    config = build_config({"auth": {"trusted_publishers": [
        {"name": "platform", "issuer": GITLAB,
         "claims": {"project_path": "acme/platform", "ref_protected": "true"},
         "projects": ["acme-*"]},
        {"name": "tools", "issuer": GITHUB, "claims": {"repository": "acme/tools"},
         "projects": ["acme-tools"], "read": True},
    ]}})
    return config.auth.trusted_publishers


def _check(token: str, issuer: OIDCIssuer, *, read: bool = False) -> TrustedPublisher:
    pubs = _publishers()
    peeked = oidc.peek(token, pubs)
    jwk = next(k for k in issuer.public_jwks() if k["kid"] == peeked.kid)
    claims = oidc.verify(token, jwk, peeked, pubs, require_jti=not read)
    return oidc.match(claims, pubs, read=read)


def _refused(token: str, issuer: OIDCIssuer, jwk: dict[str, Any] | None = None) -> oidc.Refusal:
    pubs = _publishers()
    with pytest.raises(oidc.Refusal) as info:
        peeked = oidc.peek(token, pubs)
        key = jwk or next(k for k in issuer.public_jwks() if k["kid"] == peeked.kid)
        claims = oidc.verify(token, key, peeked, pubs)
        oidc.match(claims, pubs)
    return info.value


def test_gitlab_rs256_and_github_es256_tokens_match_their_publishers(keys: OIDCIssuer) -> None:
    gitlab = keys.mint(gitlab_claims(), iss=GITLAB)
    github = keys.mint(github_claims(), iss=GITHUB, alg="ES256")
    assert _check(gitlab, keys).name == "platform"
    assert _check(github, keys).name == "tools"


@pytest.mark.parametrize(("case", "label", "words"), [
    ("wrong aud", "oidc_audience", "audience"),
    ("two audiences", "oidc_audience", "2 audiences"),
    ("wrong iss", "oidc_issuer", "Unknown trusted publishing issuer"),
    ("expired", "oidc_expired", "expired"),
    ("nbf ahead", "oidc_not_yet_valid", "not yet valid"),
    ("iat ahead", "oidc_not_yet_valid", "not yet valid"),
    ("bad signature", "oidc_signature", "signature"),
    ("alg none", "oidc_algorithm", "none"),
    ("alg HS256", "oidc_algorithm", "HS256"),
    ("no jti", "oidc_malformed", "jti"),
    ("claim differs", "oidc_claims", "ref_protected"),
    ("not a jwt", "oidc_malformed", "Malformed"),
])
def test_each_refusal_names_its_reason(keys: OIDCIssuer, case: str, label: str,
                                       words: str) -> None:
    claims = gitlab_claims()
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = {
        "wrong aud": lambda: keys.mint(claims, iss=GITLAB, aud="pypi"),
        "two audiences": lambda: keys.mint(claims, iss=GITLAB, aud=["indexguard", "other"]),
        "wrong iss": lambda: keys.mint(claims, iss="https://gitlab.attacker.example"),
        "expired": lambda: keys.mint(claims, iss=GITLAB, now=now - 3600, lifetime=300),
        "nbf ahead": lambda: keys.mint(claims | {"nbf": now + 600}, iss=GITLAB),
        "iat ahead": lambda: keys.mint(claims | {"iat": now + 600, "nbf": now}, iss=GITLAB),
        "bad signature": lambda: keys.mint(claims, iss=GITLAB, key=other),
        "alg none": lambda: keys.unsigned(claims | {"iss": GITLAB}),
        "alg HS256": lambda: keys.mint(claims, iss=GITLAB, alg="HS256", key=b"k" * 32),
        "no jti": lambda: keys.mint(claims, iss=GITLAB, drop=("jti",)),
        "claim differs": lambda: keys.mint(gitlab_claims(ref_protected="false"), iss=GITLAB),
        "not a jwt": lambda: "not.a.jwt",
    }[case]()
    refusal = _refused(token, keys)
    assert refusal.label == label
    assert words in refusal.description
    assert "\n" not in refusal.description


def test_the_refusal_never_shows_the_value_a_publisher_wants(keys: OIDCIssuer) -> None:
    token = keys.mint(gitlab_claims(project_path="evil/fork"), iss=GITLAB)
    refusal = _refused(token, keys)
    assert "project_path" in refusal.description
    assert "acme/platform" not in refusal.description


def test_an_ec_key_never_checks_an_rs256_token(keys: OIDCIssuer) -> None:
    token = keys.mint(gitlab_claims(), iss=GITLAB, kid=keys.ec_kid)  # RS256, names the EC key
    ec_jwk = next(k for k in keys.public_jwks() if k["kid"] == keys.ec_kid)
    assert _refused(token, keys, ec_jwk).label == "oidc_signature"


def test_reads_need_a_publisher_with_read_true(keys: OIDCIssuer) -> None:
    assert _check(keys.mint(github_claims(), iss=GITHUB), keys, read=True).name == "tools"
    with pytest.raises(oidc.Refusal) as info:
        _check(keys.mint(gitlab_claims(), iss=GITLAB), keys, read=True)
    assert "read: true" in info.value.description


def test_provenance_keeps_the_ci_claims_bounded(keys: OIDCIssuer) -> None:
    pub = _publishers()[1]
    found = oidc.provenance(pub, github_claims(ref="x" * 1000))
    assert found["publisher"] == "tools"
    assert found["repository"] == "acme/tools"
    assert found["job_workflow_ref"].startswith("acme/tools/.github/workflows/release.yml@")
    assert len(found["ref"]) == 200


def test_minted_token_round_trip_expiry_and_tampering() -> None:
    key = b"k" * 48
    now = int(time.time())
    token, grant = minted.sign(key, "platform", {"project_path": "acme/platform"}, now, 900)
    assert token.startswith(minted.PREFIX)
    assert grant.expires == now + 900
    back = minted.verify(key, token)
    assert (back.publisher, dict(back.provenance)) == ("platform", {"project_path":
                                                                   "acme/platform"})
    old, _ = minted.sign(key, "platform", {}, now - 1000, 900)
    with pytest.raises(minted.MintedRefused) as info:
        minted.verify(key, old)
    assert info.value.label == "minted_expired"
    with pytest.raises(minted.MintedRefused) as info:
        minted.verify(b"x" * 48, token)  # another replica's key, or a forgery
    assert info.value.label == "minted_invalid"


def test_a_missing_default_key_is_created_0600_and_kept(tmp_path: Path) -> None:
    config = build_config({"data_dir": str(tmp_path)})
    first = minted.load_key(config)
    path = tmp_path / minted.DEFAULT_KEY_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert minted.load_key(config) == first and len(first) >= minted.MIN_KEY_BYTES


def test_a_configured_key_file_must_exist_and_be_long_enough(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    for path, words in ((tmp_path / "absent.key", "cannot read"), (short, "at least 32")):
        config = build_config({"data_dir": str(tmp_path),
                               "auth": {"signing_key_file": str(path)}})
        with pytest.raises(minted.KeyFileError, match=words):
            minted.load_key(config)


def test_replay_guard_refuses_a_second_claim_until_expiry(tmp_path: Path) -> None:
    guard = ReplayGuard(tmp_path / "jti.sqlite3")
    guard.open()
    other = ReplayGuard(tmp_path / "jti.sqlite3")  # another worker's connection
    other.open()
    try:
        now = time.time()
        assert guard.claim("iss", "abc", now + 60, now=now)
        assert not other.claim("iss", "abc", now + 60, now=now)
        assert other.claim("iss2", "abc", now + 60, now=now)
        assert other.claim("iss", "abc", now + 200, now=now + 120)  # the first expired
    finally:
        guard.close()
        other.close()


@pytest.mark.parametrize(("entry", "problem"), [
    ({"issuer": GITLAB, "claims": {"project_path": "a/b"}, "projects": ["x"]},
     "auth.trusted_publishers[0].name: required"),
    ({"name": "p", "issuer": "http://gitlab.example.com", "claims": {"project_path": "a/b"},
      "projects": ["x"]}, "auth.trusted_publishers[0].issuer: "),
    ({"name": "p", "issuer": GITLAB, "claims": {"ref": "main"}, "projects": ["x"]},
     "auth.trusted_publishers[0].claims: must pin a project or repository"),
    ({"name": "p", "issuer": GITLAB, "claims": {"project_path": "a/b"}},
     "auth.trusted_publishers[0].projects: required"),
    ({"name": "p", "issuer": GITLAB, "claims": {"project_path": "a/b"}, "projects": ["x"],
      "index": "nope"}, "auth.trusted_publishers[0].index: no index named 'nope'"),
    ({"name": "p", "issuer": GITLAB, "claims": {"project_path": "a/b"}, "projects": ["x"],
      "colour": 1}, "auth.trusted_publishers[0].colour: unknown key"),
])
def test_bad_publisher_config_names_the_key(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"auth": {"trusted_publishers": [entry]}})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_mint_lifetime_is_at_most_15_minutes() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"auth": {"mint_lifetime": "1h"}})
    assert info.value.problems[0].startswith("auth.mint_lifetime: at most 15m")
