"""The SGLang plugin entry point (group ``sglang.srt.plugins``, name ``xshare``).

SGLang calls :func:`register` in every process it starts (launcher, each scheduler = each TP/EP
rank, detokenizer, DP controller) before it applies the registered hooks. :func:`register`:

* reads the settings (``XSHARE_*`` / ``XSHARE_CONFIG``); a bad setting stops the process with a
  message naming it (``SystemExit``, which SGLang's plugin loader does not swallow), so the
  launcher refuses to start before any scheduler is spawned;
* does nothing more unless ``XSHARE_ENABLE`` is on;
* in the HTTP process, checks the per-request exact-routing flag (:mod:`xshare.sglang.requests`);
* in a scheduler process (``run_scheduler_process``, or a Ray ``SchedulerActor`` once
  ``patches/`` is applied) creates the process's :class:`~xshare.sglang.runtime.Runtime` and
  registers the hooks of :mod:`xshare.sglang.hooks`. Other processes get no hooks (they never run
  the model; this also spares them importing the model code). ``XSHARE_HOOK_ALL_PROCESSES=1``
  registers them everywhere (for launchers that run the model in another kind of process).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from importlib import metadata
from types import FrameType

from xshare.sglang import PLUGIN_NAME, SGLANG_VERSION

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


def register() -> None:
    """Entry point called by SGLang's ``load_plugins()``."""
    global _registered, _verify_registered
    from xshare.selection.schema import parse_bool_text
    from xshare.sglang.settings import HOOK_ALL_ENV, SettingError, load_settings

    try:
        settings = load_settings()
    except SettingError as exc:
        refuse(str(exc))
        return
    from xshare.sglang import admin

    admin_on = admin.admin_configured()
    if not settings.enabled and not admin_on:
        log.info("xshare: plugin loaded, selector disabled (set XSHARE_ENABLE=1 to enable it)")
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from xshare.sglang import requests

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

    from xshare.sglang import hooks, replicas, runtime

    rank = _rank_of(frame)
    rt = runtime.install(settings, rank=rank)
    try:
        admin.scheduler_setup(rt)
    except Exception as exc:  # noqa: BLE001 - observability never stops serving
        log.error("xshare: metrics/admin setup failed in pid %d: %s", os.getpid(), exc, exc_info=True)
    HookRegistry.register(admin.UPDATE_HANDLERS_TARGET, admin.update_handlers_hook, HookType.AFTER)
    HookRegistry.register(admin.GET_STATE_TARGET, admin.get_internal_state_hook, HookType.AFTER)
    HookRegistry.register(admin.ON_IDLE_TARGET, admin.on_idle_hook, HookType.AFTER)
    HookRegistry.register(hooks.POST_PROCESS_TARGET, hooks.post_process_topk_ids_hook, HookType.AROUND)
    HookRegistry.register(hooks.FORWARD_TARGET, hooks.model_runner_forward_hook, HookType.AROUND)
    HookRegistry.register(hooks.CAPTURE_TARGET, hooks.capture_one_shape_hook, HookType.AROUND)
    HookRegistry.register(hooks.LOAD_MODEL_TARGET, hooks.load_model_hook, HookType.AFTER)
    HookRegistry.register(hooks.EPLB_UPDATE_TARGET, hooks.expert_location_update_hook, HookType.AFTER)
    if settings.replica_plan == "predictive":
        HookRegistry.register(replicas.COMPUTE_METADATA_TARGET, replicas.compute_metadata_hook, HookType.AROUND)
    if settings.routed_topk:
        HookRegistry.register(hooks.BIND_RUNNER_TARGET, hooks.bind_runner_backend_hook, HookType.AFTER)
    if hooks.triton_routing_available():
        HookRegistry.register(hooks.TOPK_FORWARD_CUDA_TARGET, hooks.topk_forward_cuda_hook, HookType.AROUND)
        HookRegistry.register(hooks.TRITON_ROUTING_TARGET, hooks.triton_routing_hook, HookType.AROUND)
    HookRegistry.register(requests.INIT_FORWARD_BATCH_TARGET, requests.init_forward_batch_hook, HookType.AFTER)
    if settings.profile:
        HookRegistry.register(hooks.MOE_FORWARD_TARGET, hooks.moe_forward_hook, HookType.AROUND)
    if settings.deepep_mode == "global":
        HookRegistry.register(hooks.EMPTY_TOPK_TARGET, hooks.empty_topk_output_hook, HookType.AFTER)
    _registered = True
    log.info("xshare: %s plugin registered its hooks in pid %d (rank %d): %s", PLUGIN_NAME, os.getpid(), rank,
             settings.describe())
