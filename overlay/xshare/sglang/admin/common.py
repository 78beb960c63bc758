"""Names and paths the admin endpoint's HTTP side and scheduler side share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xshare.selection.schema import parse_bool_text

STATE_DIR_ENV = "XSHARE_ADMIN_STATE_DIR"
TOKEN_ENV = "XSHARE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "XSHARE_ADMIN_TOKEN_FILE"
ALLOW_LOCAL_ENV = "XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL"
CONTROL_KEY = "xshare_config_version"
UPDATE_HANDLERS_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                          "SchedulerInternalStateController._update_handlers")
ON_IDLE_TARGET = "sglang.srt.managers.scheduler.Scheduler.on_idle"
APPLY_TIMEOUT_S = 30.0
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def admin_configured(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(TOKEN_ENV) or env.get(TOKEN_FILE_ENV)
                or parse_bool_text(env.get(ALLOW_LOCAL_ENV, "")) is True)


def state_dir() -> Path | None:
    d = os.environ.get(STATE_DIR_ENV, "").strip()
    return Path(d) if d else None




def allow_unauthenticated_local() -> bool:
    return parse_bool_text(os.environ.get(ALLOW_LOCAL_ENV, "")) is True
