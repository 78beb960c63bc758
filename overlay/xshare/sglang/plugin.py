"""The SGLang plugin entry point (group ``sglang.srt.plugins``, name ``xshare``).

SGLang calls :func:`register` in every process it starts (launcher, each scheduler = each TP/EP
rank, detokenizer, DP controller) before it applies the registered hooks. :func:`register`:

* reads the settings (``XSHARE_*`` / ``XSHARE_CONFIG``); a bad setting stops the process with a
  message naming it (``SystemExit``, which SGLang's plugin loader does not swallow), so the
  launcher refuses to start before any scheduler is spawned;
* does nothing more unless ``XSHARE_ENABLE`` is on;
* in the HTTP process, checks the per-request exact-routing flag (:mod:`xshare.sglang.hooks.requests`);
* in a scheduler process (``run_scheduler_process``, or a Ray ``SchedulerActor`` once
  ``patches/`` is applied) creates the process's :class:`~xshare.sglang.state.ProcessState` and
  registers the hooks of :func:`scheduler_hooks`, the one table of every hook the plugin registers
  there. Other processes get no hooks (they never run the model). ``XSHARE_HOOK_ALL_PROCESSES=1``
  registers them everywhere (for launchers that run the model in another kind of process).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from types import FrameType
from typing import Any

from xshare.selection.schema import parse_bool_text
from xshare.sglang import PLUGIN_NAME, SGLANG_VERSION, admin
from xshare.sglang import state as state_mod
from xshare.sglang.hooks import forward, model, requests, routing
from xshare.sglang.observe.coverage import triton_routing_available
from xshare.sglang.settings import HOOK_ALL_ENV, PluginSettings, SettingError, load_settings

log = logging.getLogger("xshare.sglang")

_SCHEDULER_FUNCS = {("sglang.srt.managers.scheduler", "run_scheduler_process"),
                    ("sglang.srt.ray.scheduler_actor", "__init__")}
_registered = False
_verify_registered = False


def _scheduler_frame() -> FrameType | None:
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in _SCHEDULER_FUNCS:
            return frame
        frame = frame.f_back
    return None


def _rank_of(frame: FrameType | None) -> int:
    if frame is None:
        return 0
    for name in ("moe_ep_rank", "tp_rank"):
        v = frame.f_locals.get(name)
        if isinstance(v, int):
            return v
    return 0


def refuse(message: str) -> None:
    """Stop this process with ``message`` (printed once to stderr)."""
    text = f"xshare: refusing to start: {message}"
    log.error(text)
    raise SystemExit(text)


@dataclass(frozen=True)
class Hook:
    """One registration with SGLang's ``HookRegistry``: ``function`` runs ``kind`` (AFTER / AROUND)
    ``target`` in a scheduler process, when ``when`` holds for the start-up settings."""

    target: str
    function: Callable[..., Any]
    kind: str
    when: Callable[[PluginSettings], bool] = lambda settings: True


def scheduler_hooks() -> tuple[Hook, ...]:
    """Every hook the plugin registers in a scheduler process, in registration order."""
    return (
        Hook(admin.UPDATE_HANDLERS_TARGET, admin.update_handlers_hook, "AFTER"),
        Hook(admin.GET_STATE_TARGET, admin.get_internal_state_hook, "AFTER"),
        Hook(admin.ON_IDLE_TARGET, admin.on_idle_hook, "AFTER"),
        Hook(routing.POST_PROCESS_TARGET, routing.post_process_topk_ids_hook, "AROUND"),
        *(Hook(target, routing.gate_hook, "AROUND", lambda s: s.cpu_kernel) for target in routing.GATE_TARGETS),
        Hook(forward.FORWARD_TARGET, forward.model_runner_forward_hook, "AROUND"),
        Hook(forward.CAPTURE_TARGET, forward.capture_one_shape_hook, "AROUND"),
        Hook(model.LOAD_MODEL_TARGET, model.load_model_hook, "AFTER"),
        Hook(model.EPLB_UPDATE_TARGET, model.expert_location_update_hook, "AFTER"),
        Hook(model.COMPUTE_METADATA_TARGET, model.compute_metadata_hook, "AROUND",
             lambda s: s.replica_plan == "predictive"),
        Hook(routing.BIND_RUNNER_TARGET, routing.bind_runner_backend_hook, "AFTER", lambda s: s.routed_topk),
        Hook(routing.TOPK_FORWARD_CUDA_TARGET, routing.topk_forward_cuda_hook, "AROUND",
             lambda s: triton_routing_available()),
        Hook(routing.TRITON_ROUTING_TARGET, routing.triton_routing_hook, "AROUND",
             lambda s: triton_routing_available()),
        Hook(requests.INIT_FORWARD_BATCH_TARGET, requests.init_forward_batch_hook, "AFTER"),
        Hook(forward.MOE_FORWARD_TARGET, forward.moe_forward_hook, "AROUND", lambda s: s.profile),
        Hook(routing.EMPTY_TOPK_TARGET, routing.empty_topk_output_hook, "AFTER", lambda s: s.deepep_mode == "global"),
    )


def register() -> None:
    """Entry point called by SGLang's ``load_plugins()``."""
    global _registered, _verify_registered
    try:
        settings = load_settings()
    except SettingError as exc:
        refuse(str(exc))
        return
    admin_on = admin.admin_configured()
    if not settings.enabled and not admin_on:
        log.info("xshare: plugin loaded, selector disabled (set XSHARE_ENABLE=1 to enable it)")
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    frame = _scheduler_frame()
    if frame is None and not _verify_registered:
        # the HTTP process checks every request's sampling parameters: a bad exact-routing flag is a 400
        HookRegistry.register(requests.VERIFY_TARGET, requests.verify_hook, HookType.AFTER)
        _verify_registered = True
    if frame is None and parse_bool_text(os.environ.get(HOOK_ALL_ENV, "")) is not True:
        if multiprocessing.parent_process() is None:  # the launcher, which serves HTTP
            admin.install_routes(settings)
        log.info("xshare: %s (%s); hooks go into the scheduler processes",
                 "enabled" if settings.enabled else "disabled, admin API on", settings.describe())
        return
    if _registered:
        return
    try:
        version = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        version = "unknown"
    if version != SGLANG_VERSION:
        log.warning("xshare: written for sglang %s, running on %s: the hook targets may have moved",
                    SGLANG_VERSION, version)
    rank = _rank_of(frame)
    state = state_mod.install(settings, rank=rank)
    try:
        admin.scheduler_setup(state)
    except Exception as exc:  # noqa: BLE001 - observability never stops serving
        log.error("xshare: metrics/admin setup failed in pid %d: %s", os.getpid(), exc, exc_info=True)
    for hook in scheduler_hooks():
        if hook.when(settings):
            HookRegistry.register(hook.target, hook.function, getattr(HookType, hook.kind))
    _registered = True
    log.info("xshare: %s plugin registered its hooks in pid %d (rank %d): %s", PLUGIN_NAME, os.getpid(), rank,
             settings.describe())
