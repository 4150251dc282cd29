"""Typed application keys and the live-config holder.

State lives on the aiohttp Application under these keys; nothing module-level.
"""

from __future__ import annotations

from aiohttp import web

from .auth import Authenticator
from .config import Config
from .metrics import Metrics
from .publish import Publisher
from .reader import Reader
from .store import PrivateStore


class LiveConfig:
    """The one mutable holder: SIGHUP swaps `current` whole; a request reads it once."""

    def __init__(self, config: Config, path: str | None) -> None:
        self.current = config
        self.path = path


CONFIG = web.AppKey("config", LiveConfig)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", PrivateStore)
READER = web.AppKey("reader", Reader)
PUBLISHER = web.AppKey("publisher", Publisher)
AUTH = web.AppKey("auth", Authenticator)
