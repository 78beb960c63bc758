"""The result rows of a replay: one row per policy setting, the stable JSON schema of ``xshare eval``.

Reads a :class:`xshare.eval.replay.ReplayResult` (per setting, per replayed layer, the :class:`LayerStats` of all its
batches) and averages over layers and batches: activated experts against vanilla top-k, gate mass and top-1
kept, per-GPU load and tokens under the placement, selector time, and, with a cost model
(:mod:`xshare.eval.costmodel`), the modelled MoE and step times. Keys: docs/eval.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from xshare.eval.replay import VANILLA, LayerStats, ReplayResult, Setting, knobs_of
from xshare.eval.report import PLACEMENT_KEYS
from xshare.selection import SelectorConfig

_MODELLED_KEYS = ("modelled_moe_ms_per_step", "vanilla_modelled_moe_ms_per_step", "modelled_step_ms",
                  "vanilla_modelled_step_ms", "moe_speedup", "otps_ratio")


def _f(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _stack(stats: Iterable[LayerStats], name: str) -> np.ndarray:
    return np.stack([getattr(s, name) for s in stats])  # [L', NB]


def _knob_values(result: ReplayResult, setting: Setting, cfg: SelectorConfig) -> dict[str, Any]:
    """The setting's identity and the knob values in force (None for the knobs its policy does not read)."""
    plan = result.plan
    trace = plan.trace
    num_experts = trace.num_experts
    knobs = knobs_of(setting.policy)
    g = plan.placements[0].num_gpus
    gpu_cap = None
    if "gpu_cap" in knobs:
        gpu_cap = cfg.gpu_cap if cfg.gpu_cap is not None else -(-cfg.budget_for(num_experts) // g)
    batches = plan.batches[setting.batch]
    return {
        "policy": setting.policy,
        "label": setting.label(),
        "batch": setting.batch,
        "batch_tokens_mean": _f(batches.sizes.mean()),
        "num_batches": batches.num_batches,
        "budget": cfg.budget_for(num_experts) if "budget" in knobs else None,
        "budget_arg": setting.budget if "budget" in knobs else None,
        "target_mass": cfg.to_dict()["target_mass"] if "target_mass" in knobs else None,
        "warmup_k": cfg.warmup_k if "warmup_k" in knobs else None,
        "group_budget": (cfg.group_budget_for(num_experts, trace.top_k) if "group_budget" in knobs else None),
        "gpus": g,
        "placement": plan.placement_kind,
        **dict.fromkeys(PLACEMENT_KEYS),
        "gpu_cap": gpu_cap,
    }


def _cap_bound(stats: list[LayerStats], cfg: SelectorConfig) -> np.ndarray | None:
    """[L', NB]: calls (layer x batch) whose budget stopped the mass target short; only rows with a mass target."""
    if cfg.has_target_mass and all(s.cap_bound is not None for s in stats):
        return _stack(stats, "cap_bound")
    return None


def _measured(stats: list[LayerStats], van: list[LayerStats], cfg: SelectorConfig) -> dict[str, Any]:
    """Averages over layers and batches of the setting against vanilla top-k on the same batches."""
    active, v_active = _stack(stats, "active"), _stack(van, "active")
    peak, v_peak = _stack(stats, "peak"), _stack(van, "peak")
    bound = _cap_bound(stats, cfg)
    return {
        "active_experts_mean": _f(active.mean()),
        "active_experts_p50": _f(np.percentile(active, 50)),
        "active_experts_p95": _f(np.percentile(active, 95)),
        "active_experts_max": int(active.max()),
        "vanilla_active_experts_mean": _f(v_active.mean()),
        "reduction": _f(1.0 - active.mean() / v_active.mean()),
        "mass_kept": _f(_stack(stats, "mass").mean()),
        "top1_kept": _f(_stack(stats, "top1").mean()),
        "cap_bound": None if bound is None else _f(bound.mean()),
        "peak_gpu_experts_mean": _f(peak.mean()),
        "peak_gpu_experts_max": int(peak.max()),
        "vanilla_peak_gpu_experts_mean": _f(v_peak.mean()),
        "peak_ratio": _f(v_peak.mean() / peak.mean()),
        "peak_over_mean_gpu": _f(_stack(stats, "peak_over_mean").mean()),
        "vanilla_peak_over_mean_gpu": _f(_stack(van, "peak_over_mean").mean()),
        "tokens_per_gpu_max_over_mean": _f(_stack(stats, "tokens_max_over_mean").mean()),
        "vanilla_tokens_per_gpu_max_over_mean": _f(_stack(van, "tokens_max_over_mean").mean()),
        "peak_gpu_tokens_mean": _f(_stack(stats, "tokens_peak").mean()),
        "vanilla_peak_gpu_tokens_mean": _f(_stack(van, "tokens_peak").mean()),
        "gpu_tokens_mean": _f(_stack(stats, "tokens_mean").mean()),
        "selector_ms_per_layer": _f(1e3 * sum(s.select_seconds for s in stats) / sum(s.calls for s in stats)),
        "vanilla_selector_ms_per_layer": _f(1e3 * sum(s.select_seconds for s in van) / sum(s.calls for s in van)),
        "gpu_load_mean": [_f(x) for x in np.mean([s.gpu_active_mean for s in stats], 0)],
        "vanilla_gpu_load_mean": [_f(x) for x in np.mean([s.gpu_active_mean for s in van], 0)],
    }


def _per_layer(result: ReplayResult, setting: Setting, stats: list[LayerStats], van: list[LayerStats],
               cfg: SelectorConfig) -> dict[str, Any]:
    """``per_layer``: the averages over batches, one value per replayed layer."""
    plan = result.plan
    trace = plan.trace
    bound = _cap_bound(stats, cfg)
    budgeted = "budget" in knobs_of(setting.policy)
    return {
        "layer": [trace.layer_names[i] for i in plan.layers],
        "active_experts_mean": [_f(x) for x in _stack(stats, "active").mean(1)],
        "vanilla_active_experts_mean": [_f(x) for x in _stack(van, "active").mean(1)],
        "mass_kept": [_f(x) for x in _stack(stats, "mass").mean(1)],
        "top1_kept": [_f(x) for x in _stack(stats, "top1").mean(1)],
        "cap_bound": None if bound is None else [_f(x) for x in bound.mean(1)],
        "peak_gpu_experts_mean": [_f(x) for x in _stack(stats, "peak").mean(1)],
        "budget": [cfg.for_layer(i, range(trace.num_layers)).budget_for(trace.num_experts) if budgeted
                   else None for i in plan.layers],
    }


def _modelled(result: ReplayResult, setting: Setting, stats: list[LayerStats], van: list[LayerStats]
              ) -> dict[str, Any]:
    """The cost model's MoE and step times per decode step (all None without a cost model)."""
    plan = result.plan
    cost = plan.cost
    if cost is None:
        return dict.fromkeys(_MODELLED_KEYS)
    n_layers = len(plan.layers)
    step = cost.step_seconds(_stack(stats, "moe_seconds").sum(0), n_layers, selector=setting.policy != VANILLA)
    v_step = cost.step_seconds(_stack(van, "moe_seconds").sum(0), n_layers, selector=False)
    non_moe = cost.non_moe_seconds()
    return {
        "modelled_moe_ms_per_step": _f(1e3 * (step.mean() - non_moe)),
        "vanilla_modelled_moe_ms_per_step": _f(1e3 * (v_step.mean() - non_moe)),
        "modelled_step_ms": _f(1e3 * step.mean()),
        "vanilla_modelled_step_ms": _f(1e3 * v_step.mean()),
        "moe_speedup": _f((v_step.mean() - non_moe) / (step.mean() - non_moe)),
        "otps_ratio": _f(v_step.mean() / step.mean()),
    }


def summarise(result: ReplayResult, setting: Setting) -> dict[str, Any]:
    """The result row of one setting (the stable JSON schema; see docs/eval.md)."""
    stats = result.stats[setting]
    van = result.stats[Setting(VANILLA, setting.batch)]
    cfg = setting.config()
    row = _knob_values(result, setting, cfg)
    row.update(_measured(stats, van, cfg))
    row["per_layer"] = _per_layer(result, setting, stats, van, cfg)
    row.update(_modelled(result, setting, stats, van))
    return row


def summarise_all(result: ReplayResult) -> list[dict[str, Any]]:
    return [summarise(result, s) for s in result.plan.settings]
