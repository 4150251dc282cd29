"""A real S3 API on loopback for the tests: moto's server mode as a subprocess.

`MotoServer` runs `moto_server` on a free 127.0.0.1 port. `Bucket` is one test's
bucket on it, with the config fragment and environment an `indexguard serve`
process needs to use it. `BlindFront` sits in front of moto and drops the
conditional-write headers (If-None-Match / If-Match) before forwarding: it plays
the S3 imitations that silently overwrite, which indexguard must refuse to start on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.session
from aiohttp import ClientSession, web

from .server import free_port

# moto accepts any credentials; these only have to be present for botocore to sign.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "indexguard-test",
    "AWS_SECRET_ACCESS_KEY": "indexguard-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_DROPPED = ("if-none-match", "if-match")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


class MotoServer:
    """moto's S3 server on 127.0.0.1; one per test session is enough."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        log = open(self._log_path, "wb")  # noqa: SIM115 - closed with the process
        env = {**os.environ, **CREDENTIALS}
        self._proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        _wait_for_port(self.port, self._proc, 30.0)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def bucket(self, endpoint_url: str | None = None) -> Bucket:
        """A new empty bucket with a unique name."""
        name = f"ig-{uuid.uuid4().hex[:16]}"
        bucket = Bucket(name, endpoint_url or self.endpoint_url, self.endpoint_url)
        bucket.client().create_bucket(Bucket=name)
        return bucket


class Bucket:
    """One test's bucket; `endpoint_url` is where the proxy talks to (maybe a front)."""

    def __init__(self, name: str, endpoint_url: str, direct_url: str) -> None:
        self.name = name
        self.endpoint_url = endpoint_url
        self._direct_url = direct_url

    def storage_config(self, prefix: str = "") -> dict[str, Any]:
        """The `storage:` section of an indexguard config for this bucket."""
        s3: dict[str, Any] = {
            "bucket": self.name,
            "endpoint_url": self.endpoint_url,
            "region": CREDENTIALS["AWS_DEFAULT_REGION"],
        }
        if prefix:
            s3["prefix"] = prefix
        return {"backend": "s3", "s3": s3}

    @staticmethod
    def env() -> dict[str, str]:
        """The AWS credential chain's variables, for the proxy subprocess."""
        return dict(CREDENTIALS)

    def client(self) -> Any:
        """A plain botocore client straight to moto (the test's own view of the bucket)."""
        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self._direct_url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        client = self.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix,
        ):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def get(self, key: str) -> bytes:
        body = self.client().get_object(Bucket=self.name, Key=key)["Body"]
        data: bytes = body.read()
        return data


class BlindFront:
    """An S3 endpoint that forwards to moto but ignores conditional writes.

    Runs its own event loop in a thread. Every request goes through unchanged
    except that If-None-Match and If-Match are dropped, so a conditional PUT
    silently overwrites: what some S3 imitations do.
    """

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.dropped = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: Any = None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items()
            if k.lower() not in _DROPPED and k.lower() not in ("host", "content-length")
        }
        if any(k.lower() in _DROPPED for k in request.headers):
            self.dropped += 1
        body = await request.read()
        url = self.target_url + request.path_qs
        async with ClientSession(auto_decompress=False) as session, session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {
                k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            return web.Response(status=upstream.status, body=payload, headers=out)

    def _serve(self) -> None:
        import asyncio

        async def main() -> None:
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            stop = asyncio.Event()
            self._stop = (asyncio.get_running_loop(), stop)
            self._ready.set()
            await stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the blind S3 front did not start")

    def stop(self) -> None:
        if self._stop is not None:
            loop, event = self._stop
            loop.call_soon_threadsafe(event.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> BlindFront:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.stop()


def moto_answers(endpoint_url: str) -> bool:
    """Whether an S3 API answers at endpoint_url (any HTTP status counts)."""
    try:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            endpoint_url + "/", timeout=2,
        )
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True
