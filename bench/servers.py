"""Start and stop the servers under test on free loopback ports; RSS from /proc.

nginx serves the static tree (baseline and upstream); indexguard, proxpi and
devpi-server mirror it. Peers live in their own virtualenvs under bench/.venvs,
installed from PyPI with exact pins the first time they are needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
PROXY_PYTHON = ROOT / ".venv" / "bin" / "python"
PEER_PINS = {
    "proxpi": ["proxpi==1.3.1", "gunicorn==27.0.1"],
    "devpi": ["devpi-server==6.20.3"],
    "tools": ["py-spy==0.4.3", "pyinstrument==5.1.3"],
}
UPLOAD_USER, UPLOAD_SECRET = "bench", "bench-secret-not-for-production"
DEVPI_ROOT_PASSWORD = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            http_get(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def ensure_venv(name: str) -> Path:
    """bench/.venvs/<name> with the pinned packages; returns its bin directory."""
    venv = VENVS / name
    stamp = venv / "bench-pins.txt"
    want = "\n".join(PEER_PINS[name])
    if not (stamp.exists() and stamp.read_text() == want):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        with (VENVS / f"{name}-install.log").open("wb") as log:
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", *PEER_PINS[name]],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        stamp.write_text(want)
    return venv / "bin"


# --- /proc ---------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct and indirect children of pid (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def hwm_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM") / 1024


def reset_hwm(pid: int) -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0, needs privilege); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Polls RSS of some pids every 10 ms and keeps each one's maximum."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {p: 0.0 for p in pids}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for p in self.pids:
                self.peak[p] = max(self.peak[p], rss_mib(p))
            time.sleep(0.01)


# --- servers ------------------------------------------------------------------------


class Server:
    """A started server: base URL, the simple index path, its processes."""

    name = "server"
    simple_path = "/simple/"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def simple(self) -> str:
        return self.base + self.simple_path

    def page_url(self, project: str) -> str:
        return f"{self.simple}{project}/"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        out = (self.work / "server.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=self.work,
                                     start_new_session=True)
        out.close()

    def start(self) -> None:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """The processes that answer requests (children of a supervisor, else itself)."""
        if self.proc is None:
            return []
        kids = children(self.proc.pid)
        return kids or [self.proc.pid]

    def all_pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid, *children(self.proc.pid)]

    def rss_total(self) -> float:
        return sum(rss_mib(p) for p in self.all_pids())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


class Nginx(Server):
    """The static tree; also the upstream. Counts requests per path from its access log."""

    name = "nginx"

    SLOW_RATE = "10m"  # bytes/s per connection on the throttled listener (a WAN link)

    def __init__(self, work: Path, tree: Path) -> None:
        super().__init__(work)
        self.tree = tree
        self.slow_port = free_port()
        self.slow_simple = f"http://127.0.0.1:{self.slow_port}{self.simple_path}"

    def start(self) -> None:
        w = self.work
        w.mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(f"{k}_temp_path {w}/{k};\n"
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""{user}worker_processes auto;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  {temps}
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000; keepalive_timeout 60;
  types {{ application/octet-stream whl gz zip; text/plain metadata; }}
  default_type application/octet-stream;
  map $http_accept $simple_fmt {{
    default html;
    "~*application/vnd\\.pypi\\.simple\\.(v1|latest)\\+json" json;
  }}
  server {{
    listen 127.0.0.1:{self.port} reuseport backlog=4096;
    root {self.tree};
    location /simple/ {{
      index index.$simple_fmt;
      gzip_static on;
      add_header Vary "Accept, Accept-Encoding";
      types {{ text/html html; application/vnd.pypi.simple.v1+json json; }}
    }}
    location /files/ {{ access_log {w}/access.log; }}
  }}
  server {{
    listen 127.0.0.1:{self.slow_port} reuseport backlog=4096;
    root {self.tree};
    location /simple/ {{
      index index.$simple_fmt;
      gzip_static on;
      types {{ text/html html; application/vnd.pypi.simple.v1+json json; }}
    }}
    location /files/ {{ access_log {w}/access.log; limit_rate {self.SLOW_RATE}; }}
  }}
}}
"""
        (w / "nginx.conf").write_text(conf)
        self._spawn(["nginx", "-p", str(w), "-c", str(w / "nginx.conf"), "-e",
                     str(w / "error.log")])
        assert self.proc is not None
        wait_http(self.simple, self.proc)

    def worker_pids(self) -> list[int]:
        return self.all_pids()

    def count(self, path: str) -> int:
        """GET requests logged so far for exactly this URL path."""
        log = self.work / "access.log"
        if not log.exists():
            return 0
        needle = f'"GET {path} '
        return sum(1 for ln in log.read_text(errors="replace").splitlines() if needle in ln)


