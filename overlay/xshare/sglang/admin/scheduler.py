"""The admin endpoint's scheduler side: the handler SGLang's internal-state controller calls with a
config message, the group view it reports back, and the metrics exporter of each scheduler.

A config message (:func:`xshare.sglang.admin.common.encode_message`) carries the whole config; it
reaches every rank of a TP group through SGLang's own control path (rank 0 broadcasts it to its
peers over the CPU group, which crosses nodes). Every rank of the group handles it at the same point
of its event loop, between forward batches:

1. the message source (the rank that received it from the HTTP process) checks its signature;
2. each rank applies it (never raising): the config was validated where it entered, in the HTTP
   process against the served model; a rank checks only what it alone knows (its captured CUDA
   graphs, its device knobs);
3. the ranks exchange their outcome (``all_gather_object`` over the TP CPU group);
4. if any rank failed, every rank goes back to its previous config and SGLang's reply says
   ``updated=False``; the reasons are in the group view that ``get_internal_state`` returns.

A rank that cannot go back to the config of its group stops selecting (SGLang's routing, counted as
``config_diverged`` and logged) until a later message puts it on the group's config again.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from xshare.sglang import state as rt_mod
from xshare.sglang.admin.common import (
    CHANNEL_KEY_ENV,
    CONTROL_KEY,
    VIEW_KEY,
    decode_message,
    is_control_key,
    refusal_fault,
)
from xshare.sglang.admin.config import config_of, settings_from_config
from xshare.sglang.admin.target import AdminTarget
from xshare.sglang.observe import metrics, report
from xshare.sglang.settings import PluginSettings

log = logging.getLogger("xshare.sglang")


class _Handlers(dict):
    """SGLang's handler table with one more entry that answers every key of a config message (the key
    carries the message: SetInternalStateReq's values must be numbers)."""

    def __init__(self, base: dict[str, Any], handler: Any) -> None:
        super().__init__(base)
        self._handler = handler

    def get(self, key: Any, default: Any = None) -> Any:
        return self._handler if is_control_key(key) else super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._handler if is_control_key(key) else super().__getitem__(key)


# -- SGLang's parallel layout (read here only) -----------------------------------------------------------
def _parallel() -> Any:
    context = sys.modules.get("sglang.srt.runtime_context")  # loaded in every scheduler; not imported here
    if context is None:
        return None
    try:
        p = context.get_parallel()
        int(p.tp_size)  # a published context (not one outside a scheduler)
        return p
    except Exception:  # noqa: BLE001 - no SGLang runtime (unit tests): one rank
        return None


def _local_control(p: Any) -> bool:
    """Control messages go to every attention-DP leader (instead of TP rank 0 only)."""
    try:
        joiner = bool(sys.modules["sglang.srt.runtime_context"].get_exec().moe.is_ep_scale_joiner)
    except Exception:  # noqa: BLE001
        joiner = False
    return bool(getattr(p, "attn_dp_enabled", False)
                and (getattr(p, "enable_dp_attention_local_control_broadcast", False) or joiner))


def control_group() -> Any:
    """The group a control message was broadcast in (its ranks handle it together), or None (one rank)."""
    p = _parallel()
    if p is None:
        return None
    group = p.attn_tp_group if _local_control(p) else p.tp_group
    return group if getattr(group, "world_size", 1) > 1 else None


def is_message_source() -> bool:
    """Whether this rank received the message from the HTTP process (the others got it from it)."""
    p = _parallel()
    if p is None:
        return True
    return (p.attn_tp_rank == 0) if _local_control(p) else (p.tp_rank == 0)


def group_rank() -> int:
    """This scheduler's rank in the whole group (unique over nodes and DP replicas)."""
    import torch.distributed as dist

    world = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    p = _parallel()
    dp = getattr(p, "dp_rank", None) if p is not None else None
    if isinstance(dp, int) and dp > 0:
        world += dp * int(p.tp_size) * int(p.pp_size)
    return int(world)


