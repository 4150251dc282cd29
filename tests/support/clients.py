"""Real packaging clients (pip, uv, twine, pdm) run as subprocesses against loopback indexes.

Their environment is scrubbed of user and machine index settings, so no test reaches PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from email.parser import BytesParser
from pathlib import Path

from packaging.utils import canonicalize_name

DEFAULT_TIMEOUT = 300.0
# Settings that could point a client at another index, a proxy or a config file.
_SCRUB_PREFIXES = ("PIP_", "UV_", "TWINE_", "PDM_")
_SCRUB_NAMES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})

Result = subprocess.CompletedProcess[str]


def client_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without index/proxy settings, with no-config switches, then env on top."""
    merged = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUB_PREFIXES) and k.lower() not in _SCRUB_NAMES
    }
    merged.update(
        {
            # pip's --isolated already skips config; this also covers `pip config` lookups.
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INPUT": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # uv: no uv.toml / pyproject discovery, never fetch an interpreter.
            "UV_NO_CONFIG": "1",
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_NO_PROGRESS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    if env:
        merged.update(env)
    return merged


def uv_bin() -> str:
    found = shutil.which("uv")
    if found:
        return found
    from uv import find_uv_bin  # the PyPI `uv` package ships the binary

    return str(find_uv_bin())


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float) -> Result:
    """Run a client in an empty cwd, so a same-named folder is never taken for a project."""
    with tempfile.TemporaryDirectory(prefix="client-cwd-") as cwd:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=client_env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )


def _pip(command: str, index_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        command,
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--isolated",
        "--index-url",
        index_url,
    ]


def pip_install(
    index_url: str,
    target: Path,
    *packages: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    argv = [*_pip("install", index_url), "--target", str(target), *extra, *packages]
    return run(argv, env=env, timeout=timeout)


def pip_download(
    index_url: str,
    dest: Path,
    *packages: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    argv = [*_pip("download", index_url), "--dest", str(dest), *extra, *packages]
    return run(argv, env=env, timeout=timeout)


def uv_venv(path: Path, *, timeout: float = 120) -> Path:
    """Create a venv with uv on this interpreter; returns the venv's python."""
    argv = [uv_bin(), "venv", "--no-cache", "--python", sys.executable, str(path)]
    result = run(argv, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"uv venv failed:\n{result.stdout}\n{result.stderr}")
    return path / "bin" / "python"


def uv_install(
    index_url: str,
    venv_python: Path,
    *packages: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    argv = [
        uv_bin(),
        "pip",
        "install",
        "--no-cache",
        "--python",
        str(venv_python),
        "--index-url",
        index_url,
        *extra,
        *packages,
    ]
    return run(argv, env=env, timeout=timeout)


def twine_upload(
    repo_url: str,
    files: Sequence[Path],
    username: str,
    password: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    argv = [
        sys.executable,
        "-m",
        "twine",
        "upload",
        "--non-interactive",
        "--disable-progress-bar",
        "--repository-url",
        repo_url,
        "-u",
        username,
        "-p",
        password,
        *extra,
        *(str(f) for f in files),
    ]
    return run(argv, env=env, timeout=timeout)


def uv_publish(
    publish_url: str,
    files: Sequence[Path],
    username: str,
    password: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    argv = [
        uv_bin(),
        "publish",
        "--no-cache",
        # Off, or uv probes for a CI identity token before uploading.
        "--trusted-publishing",
        "never",
        "--publish-url",
        publish_url,
        "--username",
        username,
        "--password",
        password,
        *extra,
        *(str(f) for f in files),
    ]
    return run(argv, env=env, timeout=timeout)


def pdm(
    project: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """`pdm <args> -p project`, with its home, cache and config under the project's
    parent: no user or global pdm settings, no update check, no prompt."""
    home = project.parent / "pdm-home"
    home.mkdir(exist_ok=True)
    merged = {
        "HOME": str(home),
        "PDM_CACHE_DIR": str(home / "cache"),
        "PDM_CHECK_UPDATE": "false",
        "PDM_NON_INTERACTIVE": "1",
        # A project's own .venv (made by uv_venv) is the one installed into.
        "PDM_IGNORE_ACTIVE_VENV": "1",
        **(env or {}),
    }
    argv = [sys.executable, "-m", "pdm", *args, "-p", str(project)]
    return run(argv, env=merged, timeout=timeout)


def site_packages(target_or_venv: Path) -> Path:
    """The directory holding *.dist-info: a venv's site-packages or a --target dir."""
    path = Path(target_or_venv)
    if path.is_file() and (path.parent.parent / "pyvenv.cfg").exists():
        path = path.parent.parent  # the venv's bin/python was given
    if (path / "pyvenv.cfg").exists():
        found = sorted(path.glob("lib/python*/site-packages"))
        if not found:
            raise FileNotFoundError(f"no site-packages in venv {path}")
        return found[0]
    return path


def installed_version(target_or_venv: Path, project: str) -> str | None:
    """The Version of project installed there, or None when it is not installed."""
    wanted = canonicalize_name(project)
    for meta in site_packages(target_or_venv).glob("*.dist-info/METADATA"):
        headers = BytesParser().parsebytes(meta.read_bytes(), headersonly=True)
        if canonicalize_name(str(headers.get("Name", ""))) == wanted:
            version = headers.get("Version")
            return None if version is None else str(version)
    return None
