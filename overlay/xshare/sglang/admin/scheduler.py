"""The admin endpoint's scheduler side: the handler SGLang's internal-state controller calls with a
config version (validate, then apply at a forward-batch boundary), the rank files and the metrics
exporter of each scheduler."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from xshare._io import write_json_atomic
from xshare.sglang.admin.common import CONTROL_KEY, STATE_DIR_ENV, state_dir
from xshare.sglang.admin.config import config_of, settings_from_config

log = logging.getLogger("xshare.sglang")


def write_rank_file(runtime: Any) -> None:
    d = state_dir()
    if d is None:
        return
    write_json_atomic(d / f"rank-{runtime.rank}.json", {"rank": runtime.rank, "pid": os.getpid(),
                                                       "version": runtime.version,
                                                       "config": config_of(runtime.settings), "time": time.time()})


def write_rank_stats(rank: int, summary: dict[str, Any]) -> None:
    d = state_dir()
    if d is not None:
        write_json_atomic(d / f"rank-{rank}-stats.json", {"rank": rank, "time": time.time(), **summary})


def _read_config_file(version: int) -> dict[str, Any]:
    d = state_dir()
    if d is None:
        raise ValueError(f"{STATE_DIR_ENV} is not set in this scheduler")
    path = d / f"config-v{int(version)}.json"
    data = json.loads(path.read_text())
    if int(data.get("version", -1)) != int(version):
        raise ValueError(f"{path}: version mismatch")
    return data["config"]


def update_handlers_hook(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``SchedulerInternalStateController._update_handlers``: adds ``xshare_config_version``."""
    from sglang.srt.managers.scheduler_components.internal_state import UpdateRejected, _UpdateHandler

    from xshare.sglang import runtime as rt_mod

    runtime = rt_mod.get()
    if runtime is None or not isinstance(result, dict):
        return None
    pending: dict[int, Any] = {}

    def validate(key: str, value: Any) -> None:
        try:
            new = settings_from_config(runtime.settings, _read_config_file(int(value)))
        except Exception as exc:  # noqa: BLE001 - any problem refuses the update on this rank
            if runtime.metrics is not None:
                runtime.metrics.config_change("rejected")
            raise UpdateRejected(f"xshare: config version {value} refused on rank {runtime.rank}: {exc}") from None
        pending[int(value)] = new

    def apply(key: str, value: Any) -> None:
        version = int(value)
        new = pending.pop(version)
        old = runtime.settings.describe()
        old_enabled = runtime.settings.enabled
        if runtime.observe:
            runtime.flush_metrics()  # the window so far belongs to the old config
        runtime.set_config(new, version)
        write_rank_file(runtime)
        if runtime.metrics is not None:
            runtime.metrics.config_change("applied")
        log.info("xshare: rank %d applied config v%d: enabled %s -> %s; %s -> %s", runtime.rank, version,
                 old_enabled, new.enabled, old, new.describe())
        return None

    result[CONTROL_KEY] = _UpdateHandler(validate, apply)
    return result


def on_idle_hook(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: flush a metrics window that has not been flushed yet (host check)."""
    from xshare.sglang import runtime as rt_mod

    runtime = rt_mod.get()
    if runtime is not None and runtime.observe and runtime.stats.forwards != runtime._last_flush:
        runtime.flush_metrics()
    return None


def scheduler_setup(runtime: Any) -> None:
    """In a scheduler process, once its runtime exists: the metrics exporter and the rank file."""
    from xshare.sglang import metrics

    rank = runtime.rank
    on_flush = (lambda summary: write_rank_stats(rank, summary)) if state_dir() is not None else None
    runtime.enable_observability(metrics.create(rank, on_flush=on_flush))
    write_rank_file(runtime)


