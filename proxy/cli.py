"""Command line: `indexguard serve | check-config | token new`.

Precedence for serve: flags > config file > embedded default. A bad config is
refused before anything listens (exit 2, every problem listed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

import yaml
from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from . import __version__
from .app import LIFECYCLE, create_app
from .auth import hash_secret, new_secret
from .config import SCOPES, Config, ConfigError, Listen, load_config
from .logs import AccessLogger, setup_logging
from .metrics import MULTIPROC_ENV

log = logging.getLogger("indexguard")
EXIT_CONFIG = 2
# Marks a process started by the supervisor: it serves instead of supervising.
WORKER_ENV = "INDEXGUARD_WORKER"
# After SIGTERM: how long requests in flight (downloads, uploads) may take to finish.
SHUTDOWN_GRACE = 30.0
# Then: how long aiohttp waits for handlers whose connections were cut to unwind.
_CANCEL_WAIT = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indexguard", description=__doc__)
    p.add_argument("--version", action="version", version=f"indexguard {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", help="YAML config file (default: the embedded default)")
    s.add_argument("--host", help="override listen.host")
    s.add_argument("--port", type=int, help="override listen.port")
    c = sub.add_parser("check-config", help="validate a config file; exit 2 on problems")
    c.add_argument("file")
    t = sub.add_parser("token", help="manage tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    n = tsub.add_parser("new", help="print a new secret and its YAML entry")
    n.add_argument("--name", required=True)
    n.add_argument("--scopes", default="read", help=f"comma-separated: {','.join(SCOPES)}")
    n.add_argument("--expires", help="YYYY-MM-DD")
    return p


def _print_problems(exc: ConfigError) -> int:
    print("config has problems:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _print_problems(exc)
    print(f"{path}: ok (listen {config.listen.host}:{config.listen.port}, "
          f"forward {config.upstream.forward}, {len(config.auth.tokens)} token(s))")
    return 0


def token_new(name: str, scopes_text: str, expires: str | None,
              today: dt.date | None = None) -> int:
    scopes = [s.strip() for s in scopes_text.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES] or ([] if scopes else ["(none)"])
    if bad:
        print(f"--scopes: unknown {', '.join(bad)}; use {','.join(SCOPES)}", file=sys.stderr)
        return EXIT_CONFIG
    if not name.strip() or not name.isprintable() or name == "__token__":
        print("--name: expected a printable name other than __token__", file=sys.stderr)
        return EXIT_CONFIG
    entry: dict[str, object] = {"name": name}
    if expires is not None:
        try:
            until = dt.date.fromisoformat(expires)
        except ValueError:
            print(f"--expires: expected a date YYYY-MM-DD, got {expires}", file=sys.stderr)
            return EXIT_CONFIG
        if until < (today or dt.date.today()):
            print(f"--expires: {until.isoformat()} is in the past", file=sys.stderr)
            return EXIT_CONFIG
    secret = new_secret()
    entry["sha256"] = hash_secret(secret)
    entry["scopes"] = scopes
    if expires is not None:
        entry["expires"] = until.isoformat()
    print(f"# secret for {name.encode('ascii', 'backslashreplace').decode()}"
          " (shown once; store it in your CI's secret store):")
    print(f"#   {secret}")
    print("# add under auth.tokens in the config, then reload with SIGHUP:")
    # Dumped, not formatted: a name like "ci: nightly" must come out as valid,
    # quoted YAML that pastes into the config as it is.
    print(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None,
                         allow_unicode=False).rstrip())
    return 0


class CannotListen(Exception):
    """The address is taken or not ours: one line to stderr, exit 1."""


def _run_worker(config: Config, path: str | None, reuse_port: bool) -> int:
    try:
        asyncio.run(_serve_until_signal(config, path, reuse_port))
    except CannotListen as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(config: Config, path: str | None, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully.

    Not web.run_app: its shutdown first marks every connection closing, and a
    closing aiohttp connection drops the bytes still arriving, so an upload in
    flight could never finish. Here the listener closes first, requests in
    flight get SHUTDOWN_GRACE to finish (a second signal cuts that short),
    and only then does aiohttp close connections and cancel what is left.
    """
    app = await create_app(config, path)
    access = logging.getLogger("indexguard.access") if config.log.access_log else None
    runner = web.AppRunner(
        app, access_log=access, access_log_class=AccessLogger,
        # aiohttp arms this timer when a connection opens too, so it also bounds
        # how long a client may take to send its request headers (slowloris);
        # a stalled body is web_upload's business. Fixed until a restart.
        keepalive_timeout=config.limits.idle_timeout,
        shutdown_timeout=_CANCEL_WAIT, handle_signals=False,
    )
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, config.listen.host, config.listen.port,
            backlog=2048, reuse_port=reuse_port or None,
        )
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(
                f"listen: cannot listen on {config.listen.host}:{config.listen.port}: "
                f"{os.strerror(exc.errno) if exc.errno else 'failed'}"
            ) from None
        loop = asyncio.get_running_loop()
        signals = asyncio.Queue[int]()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        received = await signals.get()
        await site.stop()
        life = app[LIFECYCLE]
        life.draining = True
        life.deadline = loop.time() + SHUTDOWN_GRACE
        log.info("shutting down: listener closed, letting requests in flight finish",
                 extra={"signal": signal.Signals(received).name, "in_flight": life.active,
                        "grace_s": SHUTDOWN_GRACE})
        again = asyncio.ensure_future(signals.get())
        # 1. Handlers (uploads still receiving, streamed downloads) finish.
        idle = asyncio.ensure_future(life.wait_idle())
        await asyncio.wait((idle, again), timeout=SHUTDOWN_GRACE,
                           return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        # 2. Responses still being sent (cached files go out after their handler
        # returned) finish; idle keep-alive connections close at once.
        server = runner.server
        if server is not None:
            server.pre_shutdown()
            while server.connections and not again.done() and loop.time() < life.deadline:
                await asyncio.sleep(0.1)
            if server.connections:
                life.deadline = loop.time()  # nothing more for cache fills either
                log.warning("shutdown grace over or cut short; cutting requests in flight",
                            extra={"connections": len(server.connections)})
                for conn in server.connections:
                    # abort, not close: close waits to flush to a client that
                    # may never read again.
                    if conn.transport is not None:
                        conn.transport.abort()
                    conn.force_close()
        again.cancel()
    finally:
        await runner.cleanup()
    log.info("stopped")


def _supervise(config: Config, argv: list[str], workers: int) -> int:
    """Start workers sharing the port (SO_REUSEPORT); forward SIGTERM/SIGHUP to them.

    Workers are fresh interpreters, not forks: prometheus_client picks its
    multi-process mode from the environment when it is first imported, and a
    fork would inherit this process's single-process metrics.
    """
    metrics_dir = (config.data_dir / "metrics").resolve()
    shutil.rmtree(metrics_dir, ignore_errors=True)  # samples of an earlier run
    metrics_dir.mkdir(parents=True)
    env = {**os.environ, WORKER_ENV: "1", MULTIPROC_ENV: str(metrics_dir)}
    cmd = [sys.executable, "-m", "proxy", *argv]
    children = [subprocess.Popen(cmd, env=env) for _ in range(workers)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    status = 0
    for child in children:
        code = child.wait()
        mark_process_dead(child.pid, str(metrics_dir))  # type: ignore[no-untyped-call]
        status = status or code
    return status


def serve(path: str | None, host: str | None, port: int | None, argv: Sequence[str]) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _print_problems(exc)
    if host is not None or port is not None:
        config = dataclasses.replace(config, listen=Listen(
            host=host if host is not None else config.listen.host,
            port=port if port is not None else config.listen.port,
        ))
    setup_logging(config.log.level)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"data_dir: cannot create {config.data_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    log.info("starting", extra={
        "version": __version__, "config": config.source,
        "listen": f"{config.listen.host}:{config.listen.port}",
        "upstream": config.upstream.url, "forward": config.upstream.forward,
        "data_dir": str(config.data_dir.resolve()), "workers": config.worker_count,
    })
    if os.environ.get(WORKER_ENV):
        return _run_worker(config, path, reuse_port=True)
    if config.worker_count > 1:
        return _supervise(config, list(argv), config.worker_count)
    return _run_worker(config, path, reuse_port=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args.config, args.host, args.port,
                     argv if argv is not None else sys.argv[1:])
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "token" and args.token_command == "new":
        return token_new(args.name, args.scopes, args.expires)
    return EXIT_CONFIG
