"""OIDCIssuer: a local OIDC issuer on 127.0.0.1 (discovery + JWKS), as GitLab and GitHub run.

Its RSA and EC keys are generated per run; it mints GitLab-shaped and
GitHub-shaped ID tokens, rotates keys, answers GitHub Actions' ID token request
(ACTIONS_ID_TOKEN_REQUEST_URL) and keeps a log of every request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

REQUEST_TOKEN = "actions-request-token"  # what ACTIONS_ID_TOKEN_REQUEST_TOKEN holds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OIDCIssuer:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str]] = []
        self.rsa_kid = "rsa-1"
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_kid = "ec-1"
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self._rotations = 1
        # What GET /github/token signs (GitHub Actions' ID token request).
        self.github_claims: dict[str, Any] = {}
        # Raw JSON to answer instead of the discovery document or JWKS (hostile issuer).
        self.scripted: dict[str, tuple[int, bytes]] = {}

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> OIDCIssuer:
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(target=self._serve, args=(loop, started),
                                  name="oidc-issuer", daemon=True)
        thread.start()
        started.result(timeout=15)
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._loop = self._thread = None

    def _serve(self, loop: asyncio.AbstractEventLoop,
               started: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/oauth/discovery/keys", self._jwks)
        app.router.add_get("/github/token", self._github_token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self._port = int(runner.addresses[0][1])
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    # ----------------------------------------------------------------- addresses
    @property
    def issuer(self) -> str:
        """The `iss` of its tokens: scheme://host:port, no trailing slash, as GitLab's."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def token_request_url(self) -> str:
        """ACTIONS_ID_TOKEN_REQUEST_URL (GitHub adds ?api-version=...; uv appends &audience=)."""
        return f"{self.issuer}/github/token?api-version=2.0"

    # ----------------------------------------------------------------- request log
    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._requests)

    def jwks_requests(self) -> int:
        return sum(1 for _m, path in self.requests if path == "/oauth/discovery/keys")

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _log(self, request: web.Request) -> None:
        with self._lock:
            self._requests.append((request.method, request.path))

    # ----------------------------------------------------------------- handlers
    async def _discovery(self, request: web.Request) -> web.Response:
        self._log(request)
        if "discovery" in self.scripted:
            status, body = self.scripted["discovery"]
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response({
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/oauth/discovery/keys",
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        self._log(request)
        if "jwks" in self.scripted:
            status, body = self.scripted["jwks"]
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response({"keys": self.public_jwks()})

    async def _github_token(self, request: web.Request) -> web.Response:
        self._log(request)
        if request.headers.get("Authorization") != f"Bearer {REQUEST_TOKEN}":
            return web.json_response({"message": "bad request token"}, status=401)
        audience = request.query.get("audience", "")
        return web.json_response({"value": self.mint(self.github_claims, aud=audience)})

    # ----------------------------------------------------------------- keys
    def public_jwks(self) -> list[dict[str, Any]]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec_key.public_key()))
        rsa_jwk.update(kid=self.rsa_kid, use="sig", alg="RS256")
        ec_jwk.update(kid=self.ec_kid, use="sig", alg="ES256")
        return [rsa_jwk, ec_jwk]

    def rotate(self) -> None:
        """A new RSA key under a new kid; the old one is no longer published."""
        self._rotations += 1
        self.rsa_kid = f"rsa-{self._rotations}"
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    # ----------------------------------------------------------------- tokens
    def mint(
        self, claims: Mapping[str, Any], *, aud: Any = "indexguard", alg: str = "RS256",
        kid: str | None = None, key: Any = None, iss: str | None = None,
        lifetime: int = 300, now: int | None = None, drop: tuple[str, ...] = (),
    ) -> str:
        """A signed ID token: iss, aud, iat, nbf, exp, jti, then claims on top."""
        now = int(time.time()) if now is None else now
        payload: dict[str, Any] = {
            "iss": iss or self.issuer, "aud": aud, "iat": now, "nbf": now,
            "exp": now + lifetime, "jti": uuid.uuid4().hex, **claims,
        }
        for name in drop:
            payload.pop(name, None)
        if alg == "ES256":
            signer, default_kid = self.ec_key, self.ec_kid
        else:
            signer, default_kid = self.rsa_key, self.rsa_kid
        return jwt.encode(payload, key if key is not None else signer, algorithm=alg,
                          headers={"kid": kid or default_kid})

    def unsigned(self, claims: Mapping[str, Any], *, aud: str = "indexguard") -> str:
        """alg: none, no signature: what a forger sends."""
        now = int(time.time())
        header = {"alg": "none", "typ": "JWT", "kid": self.rsa_kid}
        payload = {"iss": self.issuer, "aud": aud, "iat": now, "nbf": now, "exp": now + 300,
                   "jti": uuid.uuid4().hex, **claims}
        return (_b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
                + ".")


def gitlab_claims(project_path: str = "acme/platform", ref: str = "main",
                  **extra: Any) -> dict[str, Any]:
    """The claims of a GitLab CI `id_tokens:` token (strings, as GitLab sends them)."""
    namespace = project_path.rpartition("/")[0]
    return {
        "sub": f"project_path:{project_path}:ref_type:branch:ref:{ref}",
        "namespace_id": "7", "namespace_path": namespace, "project_id": "42",
        "project_path": project_path, "user_id": "1", "user_login": "ci-bot",
        "pipeline_id": "1001", "pipeline_source": "push", "job_id": "5005",
        "ref": ref, "ref_type": "branch", "ref_path": f"refs/heads/{ref}",
        "ref_protected": "true", "runner_id": 3, "runner_environment": "self-hosted",
        "sha": "0123456789abcdef0123456789abcdef01234567",
        "ci_config_ref_uri": f"gitlab.example.com/{project_path}//.gitlab-ci.yml@refs/heads/{ref}",
        **extra,
    }


def github_claims(repository: str = "acme/tools", ref: str = "refs/heads/main",
                  workflow: str = "release.yml", **extra: Any) -> dict[str, Any]:
    """The claims of a GitHub Actions ID token (`permissions: id-token: write`)."""
    owner = repository.partition("/")[0]
    return {
        "sub": f"repo:{repository}:environment:pypi",
        "repository": repository, "repository_id": "123456", "repository_owner": owner,
        "repository_owner_id": "654321", "ref": ref, "ref_type": "branch",
        "job_workflow_ref": f"{repository}/.github/workflows/{workflow}@{ref}",
        "workflow_ref": f"{repository}/.github/workflows/{workflow}@{ref}",
        "workflow": "release", "environment": "pypi", "event_name": "push",
        "run_id": "777", "sha": "89abcdef0123456789abcdef0123456789abcdef",
        **extra,
    }
