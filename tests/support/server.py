"""ProxyServer: the real proxy (`python -m proxy serve`) as a subprocess on a free port.

Tests drive it over loopback HTTP and read its log from tmp_path/server.log.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Port 9 (discard) on loopback: nothing listens, so connections are refused at once.
UNREACHABLE_UPSTREAM = "http://127.0.0.1:9/simple/"


class _Delete:
    """Marker value: deep_merge removes the key instead of setting it."""


DELETE: Any = _Delete()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: changes over base, merging nested dicts; DELETE drops a key."""
    merged = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, _Delete):
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A loopback GET that ignores any proxy settings in the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code), bytes(err.read())


class ProxyServer:
    """One proxy process with its own config.yaml, data dir and log under tmp_path."""

    def __init__(
        self,
        tmp_path: Path,
        config: Mapping[str, Any] | None = None,
        *,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.config_path = self.tmp_path / "config.yaml"
        self.log_path = self.tmp_path / "server.log"
        base = {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "data_dir": str(self.tmp_path / "data"),
            "log": {"level": "debug"},
            # Never the public index: a test that forgets upstream.url gets a refused port.
            "upstream": {"url": UNREACHABLE_UPSTREAM},
        }
        self.config: dict[str, Any] = deep_merge(base, config or {})
        # command replaces the proxy CLI (the support self-tests use a stub).
        self._command = list(command) if command is not None else None
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._write_config()

    # ----------------------------------------------------------------- addresses
    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def index_url(self) -> str:
        return self.url + "/simple/"

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("proxy is not running")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # ----------------------------------------------------------------- config
    def _write_config(self) -> None:
        # Write then rename: a SIGHUP reload never reads half a file.
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False))
        os.replace(tmp, self.config_path)

    def update_config(self, changes: Mapping[str, Any]) -> None:
        """Deep-merge changes into the config and rewrite config.yaml (no reload)."""
        self.config = deep_merge(self.config, changes)
        self._write_config()

    # ----------------------------------------------------------------- lifecycle
    def argv(self) -> list[str]:
        if self._command is not None:
            return [*self._command, "--config", str(self.config_path)]
        return [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)]

    def start(self, timeout: float = 20) -> ProxyServer:
        """Spawn the proxy and wait until /-/health answers 200."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("proxy is already running")
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's life
        env = dict(os.environ)
        # The child imports `proxy` from the work tree whatever the caller's cwd.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        env.update(self._env)
        self._proc = subprocess.Popen(
            self.argv(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.wait_healthy(timeout)
        except BaseException:
            # Reap the child and close the log so a failed start leaks nothing.
            self.kill()
            raise
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                self._fail(f"proxy exited with {self._proc.returncode} before it was healthy")
            try:
                status, _ = http_get(self.url + "/-/health", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as err:
                last = repr(err)
            time.sleep(0.05)
        self._fail(f"proxy not healthy after {timeout}s (last: {last})")

    def _fail(self, message: str) -> None:
        raise RuntimeError(f"{message}\n--- server.log (tail) ---\n{self.log_tail()}")

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._close_log()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash, with no chance to clean up."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        self._close_log()
        return proc.returncode

    def sighup(self) -> None:
        os.kill(self.pid, signal.SIGHUP)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- observation
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def rss_bytes(self, *, include_children: bool = False) -> int:
        """Resident memory (VmRSS) in bytes; with include_children, of worker processes too."""
        if self.returncode is not None:
            raise RuntimeError(f"proxy exited with {self.returncode}")
        pids = [self.pid]
        if include_children:
            pids.extend(_descendants(self.pid))
        return sum(_vm_rss(pid) for pid in pids)


def _vm_rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0  # a worker that exited meanwhile holds no memory
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # zombies have no VmRSS line


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found.append(child)
            found.extend(_descendants(child))
    return found
