"""Replay under placements that change over time: the comparison of ``xshare eval --placement predictive``.

Each :class:`Variant` is replayed over the same batches and policy settings:

* ``none``        the contiguous placement (expert e on GPU e // (E / G)), no spare slots;
* ``eplb``        EPLB's static plan from the calibration loads, R spare slots per GPU (R·G redundant
                  experts), never changed;
* ``predictive``  a plan made every N steps (:func:`xshare.eval.predict.plan_replicas`) from a forecast
                  of the next steps' load (:mod:`xshare.eval.predict`), R spare slots per GPU.

A forecaster sees what the process would see: the routing each policy produced (the selected routing
for ``xshare_ep``, the plain top-k for ``topk``), step by step, layer by layer in order, so a policy's
replicas are planned for its own load. Layers are replayed in model order inside one unit (a
``cross_layer`` forecast reads the previous layer's routing of the same step); units are (variant,
batch size) pairs, run in parallel with ``--jobs``.

Per variant and setting it reports (besides the usual row): the re-plans, the expert copies they
loaded (:func:`xshare.eval.predict.moved_experts`) and their bytes per decode step for the whole model
(the layer shape of the cost-model preset), the forecast's accuracy (hot-set precision / recall, load
error), and the per-step timeline of the busiest GPU's token load (mean over layers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xshare.eval.predict import (
    Accuracy,
    check_plan,
    make_forecaster,
    moved_experts,
    plan_replicas,
    step_loads,
    transitions,
)
from xshare.eval.replay import (
    LayerStats,
    Plan,
    ReplayResult,
    Setting,
    concat_stats,
    layer_inputs,
    route_and_measure,
    run_units,
    unit_settings,
)
from xshare.eval.summary import summarise
from xshare.eval.traces import Trace
from xshare.selection import Placement

KINDS = ("none", "eplb", "predictive")


@dataclass(frozen=True)
class Variant:
    """One placement of the comparison (see the module docstring)."""

    kind: str
    replica_slots: int = 0
    predictor: str | None = None
    replan_every: int | None = None
    planner: str = "eplb"

    def label(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "eplb":
            return f"eplb R={self.replica_slots}"
        return f"{self.predictor} R={self.replica_slots} N={self.replan_every} {self.planner}"


@dataclass
class Schedule:
    """What every unit shares (picklable): the plan, the variants, the calibration.

    calib_loads float [L, E]: tokens routed to each expert per trace layer on ``calib_tokens`` tokens;
    static: {R: phy2log int64 [L, P]} EPLB's static plans; transitions: {l: [E, E]} from layer l - 1;
    expert_bytes / moe_layers: the layer shape for moved bytes (None: counts only).
    """

    plan: Plan
    variants: list[Variant]
    calib_loads: np.ndarray
    calib_tokens: int
    static: dict[int, np.ndarray]
    transitions: dict[int, np.ndarray]
    alpha: float
    expert_bytes: float | None = None
    moe_layers: int | None = None
    link_bandwidth: float | None = None


@dataclass
class VariantStats:
    """Per setting: copies loaded by re-plans (replayed layers), re-plans per layer, forecast accuracy,
    the replayed layers' routed loads of every step."""

    moved: int = 0
    replans: int = 0
    accuracy: Accuracy = field(default_factory=Accuracy)


def build_schedule(plan: Plan, variants: Sequence[Variant], static: dict[int, np.ndarray], calibration: Trace, *,
                   alpha: float, expert_bytes: float | None = None, moe_layers: int | None = None,
                   link_bandwidth: float | None = None) -> Schedule:
    """Validate the variants (errors name the option) and compute the transition matrices once.

    static: {R: phy2log int64 [L, E + R·G]} EPLB's static plan for every R of the variants
    (:func:`xshare.eval.placements.build_placements`); calibration: the trace the forecasts start from."""
    e = plan.trace.num_experts
    g = plan.placements[0].num_gpus
    for v in variants:
        if v.kind not in KINDS:
            raise ValueError(f"--placement {v.kind!r}: choose one of {', '.join(KINDS)}")
        if v.replan_every is not None and v.replan_every < 1:
            raise ValueError(f"--replan-every {v.replan_every}: must be >= 1 (steps)")
        if v.kind == "none":
            continue
        if v.replica_slots not in static:
            raise ValueError(f"--replica-slots {v.replica_slots}: no static plan was built for it")
        for row in static[v.replica_slots]:
            check_plan(row, e, g, v.replica_slots)
        if v.kind == "predictive":
            make_forecaster(v.predictor or "", np.ones(e), alpha=alpha)
            plan_replicas(np.ones(e), g, v.replica_slots, v.planner)
    loads = calibration.expert_loads()
    trans = transitions(calibration.topk_ids, e, plan.layers) if any(
        v.predictor == "cross_layer" for v in variants) else {}
    return Schedule(plan, list(variants), loads, calibration.num_tokens, static, trans, alpha, expert_bytes,
                    moe_layers, link_bandwidth)


