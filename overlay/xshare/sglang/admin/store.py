"""The admin endpoint's HTTP-side state: the config in force (``{"enabled", and the selector
fields}``), its version and origin, the change lock, the per-start channel key, the config-change
counter and the persisted copy (``config.json`` in ``XSHARE_ADMIN_STATE_DIR``)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from xshare._io import write_json_atomic
from xshare.selection.types import ModelShape
from xshare.sglang.admin.common import CHANNEL_KEY_ENV, PERSIST_FILE
from xshare.sglang.admin.config import ConfigInvalid, build_config, config_of
from xshare.sglang.observe.metrics import METRICS, multiprocess_dir
from xshare.sglang.settings import PluginSettings

STARTUP, PERSISTED, ADMIN = "start-up settings", "persisted", "admin change"


class AdminState:
    """The HTTP process's view: the config in force, its version and origin, the change lock, and where
    the config is persisted (``XSHARE_ADMIN_STATE_DIR``; None: not persisted)."""

    def __init__(self, settings: PluginSettings, directory: Path | None) -> None:
        self.settings = settings
        self.dir = directory
        self.startup = config_of(settings)  # the start-up settings' config
        self.version = 0
        self.config = dict(self.startup)
        self.source = STARTUP
        self.lock = asyncio.Lock()
        self.channel_key = os.environ.get(CHANNEL_KEY_ENV, "")
        self._counter: Any = None

    @property
    def persist_path(self) -> Path | None:
        return None if self.dir is None else self.dir / PERSIST_FILE

    def count(self, result: str) -> None:
        """One config-change outcome on the ``xshare:config_changes_total`` counter (rank "http"), when
        SGLang's metrics are on (its multiprocess directory is set)."""
        if multiprocess_dir() is None:
            return
        if self._counter is None:
            import prometheus_client as pc

            doc = METRICS["xshare:config_changes_total"][2]
            self._counter = pc.Counter("xshare:config_changes", doc, ("rank", "result"), registry=None)
        self._counter.labels("http", result).inc()

    # -- persistence ----------------------------------------------------------------------------------
    def persist(self, version: int, config: dict[str, Any], source: str) -> None:
        """Write the config in force (OSError when the location cannot take it)."""
        path = self.persist_path
        if path is not None:
            write_json_atomic(path, {"version": version, "config": config, "source": source,
                                     "startup": self.startup, "time": time.time()}, sort_keys=True)

    def restored(self, model: ModelShape | None = None) -> tuple[int, dict[str, Any], str, str]:
        """(version, config, source, why) to start with: the persisted config when it was made from the
        same start-up settings as this start and is valid for the served ``model`` (it enters here, so it
        is validated here, like a request's body), else the start-up settings."""
        path = self.persist_path
        if path is None:
            return 0, dict(self.startup), STARTUP, "no XSHARE_ADMIN_STATE_DIR: the config is not persisted"
        if not path.exists():
            return 0, dict(self.startup), STARTUP, f"nothing persisted in {path} yet"
        try:
            data = json.loads(path.read_text())
            version, config, startup = int(data["version"]), dict(data["config"]), dict(data["startup"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return 0, dict(self.startup), STARTUP, f"{path} is unreadable ({exc}): start-up settings"
        if startup != self.startup:
            return version + 1, dict(self.startup), STARTUP, (
                f"{path} was made from other start-up settings: the new start-up settings win")
        try:
            config = build_config(self.startup, config, replace_all=True, model=model)
        except ConfigInvalid as exc:
            return version + 1, dict(self.startup), STARTUP, (
                f"{path} holds an invalid config ({exc}): start-up settings")
        return version, config, PERSISTED, f"re-applied from {path}"
