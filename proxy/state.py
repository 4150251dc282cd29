"""Typed application keys and the live-config holder.

State lives on the aiohttp Application under these keys; nothing module-level.
"""

from __future__ import annotations

from aiohttp import web

from .auth import Authenticator, Identity
from .catalog import Catalog
from .config import Config
from .metrics import Metrics
from .publish import Publisher
from .reader import Reader
from .store import PrivateStore
from .trust import TrustedPublishing
from .ui_model import Asset


class LiveConfig:
    """The one mutable holder: SIGHUP swaps `current` whole; a request reads it once."""

    def __init__(self, config: Config, path: str | None) -> None:
        self.current = config
        self.path = path


CONFIG = web.AppKey("config", LiveConfig)
# Who asked (set by app.edge before the handler runs; absent: anonymous).
IDENTITY = web.RequestKey("identity", Identity)
METRICS = web.AppKey("metrics", Metrics)
STORES = web.AppKey("stores", dict[str, PrivateStore])
READER = web.AppKey("reader", Reader)
PUBLISHERS = web.AppKey("publishers", dict[str, Publisher])
AUTH = web.AppKey("auth", Authenticator)
TRUST = web.AppKey("trust", TrustedPublishing)
# The web UI (web_ui.py): what it shows, and its CSS and JS read at start.
CATALOG = web.AppKey("catalog", Catalog)
UI_ASSETS = web.AppKey("ui_assets", dict[str, Asset])