@torch.inference_mode()
def replay_variant(sched: Schedule, vi: int, bkey: int | None) -> tuple[dict[Setting, list[LayerStats]],
                                                                        dict[Setting, VariantStats]]:
    """Every setting of one batch size under variant ``vi``, layer by layer in order."""
    plan = sched.plan
    v = sched.variants[vi]
    trace = plan.trace
    e = trace.num_experts
    g = plan.placements[0].num_gpus
    batches = plan.batches[bkey]
    nb = batches.num_batches
    base = sched.calib_loads * (float(batches.sizes.mean()) / sched.calib_tokens)  # [L, E] per step
    valid_np = batches.tokens >= 0
    settings = unit_settings(plan, bkey)
    stats: dict[Setting, list[LayerStats]] = {s: [] for s in settings}
    extra = {s: VariantStats() for s in settings}
    seen: dict[Setting, tuple[int, np.ndarray]] = {}  # the last replayed layer's routed loads [NB, E]
    every = nb if v.kind != "predictive" else int(v.replan_every or nb)
    for layer in plan.layers:
        inp = layer_inputs(plan, bkey, layer)
        for s in settings:
            cfg = s.config().for_layer(layer, range(trace.num_layers))
            if v.kind == "none":
                st, _ = route_and_measure(plan, cfg, inp, Placement.contiguous(e, g), layer)
                stats[s].append(st)
                continue
            forecaster = None
            if v.kind == "predictive":
                prev = seen.get(s)
                if prev is None or prev[0] != layer - 1:  # the previous layer was not replayed: its stored routing
                    prev = (layer - 1, step_loads(trace.topk_ids[layer - 1][batches.tokens.clip(0)], valid_np, e)) \
                        if layer >= 1 else None
                forecaster = make_forecaster(
                    v.predictor or "", base[layer], alpha=sched.alpha, prev_loads=None if prev is None else prev[1],
                    prev_base=None if prev is None else base[layer - 1], transition=sched.transitions.get(layer))
            current = sched.static[v.replica_slots][layer]
            parts: list[LayerStats] = []
            loads = np.zeros((nb, e))
            for start in range(0, nb, every):
                stop = min(nb, start + every)
                if forecaster is not None and start > 0:
                    pred = forecaster.predict(start)
                    new = plan_replicas(pred, g, v.replica_slots, v.planner, previous=current)
                    extra[s].moved += moved_experts(current, new, g, e)
                    extra[s].replans += 1
                    current = new
                elif forecaster is not None:  # the start-up plan: from the forecast before any step
                    pred = forecaster.predict(0)
                    current = plan_replicas(pred, g, v.replica_slots, v.planner)
                st, ids = route_and_measure(plan, cfg, inp.steps(start, stop),
                                            Placement.from_physical(current, g, num_experts=e), layer)
                parts.append(st)
                loads[start:stop] = step_loads(ids.numpy(), valid_np[start:stop], e)
                if forecaster is not None:
                    extra[s].accuracy.add(pred, loads[start:stop].mean(0), v.replica_slots * g)
                    for t in range(start, stop):
                        forecaster.observe(t, loads[t])
            seen[s] = (layer, loads)
            stats[s].append(concat_stats(parts))
    return stats, extra


def replay_variants(sched: Schedule, jobs: int = 1, progress: bool | None = None
                    ) -> list[tuple[Variant, ReplayResult, dict[Setting, VariantStats]]]:
    """Every variant over every batch size; (variant, result, per-setting extras) in variant order."""
    plan = sched.plan
    units = [(vi, b) for vi in range(len(sched.variants)) for b in plan.batches]
    weights = [len(plan.layers) * len(unit_settings(plan, b)) for _, b in units]
    t0 = time.perf_counter()
    collected = run_units(sched, replay_variant, units, weights, jobs, progress, desc="xshare eval placements")
    wall = time.perf_counter() - t0
    out = []
    for vi, v in enumerate(sched.variants):
        result = ReplayResult(plan=plan, wall_seconds=wall)
        extras: dict[Setting, VariantStats] = {}
        for b in plan.batches:
            st, ex = collected[(vi, b)]
            result.stats.update(st)
            extras.update(ex)
        out.append((v, result, extras))
    return out


def variant_rows(sched: Schedule, replayed: Sequence[tuple[Variant, ReplayResult, dict[Setting, VariantStats]]]
                 ) -> list[dict[str, Any]]:
    """The result rows (:func:`xshare.eval.summary.summarise` plus the placement keys) of every variant."""
    plan = sched.plan
    rows = []
    for v, result, extras in replayed:
        for s in plan.settings:
            row = summarise(result, s)
            ex = extras[s]
            nb = plan.batches[s.batch].num_batches
            scale = (sched.moe_layers or len(plan.layers)) / len(plan.layers)  # replayed layers -> the model
            per_step = None if sched.expert_bytes is None else ex.moved * sched.expert_bytes * scale / nb
            tokens_peak = np.mean([st.tokens_peak for st in result.stats[s]], 0)
            experts_peak = np.mean([st.peak for st in result.stats[s]], 0)
            row.update({
                "label": f"{s.label()} @ {v.label()}",
                "placement": v.kind,
                "replica_slots": v.replica_slots,
                "predictor": v.predictor,
                "replan_every": v.replan_every,
                "planner": v.planner if v.kind == "predictive" else None,
                "replans": ex.replans // max(1, len(plan.layers)),
                "moved_experts": ex.moved,
                "moved_bytes_per_step": per_step,
                "move_ms_per_step": None if per_step is None or not sched.link_bandwidth
                else 1e3 * per_step / sched.link_bandwidth,
                "forecast": ex.accuracy.summary() if v.kind == "predictive" else None,
                "timeline": {"peak_gpu_tokens": [round(float(x), 3) for x in tokens_peak],
                             "peak_gpu_experts": [round(float(x), 3) for x in experts_peak]},
            })
            rows.append(row)
    return rows
