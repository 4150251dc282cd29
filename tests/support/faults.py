"""Scripted faults of the fake upstream and the response writer that applies them.

Faults are set from the test thread and read by the server thread, hence the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

FAULT_KINDS = frozenset(
    {"status", "slow", "reset", "truncate", "bad_length", "garbage", "redirect_loop", "tamper"}
)
_CHUNK = 64 * 1024
# How long a cut-off body lingers so the client has read it before FIN/RST.
_LINGER = 0.05


@dataclass(slots=True)
class Fault:
    """A scripted misbehaviour for requests whose path starts with path_prefix.

    params by kind: status: code (and retry_after); slow: seconds (and
    phase="before"|"body"); bad_length: extra (bytes claimed beyond the body).
    """

    kind: str
    path_prefix: str
    params: dict[str, Any]
    # None: until cleared; otherwise the number of requests it still applies to.
    times: int | None = None
    hits: int = 0


@dataclass(slots=True)
class Payload:
    """A response body held in memory or streamed from a file."""

    content_type: str
    body: bytes | None = None
    path: Path | None = None
    size: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class FaultBook:
    """The faults in force; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def set(
        self, kind: str | None, path_prefix: str, times: int | None, params: dict[str, Any]
    ) -> Fault | None:
        if kind is None:
            with self._lock:
                self._faults = [
                    f for f in self._faults if not f.path_prefix.startswith(path_prefix)
                ]
            return None
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {sorted(FAULT_KINDS)}")
        if kind == "status" and "code" not in params:
            raise ValueError("fault 'status' needs code=...")
        if kind == "slow" and "seconds" not in params:
            raise ValueError("fault 'slow' needs seconds=...")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        new = Fault(kind, path_prefix, dict(params), times)
        with self._lock:
            self._faults = [f for f in self._faults if f.path_prefix != path_prefix]
            self._faults.append(new)
        return new

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, path: str) -> Fault | None:
        """The fault for this request (counting it), as a snapshot the caller owns."""
        with self._lock:
            matching = [f for f in self._faults if path.startswith(f.path_prefix)]
            if not matching:
                return None
            # The most specific prefix wins so a file fault can sit under a global one.
            chosen = max(matching, key=lambda f: len(f.path_prefix))
            chosen.hits += 1
            if chosen.times is not None:
                chosen.times -= 1
                if chosen.times <= 0:
                    self._faults.remove(chosen)
            return replace(chosen, params=dict(chosen.params))


async def early_response(request: web.Request, fault: Fault) -> web.StreamResponse | None:
    """Apply the faults that act before any handler; None lets the handler run."""
    if fault.kind == "status":
        code = int(fault.params["code"])
        headers = {}
        if "retry_after" in fault.params:
            headers["Retry-After"] = str(fault.params["retry_after"])
        return web.Response(status=code, text=f"fault {code}\n", headers=headers)
    if fault.kind == "redirect_loop":
        return web.Response(status=302, headers={"Location": request.path_qs})
    if fault.kind == "slow" and fault.params.get("phase", "before") == "before":
        await asyncio.sleep(float(fault.params["seconds"]))
    return None


async def send(request: web.Request, payload: Payload, fault: Fault | None) -> web.StreamResponse:
    """Write a payload, broken the way the request's fault says."""
    kind = fault.kind if fault is not None else None
    params = fault.params if fault is not None else {}
    if kind == "garbage":
        # Cut-off JSON or broken markup, under the content type that was negotiated.
        if "json" in payload.content_type:
            junk = b'{"meta": {"api-version": "1.1"}, "files": [{"fil'
        else:
            junk = b'<html><body><a href="\x00\xff</garbage'
        payload = replace(payload, body=junk, path=None, size=len(junk))
    size = payload.size
    declared = size + int(params.get("extra", 1000)) if kind == "bad_length" else size
    resp = web.StreamResponse(headers=payload.headers)
    resp.headers["Content-Type"] = payload.content_type
    resp.content_length = declared
    # The client went away (or we cut it off): nothing is left to answer.
    with contextlib.suppress(ConnectionError):
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        await _write_body(request, resp, payload, kind, params)
    return resp


async def _write_body(
    request: web.Request,
    resp: web.StreamResponse,
    payload: Payload,
    kind: str | None,
    params: dict[str, Any],
) -> None:
    size = payload.size
    stall = kind == "slow" and params.get("phase") == "body"
    limit = size // 2 if kind in ("truncate", "reset") or stall else size
    flip_at = size // 2 if kind == "tamper" else -1
    sent = 0
    for chunk in _chunks(payload, 0, limit):
        if sent <= flip_at < sent + len(chunk):
            i = flip_at - sent
            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
        await resp.write(chunk)
        sent += len(chunk)
    transport = request.transport
    if stall:
        # A stall mid-body: exercises the proxy's read-gap timeout.
        await asyncio.sleep(float(params["seconds"]))
        for chunk in _chunks(payload, limit, size):
            await resp.write(chunk)
    elif kind in ("truncate", "bad_length") and transport is not None:
        # A clean FIN before Content-Length is reached.
        await asyncio.sleep(_LINGER)
        transport.close()
        return
    elif kind == "reset" and transport is not None:
        await asyncio.sleep(_LINGER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 turns close into a TCP RST: the client sees ECONNRESET.
            # The client may have gone already (EBADF): then there is nothing to reset.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return
    await resp.write_eof()


def _chunks(payload: Payload, start: int, end: int) -> Iterator[bytes]:
    if payload.body is not None:
        for pos in range(start, end, _CHUNK):
            yield payload.body[pos : min(pos + _CHUNK, end)]
        return
    assert payload.path is not None
    with open(payload.path, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < end:
            data = fh.read(min(_CHUNK, end - pos))
            if not data:
                return
            pos += len(data)
            yield data
