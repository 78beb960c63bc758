"""Names, limits and the config message the admin endpoint's HTTP side and scheduler side share."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from xshare.selection.schema import parse_bool_text

STATE_DIR_ENV = "XSHARE_ADMIN_STATE_DIR"
TOKEN_ENV = "XSHARE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "XSHARE_ADMIN_TOKEN_FILE"
ALLOW_LOCAL_ENV = "XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL"
# Tests only: "refuse:FIELD=VALUE" refuses, "raise:FIELD=VALUE" raises in the apply step, on the
# ranks whose environment has it, for every config whose FIELD is VALUE (comma-separated list).
FAULT_ENV = "XSHARE_FAULT_ADMIN"
# The per-start key that signs config messages: made by the HTTP process before it spawns the
# schedulers, inherited through the environment (never a command line or server_args), and taken out
# of a scheduler's environment by the scheduler. Internal: set nothing here.
CHANNEL_KEY_ENV = "XSHARE_ADMIN_CHANNEL_KEY"
# A config message is one SetInternalStateReq key: CONTROL_KEY, the signature, the JSON message
# (SGLang's message types only numbers as values, so the message rides in the key).
CONTROL_KEY = "xshare_config"
VIEW_KEY = "xshare"  # the scheduler's part of get_internal_state
PERSIST_FILE = "config.json"  # the config in force, in XSHARE_ADMIN_STATE_DIR
UPDATE_HANDLERS_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                          "SchedulerInternalStateController._update_handlers")
GET_STATE_TARGET = ("sglang.srt.managers.scheduler_components.internal_state."
                    "SchedulerInternalStateController.get_internal_state")
ON_IDLE_TARGET = "sglang.srt.managers.scheduler.Scheduler.on_idle"
APPLY_TIMEOUT_S = 30.0
# Ranks that route the same rows (attention DP over a TP MoE) receive a change in their own event loops, one
# step apart or more: they switch at a forward count this far past the furthest rank's (about half a second
# of decode steps, far beyond a message's delivery)
ACTIVATION_MARGIN = 32
MAX_BODY_BYTES = 16 * 1024  # a config is a few hundred bytes; larger bodies get 413
# An oversized body is read and discarded before its 413 (so the client reads the reply), up to this
# many bytes and while it keeps coming (a pause this long ends the wait).
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_IDLE_S = 1.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # callers let in without a token (opt-in)


def admin_configured(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(TOKEN_ENV) or env.get(TOKEN_FILE_ENV)
                or parse_bool_text(env.get(ALLOW_LOCAL_ENV, "")) is True)


def state_dir() -> Path | None:
    d = os.environ.get(STATE_DIR_ENV, "").strip()
    return Path(d) if d else None


def allow_unauthenticated_local() -> bool:
    return parse_bool_text(os.environ.get(ALLOW_LOCAL_ENV, "")) is True


# -- the config message -----------------------------------------------------------------------------------
def is_control_key(key: Any) -> bool:
    return isinstance(key, str) and (key == CONTROL_KEY or key.startswith(CONTROL_KEY + " "))


def is_reserved_key(key: Any) -> bool:
    """Keys SGLang's unauthenticated /set_internal_state may not carry (only the admin route sends them)."""
    return isinstance(key, str) and key.strip().lower().startswith("xshare")


def _sign(key: str, body: str) -> str:
    return hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()


def encode_message(version: int, config: dict[str, Any], source: str, key: str, *,
                   at_forward: int | None = None) -> str:
    """A signed config message; ``at_forward``: the ranks switch at that forward count (ranks that route shared
    rows, :func:`xshare.sglang.admin.fanout.activation_forward`), None: at once."""
    data = {"version": int(version), "config": config, "source": source}
    if at_forward is not None:
        data["at_forward"] = int(at_forward)
    body = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return f"{CONTROL_KEY} {_sign(key, body)} {body}"


def decode_message(text: str, key: str, *, verify: bool) -> dict[str, Any]:
    """The message of a config key; with ``verify``, only if signed with ``key`` (ValueError otherwise)."""
    parts = text.split(" ", 2)
    if len(parts) != 3 or parts[0] != CONTROL_KEY:
        raise ValueError("not a config message of the admin endpoint")
    _, mac, body = parts
    if verify:
        if not key:
            raise ValueError(f"this scheduler has no admin channel key ({CHANNEL_KEY_ENV} from the HTTP process)")
        if not hmac.compare_digest(mac, _sign(key, body)):
            raise ValueError("bad signature: not sent by this server's admin endpoint")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or not isinstance(
            data.get("version"), int):
        raise ValueError("malformed config message")
    at = data.get("at_forward")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 0):
        raise ValueError("malformed config message (at_forward)")
    return data


def refusal_fault(config: dict[str, Any]) -> str | None:
    """'refuse' / 'raise' when XSHARE_FAULT_ADMIN names this config (tests), else None."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, cond = item.partition(":")
        field, _, value = cond.partition("=")
        if kind in ("refuse", "raise") and field in config and str(config[field]) == value:
            return kind
    return None