def token_sha256() -> str:
    return hashlib.sha256(UPLOAD_SECRET.encode()).hexdigest()


def group_layout(upstream: str) -> dict[str, object]:
    """A group of five indexes and two upstreams: a name walks every index, then a
    routed upstream whose names filter turns it down, then the catch-all (both
    upstreams are the same nginx: what is measured is the walk)."""
    indexes = ["platform", "ml", "data", "web", "tools"]
    upstream_keys = {"index_ttl": 3600, "timeout": 60}
    return {
        "upstream": {"index_ttl": 3600, "timeout": 60},
        "indexes": [{"name": n} for n in indexes],
        "upstreams": [{"name": "pytorch", "url": upstream, "not_found": [403, 404],
                       **upstream_keys},
                      {"name": "pypi", "url": upstream, **upstream_keys}],
        "groups": [{"name": "default", "members": [
            *({"index": n} for n in indexes),
            {"upstream": "pytorch", "names": ["torch", "torchvision", "nvidia-*"]},
            {"upstream": "pypi"},
        ]}],
    }


class MotoS3(Server):
    """moto's S3 server on loopback with one bucket: the store of an -s3 indexguard."""

    name = "moto"
    bucket = "indexguard-bench"
    env: ClassVar[dict[str, str]] = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def start(self) -> None:
        moto = PROXY_PYTHON.with_name("moto_server")
        self._spawn([str(moto), "-H", "127.0.0.1", "-p", str(self.port)], self.env)
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                req = urllib.request.Request(f"{self.base}/{self.bucket}", method="PUT")
                with urllib.request.urlopen(req, timeout=5):
                    return
            except urllib.error.HTTPError as err:
                if err.code == 409:  # already there
                    return
                raise
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def storage(self) -> dict[str, object]:
        return {"backend": "s3", "s3": {"bucket": self.bucket, "endpoint_url": self.base,
                                        "region": "us-east-1", "prefix": "bench/"}}


class Indexguard(Server):
    name = "indexguard"

    def __init__(self, work: Path, upstream: str, workers: int = 1,
                 access_log: bool = False, source: Path | None = None,
                 group: bool = False, s3: bool = False) -> None:
        super().__init__(work)
        self.upstream = upstream
        self.workers = workers
        self.access_log = access_log
        self.source = source  # a directory holding another `proxy` package to run instead
        # The issue-11 shape: five private indexes and two upstreams in one group.
        self.group = group
        # Issue 12: private files and artifacts in a bucket on moto's S3 server.
        self.s3 = MotoS3(work / "moto") if s3 else None
        self.name = (f"indexguard-w{workers}" + ("-log" if access_log else "")
                     + ("-group" if group else "") + ("-s3" if s3 else ""))

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "workers": self.workers,
            "data_dir": str(self.work / "data"),
            "upstream": {"url": self.upstream, "index_ttl": 3600, "timeout": 60},
            "cache": {"max_bytes": 20 * 2**30},
            "limits": {"max_upload": 2 * 2**30},
            "auth": {"anonymous_read": True, "tokens": [
                {"name": UPLOAD_USER, "sha256": token_sha256(), "scopes": ["read", "write"]}]},
            "log": {"level": "info" if self.access_log else "warning",
                    "access_log": self.access_log},
        }
        if self.group:
            config.update(group_layout(self.upstream))
        env = {"PYTHONPATH": str(self.source)} if self.source else {}
        if self.s3 is not None:
            self.s3.start()
            config["storage"] = self.s3.storage()
            env.update(self.s3.env)
        path = self.work / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self._spawn([str(PROXY_PYTHON), "-m", "proxy", "serve", "--config", str(path)], env)
        assert self.proc is not None
        wait_http(self.base + "/-/health", self.proc)
        if self.workers > 1:  # every worker listening before the first figure
            deadline = time.monotonic() + 30
            while len(children(self.proc.pid)) < self.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)

    def stop(self) -> None:
        super().stop()
        if self.s3 is not None:
            self.s3.stop()

    @property
    def upload_url(self) -> str:
        return self.base + "/"


class PyStatic(Server):
    """Fallback upstream when nginx is not installed (smoke run only): no baseline figures."""

    name = "pystatic"

    def __init__(self, work: Path, tree: Path) -> None:
        super().__init__(work)
        self.tree = tree

    def start(self) -> None:
        self._spawn([str(PROXY_PYTHON), str(Path(__file__).resolve().with_name("staticserver.py")),
                     str(self.tree), str(self.port)])
        assert self.proc is not None
        wait_http(self.simple, self.proc)

    def count(self, path: str) -> int:
        log = self.work / "server.log"
        needle = f"GET {path}\n"
        return sum(1 for ln in log.read_text(errors="replace").splitlines(keepends=True)
                   if ln.endswith(needle)) if log.exists() else 0
