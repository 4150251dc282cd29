"""The peers: proxpi and devpi-server, each from its own virtualenv under bench/.venvs."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from servers import DEVPI_ROOT_PASSWORD, VENVS, Server, ensure_venv, wait_http


class Proxpi(Server):
    """proxpi under gunicorn as its Docker image runs it (one worker, 2 threads)."""

    name = "proxpi"
    simple_path = "/index/"

    def __init__(self, work: Path, upstream: str) -> None:
        super().__init__(work)
        self.upstream = upstream

    def start(self) -> None:
        bindir = ensure_venv("proxpi")
        env = {"PROXPI_INDEX_URL": self.upstream, "PROXPI_CACHE_DIR": str(self.work / "cache"),
               "PROXPI_LOGGING_LEVEL": "WARNING", "PROXPI_INDEX_TTL": "3600"}
        self._spawn([str(bindir / "gunicorn"), "--preload", "--bind",
                     f"127.0.0.1:{self.port}", "--threads", "2", "proxpi.server:app"], env)
        assert self.proc is not None
        wait_http(self.base + "/health", self.proc)


class Devpi(Server):
    """devpi-server with root/pypi mirroring the local upstream; root/dev takes uploads."""

    name = "devpi"
    simple_path = "/root/pypi/+simple/"

    def __init__(self, work: Path, upstream: str) -> None:
        super().__init__(work)
        self.upstream = upstream

    def start(self) -> None:
        bindir = ensure_venv("devpi")
        serverdir = self.work / "server"
        self.work.mkdir(parents=True, exist_ok=True)
        logcfg = self.work / "logging.json"
        logcfg.write_text(json.dumps({"version": 1, "disable_existing_loggers": False,
                                      "root": {"level": "WARNING"}}))
        template = VENVS / "devpi-serverdir-template"
        if not (template / ".done").exists():
            shutil.rmtree(template, ignore_errors=True)
            subprocess.run([str(bindir / "devpi-init"), "--serverdir", str(template),
                            "--no-root-pypi", "--root-passwd", DEVPI_ROOT_PASSWORD],
                           check=True, capture_output=True)
            (template / ".done").touch()
        shutil.copytree(template, serverdir)
        self._spawn([str(bindir / "devpi-server"), "--serverdir", str(serverdir),
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--logger-cfg", str(logcfg), "--max-request-body-size", str(4 * 2**30),
                     "--request-timeout", "60"])
        assert self.proc is not None
        wait_http(self.base + "/+api", self.proc)
        self._put("/root/pypi", {"type": "mirror", "mirror_url": self.upstream,
                                 "mirror_cache_expiry": 3600})
        self._put("/root/dev", {"type": "stage", "bases": [], "volatile": True})

    def _auth(self) -> str:
        data = json.dumps({"user": "root", "password": DEVPI_ROOT_PASSWORD}).encode()
        req = urllib.request.Request(self.base + "/+login", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            token = json.load(resp)["result"]["password"]
        return base64.b64encode(f"root:{token}".encode()).decode()

    def _put(self, path: str, body: dict[str, object]) -> None:
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), method="PUT",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "X-Devpi-Auth": self._auth()})
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    @property
    def upload_url(self) -> str:
        return self.base + "/root/dev/"
