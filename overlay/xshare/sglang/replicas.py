"""Predictive replica plans handed to SGLang's own EPLB rebalance (``--enable-eplb``).

SGLang's ``EPLBManager`` rebalances every ``--eplb-rebalance-num-iterations`` forwards: it dumps its
expert-distribution recorder's window (``logical_count`` [passes, layers, E], all-reduced over the ranks)
and asks ``EPLBManager._compute_expert_location_metadata(logical_count)`` for the new
``ExpertLocationMetadata`` (EPLB on the window's total), then moves the expert weights
(``ExpertLocationUpdater``) and updates the metadata in place. The recorder counts the routing the
selector produced: the routing hook rewrites the ids before SGLang's ``select_experts`` records them.

With ``XSHARE_REPLICA_PLAN=predictive`` the AROUND hook :func:`xshare.sglang.hooks.model.compute_metadata_hook`
answers that
question instead: the forecast is an EWMA over the rebalance windows (``XSHARE_REPLICA_ALPHA`` on the
newest; 1 = the window alone, SGLang's own input), the plan is :func:`xshare.eval.predict.plan_layers`
(``XSHARE_REPLICA_PLANNER``: ``greedy`` spare slots beside a fixed home, or ``eplb`` on the forecast,
renumbered to move as little as it can), with SGLang's own slot count (E + ``--ep-num-redundant-experts``
over the EP ranks), built into metadata by SGLang's ``ExpertLocationMetadata.init_by_mapping``. SGLang
then moves the weights and updates its metadata as for its own plan; the placement cache of the
GPU-aware policies follows (:func:`xshare.sglang.hooks.model.expert_location_update_hook`).

Every rank gets the same all-reduced window, so every rank computes the same plan. A plan that cannot be
made (spare slots that do not split evenly over the EP ranks, a plan that does not fit them) changes
nothing: the hook returns the map in force (SGLang moves no weight), logs the reason naming the setting
and counts it. Elastic-EP rebalances after a scale-up (``broadcast_over_world``) are left to SGLang.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from xshare.eval.predict import check_plan, plan_layers, spare_slots

log = logging.getLogger("xshare.sglang")

class ReplicaPlanner:
    """The forecast across rebalances (float64 [L, E]) and the counts of plans made and refused."""

    def __init__(self) -> None:
        self.forecast: np.ndarray | None = None
        self.plans = 0
        self.refused = 0
        self.last_error: str | None = None

    def observe(self, logical_count: Any, alpha: float) -> np.ndarray:
        """Fold one rebalance window (logical_count [passes, L, E] or [L, E]) into the forecast."""
        window = torch.as_tensor(logical_count).double().cpu()
        if window.ndim == 3:
            window = window.sum(0)
        load = window.numpy()
        if self.forecast is None or self.forecast.shape != load.shape:
            self.forecast = load.copy()
        else:
            self.forecast = alpha * load + (1 - alpha) * self.forecast
        return self.forecast

    def plan(self, logical_count: Any, current: np.ndarray, ep_size: int, planner: str, alpha: float) -> np.ndarray:
        """phy2log int64 [L, P] for the window ``logical_count``, with the slots of ``current`` [L, P]."""
        layers, num_physical = current.shape
        load = self.observe(logical_count, alpha)
        if load.shape[0] != layers:
            raise ValueError(f"XSHARE_REPLICA_PLAN=predictive: the recorder has {load.shape[0]} layers, the expert "
                             f"location metadata {layers}")
        num_experts = load.shape[1]
        slots = spare_slots(num_physical, num_experts, ep_size)
        out = plan_layers(load, ep_size, slots, planner, previous=current)
        for row in out:
            check_plan(row, num_experts, ep_size, slots)
        return out
