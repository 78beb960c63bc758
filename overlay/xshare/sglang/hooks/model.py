"""The hooks on SGLang's model lifecycle (SGLang 0.5.23 targets): the loaded model and EPLB's rebalances.

* ``sglang.srt.model_executor.model_runner.ModelRunner.load_model`` (AFTER): the start-up coverage
  report (:mod:`xshare.sglang.observe.coverage`) of the loaded model, and per-layer settings checked
  against its MoE layers;
* ``sglang.srt.eplb.expert_location.ExpertLocationMetadata.update`` (AFTER): EPLB rebalanced; the
  placement cache of the GPU-aware policies follows;
* ``sglang.srt.eplb.eplb_manager.EPLBManager._compute_expert_location_metadata`` (AROUND, with
  ``XSHARE_REPLICA_PLAN=predictive``): the plugin's replica plan (:mod:`xshare.sglang.replicas`)
  instead of SGLang's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from xshare.sglang import state as state_mod
from xshare.sglang.model_shape import moe_shape
from xshare.sglang.observe import report
from xshare.sglang.observe.coverage import survey

log = logging.getLogger("xshare.sglang")

LOAD_MODEL_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
EPLB_UPDATE_TARGET = "sglang.srt.eplb.expert_location.ExpertLocationMetadata.update"
COMPUTE_METADATA_TARGET = "sglang.srt.eplb.eplb_manager.EPLBManager._compute_expert_location_metadata"


# -- the start-up coverage report ------------------------------------------------------------------
def load_model_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ModelRunner.load_model(self)``: the coverage report of the loaded model, before any
    request (a draft model's runner is not reported: its layers are always left to SGLang)."""
    runtime = state_mod.get()
    if runtime is None or bool(getattr(self, "is_draft_worker", False)):
        return None
    try:
        device_type = str(getattr(self, "device", "cpu")).split(":")[0]
        statuses = survey(getattr(self, "model", None), device_type)
    except Exception as exc:  # noqa: BLE001 - diagnostics only: serving goes on
        runtime.log_once("startup_coverage", logging.ERROR, "xshare: cannot survey the model's MoE layers: %s", exc,
                         exc_info=True)
        return None
    report.startup_coverage(runtime, statuses, device_type)  # raises CoverageRefused with XSHARE_REQUIRE_COVERAGE
    top_k, num_experts = moe_shape(getattr(getattr(self, "model_config", None), "hf_text_config", None))
    moe_layers = tuple(sorted(i for i, st in statuses.items() if st != "draft_layer"))
    report.check_model_settings(runtime, num_experts, top_k, moe_layers)  # raises SettingsRefused
    return None


# -- EPLB ------------------------------------------------------------------------------------------
def expert_location_update_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ExpertLocationMetadata.update(self, other, update_layer_ids)``: EPLB rebalanced; the new
    placements of those layers are written into the device tensors the selector reads, in place, so
    the CUDA graphs captured before read them too (:meth:`~xshare.sglang.placement.PlacementCache.refresh`)."""
    runtime = state_mod.get()
    if runtime is None:
        return None
    layer_ids = kwargs.get("update_layer_ids", args[1] if len(args) > 1 else None)
    try:
        rewritten = runtime.placements.refresh(layer_ids)
    except Exception as exc:  # noqa: BLE001 - a lookup after the rebalance refreshes the layer again
        runtime.log_once("eplb_refresh", logging.ERROR, "xshare: cannot refresh the placements after EPLB: %s", exc,
                         exc_info=True)
        return None
    if rewritten:
        log.info("xshare: EPLB rebalanced: %d layer placements rewritten in place", rewritten)
    return None


# -- predictive replica plans ---------------------------------------------------------------------
def compute_metadata_hook(original: Any, self: Any, logical_count: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``EPLBManager._compute_expert_location_metadata(self, logical_count, *, broadcast_over_world)``."""
    runtime = state_mod.get()
    if runtime is None or runtime.settings.replica_plan != "predictive" or kwargs.get("broadcast_over_world"):
        return original(self, logical_count, *args, **kwargs)
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, get_global_expert_location_metadata

    current_meta = get_global_expert_location_metadata()
    current = current_meta.physical_to_logical_map_cpu
    planner = runtime.replicas
    settings = runtime.settings
    try:
        p2l = planner.plan(logical_count, current.numpy(), int(current_meta.ep_size), settings.replica_planner,
                           settings.replica_alpha)
    except Exception as exc:  # noqa: BLE001 - serving never fails because of the plugin
        planner.refused += 1
        planner.last_error = str(exc)
        runtime.log_once(f"replica_plan:{exc}", logging.ERROR,
                         "xshare: no predictive replica plan, the placement stays as it is: %s", exc)
        p2l = current.numpy()
    else:
        planner.plans += 1
    return ExpertLocationMetadata.init_by_mapping(self._model_config, torch.from_numpy(np.ascontiguousarray(p2l)),
                                                  moe_ep_rank=_moe_ep_rank())


def _moe_ep_rank() -> int | None:
    """This process's EP rank (None where SGLang has not written it: init_by_mapping then asks torch)."""
    from sglang.srt.runtime_context import get_parallel

    try:
        return int(get_parallel().moe_ep_rank or 0)
    except Exception:  # noqa: BLE001 - no parallel context in this process: init_by_mapping asks torch
        return None
