"""JSON log lines for everything, and the one-line-per-request access logger.

Never logs credentials: the access line carries the path without query and the
authenticated token's name, never the Authorization header.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

# What handlers tell the access line: where the answer came from, who asked.
CACHE_OUTCOME = RequestKey("cache_outcome", str)
TOKEN_NAME = RequestKey("token_name", str)

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # strftime once per second, not once per line: the access log writes
        # thousands of lines a second under load.
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        out: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """It alone sees the bytes sent and the full duration of each request."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 3),
                "cache": request.get(CACHE_OUTCOME, "-"),
                "client": request.remote,
                "token": request.get(TOKEN_NAME),
            },
        )