def _gather(group: Any, item: dict[str, Any]) -> list[dict[str, Any]]:
    if group is None:
        return [item]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, item, group=group.cpu_group)
    return list(out)


# -- the rank's state ------------------------------------------------------------------------------------
def rank_status(runtime: AdminTarget, *, ok: bool = True, why: str = "") -> dict[str, Any]:
    """This rank's state for the group view: a config staged for a later forward (``at_forward``) is reported
    as the rank's config, with the forward count it takes effect at."""
    staged = runtime.staged
    settings, version, source = (staged.settings, staged.version, staged.source) if staged is not None else \
        (runtime.settings, runtime.version, runtime.config_source)
    return {"rank": runtime.group_rank, "tp_rank": runtime.rank, "pid": os.getpid(), "node": os.uname().nodename,
            "version": version, "config": config_of(settings), "source": source,
            "at_forward": None if staged is None else staged.at_forward, "forwards": runtime.forwards,
            "shared_rows": runtime.shared_rows, "selecting": not runtime.diverged, "ok": ok, "why": why,
            "time": time.time()}


def _try_apply(runtime: AdminTarget, message: dict[str, Any]) -> str:
    """Apply ``message``'s config on this rank; '' on success, else why not. The config was validated
    where it entered (the HTTP process, against the served model) and is trusted here: it is only made
    into this rank's settings and checked against what a rank alone knows (its captured CUDA graphs,
    its device knobs). Never raises; on failure the rank is on its previous config."""
    version, config = int(message["version"]), message["config"]
    try:
        new = settings_from_config(runtime.settings, config)
        frozen = runtime.capture_refusal(new)
        if frozen is not None:
            raise ValueError(frozen)
        fault = refusal_fault(config)
        if fault == "refuse":
            raise ValueError("refused by XSHARE_FAULT_ADMIN (test fault injection)")
    except Exception as exc:  # noqa: BLE001 - any problem refuses the change on this rank
        return f"invalid on this rank: {exc}"
    old, old_version, old_source = runtime.settings, runtime.version, runtime.config_source
    try:
        if runtime.observe:  # the window so far belongs to the old config: read exactly, waiting for the
            runtime.flush_metrics(wait=True)  # device once (a rare change, made between batches)
        runtime.set_config(new, version, source=message.get("source", "admin change"),
                           at_forward=message.get("at_forward"))
        if fault == "raise":
            raise RuntimeError("raised in the apply step by XSHARE_FAULT_ADMIN (test fault injection)")
    except Exception as exc:  # noqa: BLE001 - the apply step never takes a scheduler down
        why = f"apply failed: {type(exc).__name__}: {exc}"
        _restore(runtime, old, old_version, old_source)
        return why
    return ""


def _restore(runtime: AdminTarget, settings: PluginSettings, version: int, source: str) -> None:
    try:
        runtime.set_config(settings, version, source=source)
    except Exception as exc:  # noqa: BLE001 - a config the rank cannot go back to: it stops selecting
        runtime.mark_diverged()
        log.error("xshare: rank %d cannot return to config v%d (%s): it stops selecting (SGLang's routing) "
                  "until the next config change", runtime.group_rank, version, exc)


