"""Trusted publishing end to end: a local OIDC issuer, the real server, real twine and uv.

An ID token (GitLab-shaped or GitHub-shaped) is exchanged at /_/oidc/mint-token
for a 15-minute upload token, which twine and `uv publish --trusted-publishing
always` use as the __token__ password; every refusal answers with its reason and
is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.config import S3
from proxy.replay import SharedReplay
from proxy.s3_bucket import Bucket as S3Bucket
from tests.conftest import MakeProxy
from tests.faults.helpers import Answer, basic, call, eventually, sha256_hex, upload
from tests.support.artifacts import build_wheel
from tests.support.clients import installed_version, pip_install, run, twine_upload, uv_bin
from tests.support.oidc_issuer import REQUEST_TOKEN, OIDCIssuer, github_claims, gitlab_claims
from tests.support.s3 import Bucket
from tests.support.server import REPO_ROOT, ProxyServer
from tests.support.tls import TLSFront
from tests.support.upstream import FakeUpstream

ADMIN, ADMIN_SECRET = "ops", "ig_trusted-publishing-admin-secret"
FAILURES = "indexguard_auth_failures_total"


@pytest.fixture
def issuer() -> Iterator[OIDCIssuer]:
    fake = OIDCIssuer().start()
    try:
        yield fake
    finally:
        fake.stop()


def tp_config(issuer: OIDCIssuer, upstream: FakeUpstream, **auth: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url},
        "guard": {"upload_collision": "allow"},
        "indexes": [{"name": "platform", "owns": ["acme-*"]}, {"name": "ml"}],
        "gitlab": {"projects": {"42": "platform"}},
        "auth": {
            "anonymous_read": False,
            "tokens": [{"name": ADMIN, "sha256": sha256_hex(ADMIN_SECRET),
                        "scopes": ["read", "admin"]}],
            "trusted_publishers": [
                {"name": "platform-release", "issuer": issuer.issuer,
                 "claims": {"project_path": "acme/platform", "ref_protected": "true"},
                 "index": "platform", "projects": ["acme-*"]},
                {"name": "tools-release", "issuer": issuer.issuer,
                 "claims": {"repository": "acme/tools",
                            "job_workflow_ref":
                                "acme/tools/.github/workflows/release.yml@refs/heads/main"},
                 "index": "ml", "projects": ["tools-*"], "read": True},
            ],
            **auth,
        },
    }


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    """A sample's value from /metrics (read with the admin token: anonymous reads are off)."""
    text = call(proxy.url + "/metrics",
                headers={"Authorization": basic(ADMIN, ADMIN_SECRET)}).body.decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def mint(proxy: ProxyServer | str, id_token: str) -> tuple[int, dict[str, Any]]:
    base = proxy if isinstance(proxy, str) else proxy.url
    answer = call(base + "/_/oidc/mint-token", "POST",
                  body=json.dumps({"token": id_token}).encode(),
                  headers={"Content-Type": "application/json"})
    return answer.status, json.loads(answer.body)


def minted_token(proxy: ProxyServer, id_token: str) -> str:
    status, body = mint(proxy, id_token)
    assert status == 200, body
    return str(body["token"])


def _wheel(tmp_path: Path, name: str, version: str = "1.0") -> Path:
    return build_wheel(tmp_path / "dist" / f"{name}-{version}", name, version)


def _guard(proxy: ProxyServer) -> dict[str, Any]:
    answer = call(proxy.url + "/-/guard", headers={"Authorization": basic(ADMIN, ADMIN_SECRET)})
    assert answer.status == 200
    return dict(orjson.loads(answer.body))


def _record(proxy: ProxyServer, index: str, name: str) -> dict[str, Any]:
    return dict(orjson.loads((proxy.data_dir / "indexes" / index / name / "index.json")
                             .read_bytes()))


# ------------------------------------------------------------------ success paths

def test_audience_answers_like_warehouse(make_proxy: MakeProxy, issuer: OIDCIssuer,
                                         upstream: FakeUpstream) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    answer = call(proxy.url + "/_/oidc/audience")
    assert (answer.status, json.loads(answer.body)) == (200, {"audience": "indexguard"})
    plain = make_proxy({"upstream": {"url": upstream.url}})
    answer = call(plain.url + "/_/oidc/audience")
    assert answer.status == 403
    assert json.loads(answer.body)["message"] == "Trusted publishing functionality not enabled"
    status, body = mint(plain, "x.y.z")
    assert status == 422 and body["errors"][0]["code"] == "not-enabled"


