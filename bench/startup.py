"""Time to first answer at N private projects, local and S3 (issue 12, item 7).

    .venv/bin/python bench/startup.py                        # 100 and 30,000; local and s3; 5 runs
    .venv/bin/python bench/startup.py --counts 100 --runs 3 --backends local
    .venv/bin/python bench/startup.py --backends local --proxy-src /path/to/old/checkout

The projects are written straight to where the backend keeps them (index.json
and one file per project under data_dir/private; records, name markers and a
shared blob in a moto bucket), not uploaded one by one. Each run spawns
`indexguard serve` and times, from the spawn, the first 200 of a private
project's page (the last name, so nothing sorted first helps). Medians of
--runs runs. Everything stays on 127.0.0.1; state goes to bench/.work/startup.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work" / "startup"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
CONTENT = b"bench file " * 100
SHA = hashlib.sha256(CONTENT).hexdigest()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def name_of(i: int) -> str:
    return f"bench-private-{i:06d}"


def record(name: str) -> bytes:
    filename = f"{name.replace('-', '_')}-1.0.tar.gz"
    return json.dumps({
        "name": name, "versions": ["1.0"], "used": {},
        "files": [{"filename": filename, "hashes": {"sha256": SHA}, "size": len(CONTENT)}],
    }).encode()


def fill_local(data: Path, count: int) -> None:
    marker = data / f".filled-{count}"
    if marker.exists():
        return
    shutil.rmtree(data, ignore_errors=True)
    for i in range(count):
        name = name_of(i)
        files = data / "private" / name / "files"
        files.mkdir(parents=True)
        (files / f"{name.replace('-', '_')}-1.0.tar.gz").write_bytes(CONTENT)
        (data / "private" / name / "index.json").write_bytes(record(name))
    marker.touch()


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **CREDENTIALS})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    return proc, url


def fill_bucket(endpoint: str, bucket: str, count: int) -> None:
    import botocore.session
    session = botocore.session.get_session()
    client = session.create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=f"blobs/{SHA}", Body=CONTENT)

    def one(i: int) -> None:
        name = name_of(i)
        client.put_object(Bucket=bucket, Key=f"indexes/default/projects/{name}.json",
                          Body=record(name))
        client.put_object(Bucket=bucket, Key=f"indexes/default/names/{name}", Body=b"")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def first_answer(config: dict[str, Any], workdir: Path, name: str, src: Path) -> float:
    """Seconds from the spawn of `indexguard serve` to the first 200 for name's page."""
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port},
              "log": {"level": "warning", "access_log": False}}
    path = workdir / "config.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(src)}
    url = f"http://127.0.0.1:{port}/simple/{name}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                            cwd=src, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "server.log", "ab"))  # noqa: SIM115
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}; see {workdir}")
            try:
                with opener.open(url, timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.01)
            if time.monotonic() - started > 300:
                raise RuntimeError("no answer in 300 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 30_000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["local", "s3"],
                        choices=["local", "s3"])
    parser.add_argument("--proxy-src", type=Path, default=ROOT,
                        help="a tree whose proxy/ to time (e.g. a checkout of the code before)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, list[float]]] = {}
    for backend in args.backends:
        moto: subprocess.Popen[bytes] | None = None
        try:
            if backend == "s3":
                moto, endpoint = start_moto()
            for count in args.counts:
                workdir = WORK / f"{backend}-{count}"
                workdir.mkdir(parents=True, exist_ok=True)
                data = workdir / "data"
                config: dict[str, Any] = {"data_dir": str(data)}
                if backend == "local":
                    fill_local(data, count)
                else:
                    bucket = f"bench-startup-{count}"
                    fill_bucket(endpoint, bucket, count)
                    config["storage"] = {"backend": "s3", "s3": {
                        "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1"}}
                times = []
                for _ in range(args.runs):
                    if backend == "s3":
                        shutil.rmtree(data, ignore_errors=True)  # the replica's own area
                    times.append(first_answer(config, workdir, name_of(count - 1), args.proxy_src))
                results.setdefault(backend, {})[count] = times
                print(f"{backend:6} {count:>7} projects: first answer, median of "
                      f"{len(times)}: {statistics.median(times) * 1000:.0f} ms "
                      f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)})", flush=True)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    (WORK / "results.json").write_text(json.dumps(
        {b: {str(c): v for c, v in r.items()} for b, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