def handle_message(runtime: AdminTarget, key: str) -> str | None:
    """Handle one config message on this rank, together with its group; None when the whole group
    applied it, else the reason (naming the rank) every rank of the group went back for."""
    runtime.record_group_rank(group_rank())
    why = ""
    message: dict[str, Any] | None = None
    try:
        message = decode_message(key, runtime.channel_key, verify=is_message_source())
    except ValueError as exc:
        why = f"message refused: {exc}"
    old = (runtime.settings, runtime.version, runtime.config_source)
    staged = runtime.staged  # an earlier change the group took, not in force yet: kept if this one is refused
    if message is not None:
        why = _try_apply(runtime, message)
    group = control_group()
    try:
        statuses = _gather(group, rank_status(runtime, ok=not why, why=why))
        failed = [s for s in statuses if not s["ok"]]
        if failed and message is not None and not why:  # applied here, refused elsewhere: go back
            _restore(runtime, *old)
            if staged is not None:
                runtime.set_config(staged.settings, staged.version, source=staged.source, at_forward=staged.at_forward)
        if failed:
            reasons = {s["rank"]: s["why"] for s in failed}
            statuses = [{**s, "ok": s["rank"] not in reasons, "why": reasons.get(s["rank"], "")}
                        for s in _gather(group, rank_status(runtime))]
    except Exception as exc:  # noqa: BLE001 - the group cannot agree: this rank stops selecting
        runtime.mark_diverged()
        log.error("xshare: rank %d cannot reach its group for a config change (%s): it stops selecting",
                  runtime.group_rank, exc)
        return f"rank {runtime.group_rank}: the group exchange failed: {exc}"
    runtime.record_group_view(statuses)
    if failed:
        runtime.count_config_change("rejected")
        first = failed[0]
        return f"rank {first['rank']} ({first['node']}): {first['why']}"
    runtime.mark_converged()
    runtime.count_config_change("applied")
    log.info("xshare: rank %d applied config v%d (%s): %s", runtime.group_rank, runtime.version,
             runtime.config_source, runtime.settings.describe())
    return None


def update_handlers_hook(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController._update_handlers``: adds the config message's handler.
    Its ``validate`` does the whole change (all ranks of the group, all or none), so that a refusal
    reaches SGLang's reply; ``apply`` has nothing left to do."""
    from sglang.srt.managers.scheduler_components.internal_state import UpdateRejected, _UpdateHandler

    runtime = rt_mod.get()
    if runtime is None or not isinstance(result, dict):
        return None

    def validate_key(key: str, value: Any) -> None:
        try:
            why = handle_message(runtime, str(key))
        except Exception as exc:  # noqa: BLE001 - nothing here may end the scheduler
            why = f"rank {runtime.group_rank}: {type(exc).__name__}: {exc}"
        if why is not None:
            log.warning("xshare: config change refused on rank %d's group: %s", runtime.group_rank, why)
            raise UpdateRejected(f"xshare: {why}")

    def apply(key: str, value: Any) -> None:
        return None

    return _Handlers(result, _UpdateHandler(validate_key, apply))


def get_internal_state_hook(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController.get_internal_state``: the group view (every rank's
    version and config as of the last change) and this rank's last metrics summary, under VIEW_KEY."""
    runtime = rt_mod.get()
    state = getattr(result, "internal_state", None)
    if runtime is None or not isinstance(state, dict):
        return None
    try:
        runtime.record_group_rank(group_rank())
        ranks = runtime.group_view or [rank_status(runtime)]
        state[VIEW_KEY] = {"ranks": ranks, "stats": runtime.last_summary}
    except Exception as exc:  # noqa: BLE001 - the view is a report: it never fails SGLang's reply
        runtime.log_once("view", logging.ERROR, "xshare: cannot report the config view: %s", exc)
    return None


def on_idle_hook(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: the figures of the forwards since the last idle moment, read exactly,
    into the metrics window and the stats file (:func:`xshare.sglang.observe.report.scheduler_idle`; a
    host check when nothing ran)."""
    runtime = rt_mod.get()
    if runtime is not None:
        report.scheduler_idle(runtime)
    return None


def scheduler_setup(runtime: AdminTarget) -> None:
    """In a scheduler process, once its runtime exists: the channel key (taken out of the environment,
    so this process's children do not inherit it), its group rank and the metrics exporter."""
    runtime.set_channel_key(os.environ.pop(CHANNEL_KEY_ENV, ""))

    def keep(summary: dict[str, Any]) -> None:
        runtime.record_summary({"rank": runtime.group_rank, "time": time.time(), **summary})

    runtime.enable_observability(metrics.create(runtime.rank, on_flush=keep))


__all__ = ["CONTROL_KEY", "control_group", "get_internal_state_hook", "group_rank", "handle_message",
           "is_message_source", "on_idle_hook", "rank_status", "scheduler_setup", "update_handlers_hook"]