def test_gitlab_token_mints_and_twine_uploads_with_provenance(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    before = time.time()
    id_token = issuer.mint(gitlab_claims())
    status, body = mint(proxy, id_token)
    assert status == 200 and body["success"] is True
    assert before + 899 <= body["expires"] <= time.time() + 901
    wheel = _wheel(tmp_path, "acme-widget")
    result = twine_upload(proxy.url + "/", [wheel], "__token__", body["token"])
    assert result.returncode == 0, result.stdout + result.stderr
    # The GitLab alias upload route takes it too, whatever the username (gitlab-ci-token).
    second = _wheel(tmp_path, "acme-widget", "2.0")
    result = twine_upload(proxy.url + "/api/v4/projects/42/packages/pypi", [second],
                          "gitlab-ci-token", body["token"])
    assert result.returncode == 0, result.stdout + result.stderr

    record = _record(proxy, "platform", "acme-widget")
    by = record["files"][0]["published_by"]
    assert by["publisher"] == "platform-release"
    assert (by["project_path"], by["ref"], by["pipeline_source"]) == (
        "acme/platform", "main", "push")
    published = _guard(proxy)["trusted_publishing"]["published"]
    assert {p["filename"] for p in published} == {wheel.name, second.name}
    assert all(p["published_by"]["project_path"] == "acme/platform" for p in published)
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    uploads = [ln for ln in lines if ln.get("msg") == "upload"]
    assert uploads and uploads[0]["published_by"]["publisher"] == "platform-release"
    assert body["token"] not in proxy.log_text() and id_token not in proxy.log_text()
    minted_lines = [ln for ln in lines if ln.get("msg") == "upload token minted"]
    assert minted_lines[0]["claims"]["project_path"] == "acme/platform"


def test_github_token_mints_and_twine_uploads(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    token = minted_token(proxy, issuer.mint(github_claims(), alg="ES256"))
    wheel = _wheel(tmp_path, "tools-lib")
    result = twine_upload(proxy.url + "/i/ml/", [wheel], "__token__", token)
    assert result.returncode == 0, result.stdout + result.stderr
    by = _record(proxy, "ml", "tools-lib")["files"][0]["published_by"]
    assert by["repository"] == "acme/tools"
    assert by["job_workflow_ref"] == "acme/tools/.github/workflows/release.yml@refs/heads/main"
    assert by["ref"] == "refs/heads/main"


def _uv_publish_trusted(
    url: str, wheel: Path, env: dict[str, str],
) -> subprocess.CompletedProcess[str]:
    return run([uv_bin(), "publish", "--no-cache", "--trusted-publishing", "always",
                "--publish-url", url + "/", str(wheel)], env=env, timeout=120)


def test_uv_publish_trusted_publishing_over_tls(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """uv asks https://<host>/_/oidc/... whatever the publish URL's scheme, so the proxy
    sits behind TLS on loopback (as behind nginx), trusted through SSL_CERT_FILE."""
    proxy = make_proxy(tp_config(issuer, upstream))
    front = TLSFront(tmp_path, proxy.port).start()
    try:
        ci = {"SSL_CERT_FILE": str(front.ca), "GITHUB_ACTIONS": "", "GITLAB_CI": "true",
              "INDEXGUARD_ID_TOKEN": issuer.mint(gitlab_claims())}
        result = _uv_publish_trusted(front.url, _wheel(tmp_path, "acme-uv"), ci)
        assert result.returncode == 0, result.stdout + result.stderr
        # GitHub Actions: uv fetches the ID token from ACTIONS_ID_TOKEN_REQUEST_URL.
        issuer.github_claims = github_claims()
        gh = {"SSL_CERT_FILE": str(front.ca), "GITHUB_ACTIONS": "true",
              "ACTIONS_ID_TOKEN_REQUEST_URL": issuer.token_request_url,
              "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN}
        result = _uv_publish_trusted(front.url + "/i/ml", _wheel(tmp_path, "tools-uv"), gh)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        front.stop()
    assert _record(proxy, "platform", "acme-uv")["files"][0]["published_by"][
        "project_path"] == "acme/platform"
    assert _record(proxy, "ml", "tools-uv")["files"][0]["published_by"][
        "repository"] == "acme/tools"
    assert ("GET", "/github/token") in issuer.requests


def test_an_id_token_reads_through_the_proxy_when_read_is_true(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    token = minted_token(proxy, issuer.mint(github_claims()))
    assert upload(proxy.url + "/i/ml", _wheel(tmp_path, "tools-lib"), "tools-lib", "1.0",
                  user="__token__", secret=token).status == 200
    id_token = issuer.mint(github_claims())
    index = f"http://__oidc__:{id_token}@127.0.0.1:{proxy.port}/simple/"
    result = pip_install(index, tmp_path / "target", "tools-lib")
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed_version(tmp_path / "target", "tools-lib") == "1.0"
    # A publisher without read: true: its ID token opens nothing.
    gitlab = issuer.mint(gitlab_claims())
    answer = call(proxy.url + "/simple/", headers={"Authorization": basic("__oidc__", gitlab)})
    assert answer.status == 401 and b"read: true" in answer.body
    # Nor does a minted upload token read.
    answer = call(proxy.url + "/simple/", headers={"Authorization": basic("__token__", token)})
    assert answer.status == 403
    # Garbage in either shape is a 401 with a reason, never a 500.
    for user, secret in (("__oidc__", "garbage"), ("__oidc__", "a.b.c"), ("__oidc__", ""),
                         ("__token__", "igm_garbage"), ("__token__", "igm_" + "x" * 5_000)):
        answer = call(proxy.url + "/simple/", headers={"Authorization": basic(user, secret)})
        assert answer.status == 401, (user, secret[:20], answer.body)


# ------------------------------------------------------------------ refusals

def test_every_bad_id_token_is_refused_with_its_reason(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    proxy = make_proxy(tp_config(issuer, upstream))
    claims = gitlab_claims()
    now = int(time.time())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert mint(proxy, issuer.mint(claims))[0] == 200  # keys fetched once
    cases: list[tuple[str, str, str, str]] = [
        # (token, warehouse code, metric reason, words in the description)
        (issuer.mint(claims, aud="pypi"), "invalid-token", "oidc_audience", "audience"),
        (issuer.mint(claims, aud=["indexguard", "pypi"]), "invalid-token", "oidc_audience",
         "2 audiences"),
        (issuer.mint(claims, iss="https://gitlab.attacker.example"), "invalid-payload",
         "oidc_issuer", "Unknown trusted publishing issuer"),
        (issuer.mint(claims, now=now - 7200), "invalid-token", "oidc_expired", "expired"),
        (issuer.mint(claims | {"nbf": now + 600}), "invalid-token", "oidc_not_yet_valid",
         "not yet valid"),
        (issuer.mint(claims, key=stranger), "invalid-token", "oidc_signature", "signature"),
        (issuer.unsigned(claims), "invalid-token", "oidc_algorithm", "none"),
        (issuer.mint(claims, kid="never-published"), "invalid-token", "oidc_unknown_key",
         "not publish"),
        (issuer.mint(gitlab_claims(ref_protected="false")), "invalid-publisher",
         "oidc_claims", "ref_protected"),
        (issuer.mint(gitlab_claims(project_path="acme/fork")), "invalid-publisher",
         "oidc_claims", "project_path"),
    ]
    for token, code, label, words in cases:
        before_jwks = issuer.jwks_requests()
        before = metric(proxy, FAILURES, reason=label)
        status, body = mint(proxy, token)
        assert status == 422, (label, body)
        assert body["message"] == "Token request failed"
        error = body["errors"][0]
        assert error["code"] == code and words in error["description"], (label, error)
        assert eventually(lambda label=label, before=before:
                          metric(proxy, FAILURES, reason=label) == before + 1)
        if label == "oidc_unknown_key":
            assert issuer.jwks_requests() == before_jwks + 1  # refetched once, then refused
        else:
            assert issuer.jwks_requests() == before_jwks
    # The wrong issuer was never contacted: only this issuer's URLs were asked.
    assert all(path.startswith(("/.well-known/", "/oauth/")) for _m, path in issuer.requests)

    replayed = issuer.mint(claims)
    assert mint(proxy, replayed)[0] == 200
    status, body = mint(proxy, replayed)
    assert status == 422 and body["errors"][0]["code"] == "invalid-reuse-token"
    assert metric(proxy, FAILURES, reason="oidc_replay") == 1


def test_replay_is_refused_across_workers(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream) | {"workers": 2})
    token = issuer.mint(gitlab_claims())
    statuses = [mint(proxy, token)[0] for _ in range(6)]  # spread over both workers
    assert statuses.count(200) == 1 and statuses.count(422) == 5


def test_rotated_issuer_key_is_fetched_once(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    assert mint(proxy, issuer.mint(gitlab_claims()))[0] == 200
    issuer.rotate()
    before = issuer.jwks_requests()
    assert mint(proxy, issuer.mint(gitlab_claims()))[0] == 200
    assert issuer.jwks_requests() == before + 1


def test_minted_token_limits_name_index_and_lifetime(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream, mint_lifetime="3s"))
    token = minted_token(proxy, issuer.mint(gitlab_claims()))
    # A name outside the publisher's projects.
    answer = upload(proxy.url, _wheel(tmp_path, "other-thing"), "other-thing", "1.0",
                    user="__token__", secret=token)
    assert answer.status == 403 and b"may not publish other-thing (its projects)" in answer.body
    # Another index than the publisher's.
    answer = upload(proxy.url + "/i/ml", _wheel(tmp_path, "acme-x"), "acme-x", "1.0",
                    user="__token__", secret=token)
    assert answer.status == 403 and b"may not upload to index ml" in answer.body
    assert metric(proxy, FAILURES, reason="oidc_scope") == 2
    # A forged or altered one.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    answer = upload(proxy.url, _wheel(tmp_path, "acme-x"), "acme-x", "1.0",
                    user="__token__", secret=forged)
    assert answer.status == 401 and b"Invalid upload token" in answer.body
    # After its lifetime (3 s here, 15 minutes by default): refused as expired.
    wheel = _wheel(tmp_path, "acme-late")

    def refused() -> bool:
        answer = upload(proxy.url, wheel, "acme-late", "1.0", user="__token__", secret=token)
        assert answer.status in (200, 401)
        return answer.status == 401 and b"Upload token expired" in answer.body

    assert eventually(refused, timeout=15, step=0.5)
    assert metric(proxy, FAILURES, reason="minted_expired") >= 1


def test_a_replica_with_the_same_key_file_takes_the_token(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
) -> None:
    key = tmp_path / "mint.key"
    key.write_text("a-shared-signing-key-of-more-than-32-bytes-0123456789\n")
    key.chmod(0o600)
    one = make_proxy(tp_config(issuer, upstream, signing_key_file=str(key)))
    two = make_proxy(tp_config(issuer, upstream, signing_key_file=str(key)))
    other = make_proxy(tp_config(issuer, upstream))  # its own generated key
    token = minted_token(one, issuer.mint(gitlab_claims()))
    assert upload(two.url, _wheel(tmp_path, "acme-a"), "acme-a", "1.0",
                  user="__token__", secret=token).status == 200
    assert upload(other.url, _wheel(tmp_path, "acme-a"), "acme-a", "1.0",
                  user="__token__", secret=token).status == 401
    generated = other.data_dir / "oidc-mint.key"
    assert generated.stat().st_mode & 0o777 == 0o600


def test_an_id_token_is_exchanged_once_across_replicas_on_one_bucket(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream, tmp_path: Path,
    s3_bucket: Bucket,
) -> None:
    """Each host's own jti record would let a stolen ID token be exchanged once
    per replica; on S3 the record is in the bucket, created only if absent."""
    key = tmp_path / "mint.key"
    key.write_text("a-shared-signing-key-of-more-than-32-bytes-0123456789\n")
    key.chmod(0o600)
    config = tp_config(issuer, upstream, signing_key_file=str(key))
    config["storage"] = s3_bucket.storage_config(prefix="prod/")
    one, two = (make_proxy(config, env=s3_bucket.env()) for _ in range(2))
    id_token = issuer.mint(gitlab_claims())
    assert mint(one, id_token)[0] == 200
    status, body = mint(two, id_token)
    assert status == 422 and body["errors"][0]["code"] == "invalid-reuse-token", body
    assert metric(two, "indexguard_auth_failures_total", reason="oidc_replay") == 1
    # Another token of the same job goes through on either replica.
    assert mint(two, issuer.mint(gitlab_claims()))[0] == 200
    assert len(s3_bucket.keys("prod/oidc-jti/")) == 2


async def test_expired_exchange_markers_are_pruned_from_the_bucket(
    s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    bucket = S3Bucket(S3(bucket=s3_bucket.name, endpoint_url=s3_bucket.endpoint_url,
                         region="us-east-1"))
    await bucket.open()
    try:
        shared = SharedReplay(bucket)
        now = time.time()
        assert await shared.claim("https://ci.example", "old", now - 100)
        assert await shared.claim("https://ci.example", "new", now + 900)
        assert not await shared.claim("https://ci.example", "new", now + 900)
        assert await shared.prune(now) == 1
        assert not await shared.claim("https://ci.example", "new", now + 900)
        assert len(s3_bucket.keys("oidc-jti/")) == 1
    finally:
        await bucket.close()


def test_hostile_issuer_documents_are_refused_and_nothing_else_is_asked(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    elsewhere = upstream.base + "/jwks"
    issuer.scripted["discovery"] = (200, json.dumps(
        {"issuer": issuer.issuer, "jwks_uri": elsewhere}).encode())
    status, body = mint(proxy, issuer.mint(gitlab_claims()))
    assert status == 503 and "not on the issuer's origin" in body["errors"][0]["description"]
    assert not [r for r in upstream.requests if "jwks" in r[1]]
    issuer.scripted.clear()
    issuer.scripted["jwks"] = (200, b'{"keys": [' + b'{"kid": "x"},' * 40_000 + b'{}]}')
    status, body = mint(proxy, issuer.mint(gitlab_claims()))
    assert status == 503 and "larger than" in body["errors"][0]["description"]
    issuer.scripted.clear()
    assert mint(proxy, issuer.mint(gitlab_claims()))[0] == 200


def test_bad_mint_bodies_answer_422_never_500(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    proxy = make_proxy(tp_config(issuer, upstream))
    for body in (b"", b"not json", b"[]", b'{"token": 5}', b"[" * 100_000,
                 json.dumps({"token": "a" * 70_000}).encode()):
        answer: Answer = call(proxy.url + "/_/oidc/mint-token", "POST", body=body)
        assert answer.status == 422, body[:20]
        assert json.loads(answer.body)["errors"][0]["code"] == "invalid-payload"


# ------------------------------------------------------------------ configuration

def _serve(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def test_bad_trusted_publishing_config_exits_2_naming_the_key(
    tmp_path: Path, issuer: OIDCIssuer,
) -> None:
    base: dict[str, Any] = {"data_dir": str(tmp_path / "data"),
                            "listen": {"port": 9}, "upstream": {"url": "http://127.0.0.1:9/"}}
    publisher = {"name": "p", "issuer": issuer.issuer, "claims": {"project_path": "a/b"},
                 "projects": ["a-*"]}
    missing = base | {"auth": {"trusted_publishers": [publisher],
                               "signing_key_file": str(tmp_path / "absent.key")}}
    result = _serve(tmp_path, missing)
    assert result.returncode == 2
    assert "auth.signing_key_file: cannot read" in result.stderr
    unpinned = base | {"auth": {"trusted_publishers": [publisher | {"claims": {"ref": "x"}}]}}
    result = _serve(tmp_path, unpinned)
    assert result.returncode == 2
    assert "auth.trusted_publishers[0].claims: must pin a project or repository" in result.stderr


def test_a_mint_body_arriving_in_pieces_is_read_whole(
    make_proxy: MakeProxy, issuer: OIDCIssuer, upstream: FakeUpstream,
) -> None:
    import socket

    proxy = make_proxy(tp_config(issuer, upstream))
    body = json.dumps({"token": issuer.mint(gitlab_claims())}).encode()
    head = (f"POST /_/oidc/mint-token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head + body[:100])
        time.sleep(0.3)  # the rest comes later, as over a slow link
        sock.sendall(body[100:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"success": true' in answer
