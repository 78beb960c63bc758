"""Predictive expert replication: forecast each layer's per-expert token load over the next steps, plan
replicas for the forecast, and count the expert weights a change of plan moves.

Forecasters (one per MoE layer, online: :meth:`Forecaster.observe` after every step, :meth:`Forecaster.
predict` before a re-plan); loads are token-expert assignments per step, float64 [E]:

* ``static``       the calibration average, never updated (what EPLB's static plan is made from).
* ``ewma``         an exponentially weighted moving average of the layer's own loads of the steps seen
                   so far (weight ``alpha`` on the newest step), started at the calibration average.
* ``cross_layer``  the previous layer's routing of the same tokens: its loads up to and including the
                   step being planned (the previous layer has routed that step before this layer runs),
                   EWMA-smoothed, mapped through a transition matrix estimated on the calibration trace
                   (:func:`transition_matrix`). The first MoE layer has no previous one: ``ewma`` there.

Planning (:func:`plan_replicas`): the E experts plus R spare slots per GPU (as EPLB's redundant experts,
P = E + R·G physical slots, slot p on GPU p // (P / G) as in SGLang), either

* ``eplb``    DeepSeek's EPLB on the forecast (:func:`xshare.eval.eplb.rebalance_experts`, global mode),
              its GPUs renumbered to keep as many of the previous plan's experts in place as a greedy
              matching finds (:func:`align_to`: GPUs are interchangeable, moved weights are not); or
* ``greedy``  the contiguous home placement (expert e on GPU e // (E / G)) kept fixed, and only the spare
              slots re-filled: each goes to the expert with the highest forecast load per replica, on the
              least-loaded GPU that has a free spare slot and no copy of it.

:func:`moved_experts` counts the (GPU, expert) copies a new plan needs that the old one did not have:
the expert weights a re-plan loads. Everything is numpy on the host; no SGLang import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xshare.eval.eplb import rebalance_experts

PREDICTORS = ("ewma", "cross_layer", "static")
PLANNERS = ("eplb", "greedy")
DEFAULT_ALPHA = 0.2


def step_loads(ids: np.ndarray, valid: np.ndarray, num_experts: int) -> np.ndarray:
    """Token-expert assignments per expert in every step.

    ids int [NB, W, k] routed logical experts, valid bool [NB, W]. Returns float64 [NB, E].
    """
    ids = np.asarray(ids)
    nb = ids.shape[0]
    keep = np.broadcast_to(np.asarray(valid, dtype=bool)[..., None], ids.shape).reshape(nb, -1)
    flat = (ids.reshape(nb, -1) + num_experts * np.arange(nb)[:, None])[keep]
    return np.bincount(flat, minlength=nb * num_experts).reshape(nb, num_experts).astype(np.float64)


def transition_matrix(prev_ids: np.ndarray, ids: np.ndarray, num_experts: int) -> np.ndarray:
    """How the tokens routed to each expert of the previous layer spread over this layer's experts.

    prev_ids int [T, k'] and ids int [T, k]: the same T tokens' experts in two consecutive layers.
    Returns float64 [E, E], rows summing to 1: ``M[i, j]`` = Σ_t [i ∈ prev_t][j ∈ ids_t] / (k · Σ_t
    [i ∈ prev_t]), so that ``prev_load @ M`` keeps the total and equals this layer's load on the
    tokens it was estimated from. An expert the previous layer never used gets this layer's marginal.
    """
    prev_ids, ids = np.asarray(prev_ids), np.asarray(ids)
    if prev_ids.shape[0] != ids.shape[0]:
        raise ValueError(f"transition_matrix: {prev_ids.shape[0]} and {ids.shape[0]} tokens differ")
    t, k = ids.shape
    a = np.zeros((t, num_experts))
    a[np.arange(t)[:, None], prev_ids] = 1.0
    b = np.zeros((t, num_experts))
    b[np.arange(t)[:, None], ids] = 1.0
    joint = a.T @ b / k
    rows = joint.sum(1, keepdims=True)
    marginal = b.sum(0) / max(b.sum(), 1.0)
    return np.where(rows > 0, joint / np.where(rows > 0, rows, 1.0), marginal[None, :])


class Forecaster:
    """One layer's forecast of per-expert token load per step (float64 [E]); see the module docstring."""

    def predict(self, step: int) -> np.ndarray:
        """The forecast for steps ``step`` onwards, from what was observed before ``step``."""
        raise NotImplementedError

    def observe(self, step: int, load: np.ndarray) -> None:
        """The layer's routed load [E] of ``step`` (called in step order)."""


@dataclass
class StaticForecaster(Forecaster):
    base: np.ndarray  # [E] calibration loads per step

    def predict(self, step: int) -> np.ndarray:
        return self.base


@dataclass
class EWMAForecaster(Forecaster):
    base: np.ndarray  # [E] the start value
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--ewma-alpha {self.alpha}: must be in (0, 1]")
        self.state = np.asarray(self.base, dtype=np.float64).copy()

    def predict(self, step: int) -> np.ndarray:
        return self.state

    def observe(self, step: int, load: np.ndarray) -> None:
        self.state = self.alpha * np.asarray(load, dtype=np.float64) + (1 - self.alpha) * self.state


def ewma_series(loads: np.ndarray, base: np.ndarray, alpha: float) -> np.ndarray:
    """float64 [NB, E]: row t is the EWMA of loads[0..t] (inclusive) started at ``base`` [E]."""
    f = EWMAForecaster(base, alpha)
    out = np.empty(np.shape(loads), dtype=np.float64)
    for t, x in enumerate(loads):
        f.observe(t, x)
        out[t] = f.state
    return out


@dataclass
class CrossLayerForecaster(Forecaster):
    """Forecast from the previous layer: ``ewma(prev_loads[..step]) @ transition``.

    prev_loads float [NB, E]: the previous layer's routed loads of every step (known up to ``step`` when
    this layer plans it); transition float [E, E] (:func:`transition_matrix`); prev_base [E] its start.
    """

    prev_loads: np.ndarray
    transition: np.ndarray
    prev_base: np.ndarray
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        self._series = ewma_series(self.prev_loads, self.prev_base, self.alpha) @ self.transition

    def predict(self, step: int) -> np.ndarray:
        return self._series[min(step, len(self._series) - 1)]


def make_forecaster(kind: str, base: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
                    prev_loads: np.ndarray | None = None, prev_base: np.ndarray | None = None,
                    transition: np.ndarray | None = None) -> Forecaster:
    """A forecaster of ``kind`` (one of :data:`PREDICTORS`); ``cross_layer`` without a previous layer
    (``prev_loads`` None) is ``ewma``."""
    if kind not in PREDICTORS:
        raise ValueError(f"--predictor {kind!r}: unknown; choose one of {', '.join(PREDICTORS)}")
    if kind == "static":
        return StaticForecaster(np.asarray(base, dtype=np.float64))
    if kind == "cross_layer" and prev_loads is not None:
        if transition is None or prev_base is None:
            raise ValueError("cross_layer forecast needs the transition matrix and the previous layer's base")
        return CrossLayerForecaster(prev_loads, transition, prev_base, alpha)
    return EWMAForecaster(np.asarray(base, dtype=np.float64), alpha)


# -- accuracy ----------------------------------------------------------------------------------------
@dataclass
class Accuracy:
    """Forecast quality over the re-plans of a run (sums; :meth:`summary` gives the ratios)."""

    hits: float = 0.0
    predicted: float = 0.0
    actual: float = 0.0
    abs_error: float = 0.0
    total: float = 0.0
    replans: int = 0

    def add(self, pred: np.ndarray, actual: np.ndarray, hot: int) -> None:
        """One forecast [E] against the mean load [E] of the steps it planned; ``hot`` = the hot-set size.

        Predicted hot set: the ``hot`` experts of highest forecast. Actual hot set: every expert whose
        actual load reaches the ``hot``-th highest (ties included, so it may hold more), with load > 0.
        """
        pred = np.asarray(pred, dtype=np.float64)
        actual = np.asarray(actual, dtype=np.float64)
        if hot > 0:
            p_set = np.argsort(-pred, kind="stable")[:hot]
            cut = np.sort(actual)[::-1][min(hot, actual.size) - 1]
            a_set = np.flatnonzero((actual >= cut) & (actual > 0))
            self.hits += np.intersect1d(p_set, a_set).size
            self.predicted += p_set.size
            self.actual += a_set.size
        scale = actual.sum() / pred.sum() if pred.sum() > 0 else 0.0  # the error of the shape, not the batch size
        self.abs_error += float(np.abs(pred * scale - actual).sum())
        self.total += float(actual.sum())
        self.replans += 1

    def merge(self, other: Accuracy) -> None:
        for name in ("hits", "predicted", "actual", "abs_error", "total", "replans"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> dict[str, float | int | None]:
        return {
            "hot_precision": self.hits / self.predicted if self.predicted else None,
            "hot_recall": self.hits / self.actual if self.actual else None,
            "load_error": self.abs_error / self.total if self.total else None,
            "forecasts": self.replans,
        }


def forecast_accuracy(forecaster: Forecaster, loads: np.ndarray, horizon: int, hot: int) -> Accuracy:
    """Accuracy of ``forecaster`` on a layer's loads [NB, E], forecasting every ``horizon`` steps the mean
    load of the next ``horizon`` steps (the forecaster observes every step)."""
    if horizon < 1:
        raise ValueError(f"--replan-every {horizon}: must be >= 1")
    acc = Accuracy()
    loads = np.asarray(loads, dtype=np.float64)
    for start in range(0, len(loads), horizon):
        window = loads[start:start + horizon]
        acc.add(forecaster.predict(start), window.mean(0), hot)
        for i, x in enumerate(window):
            forecaster.observe(start + i, x)
    return acc


# -- planning ------------------------------------------------------------------------------------------
def check_plan(phy2log: np.ndarray, num_experts: int, num_gpus: int, replica_slots: int) -> np.ndarray:
    """A plan's phy2log int64 [P], validated against E experts, G GPUs and R spare slots per GPU:
    P must be E + R·G and hold every expert; a plan that does not fit is a ValueError naming
    ``--replica-slots``."""
    p2l = np.asarray(phy2log)
    want = num_experts + replica_slots * num_gpus
    if p2l.ndim != 1 or p2l.size != want:
        raise ValueError(f"--replica-slots {replica_slots}: a plan needs {want} physical slots ({num_experts} experts "
                         f"+ {replica_slots} per GPU x {num_gpus} GPUs), got shape {p2l.shape}")
    if not np.issubdtype(p2l.dtype, np.integer) or p2l.min() < 0 or p2l.max() >= num_experts:
        raise ValueError(f"--replica-slots {replica_slots}: plan entries must be expert ids in [0, {num_experts})")
    if np.unique(p2l).size != num_experts:
        raise ValueError(f"--replica-slots {replica_slots}: the plan does not place every one of the "
                         f"{num_experts} experts")
    return p2l.astype(np.int64)


def _gpu_counts(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """int64 [G, E]: copies of each expert on each GPU (slot p on GPU p // (P / G))."""
    per = phy2log.size // num_gpus
    gpu = np.arange(phy2log.size) // per
    return np.bincount(gpu * num_experts + phy2log, minlength=num_gpus * num_experts).reshape(num_gpus, num_experts)


def moved_experts(old: np.ndarray, new: np.ndarray, num_gpus: int, num_experts: int) -> int:
    """(GPU, expert) copies in ``new`` [P] that ``old`` [P'] did not have: expert weights to load."""
    diff = _gpu_counts(np.asarray(new), num_gpus, num_experts) - _gpu_counts(np.asarray(old), num_gpus, num_experts)
    return int(np.clip(diff, 0, None).sum())


def align_to(old: np.ndarray, new: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """``new`` [P] with its GPUs renumbered (whole blocks of P / G slots) to keep as many of ``old``'s
    (GPU, expert) copies in place as a greedy matching of the largest overlaps finds."""
    per = new.size // num_gpus
    overlap = np.minimum(_gpu_counts(new, num_gpus, num_experts)[:, None, :],
                         _gpu_counts(old, num_gpus, num_experts)[None, :, :]).sum(-1)  # [G new, G old]
    target = np.full(num_gpus, -1)
    free_old = np.ones(num_gpus, dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        g_new, g_old = divmod(int(flat), num_gpus)
        if target[g_new] < 0 and free_old[g_old]:
            target[g_new] = g_old
            free_old[g_old] = False
    out = np.empty_like(new)
    for g_new in range(num_gpus):
        out[target[g_new] * per:(target[g_new] + 1) * per] = new[g_new * per:(g_new + 1) * per]
    return out


def _greedy(load: np.ndarray, num_gpus: int, replica_slots: int) -> np.ndarray:
    e = load.size
    if e % num_gpus:
        raise ValueError(f"--planner greedy: the {e} experts do not divide over --gpus {num_gpus}")
    home = e // num_gpus
    per = home + replica_slots
    phy2log = np.empty(num_gpus * per, dtype=np.int64)
    expert_gpu = np.arange(e) // home
    holds = np.zeros((num_gpus, e), dtype=bool)
    holds[expert_gpu, np.arange(e)] = True
    count = np.ones(e)
    free = np.full(num_gpus, replica_slots)
    spare: list[list[int]] = [[] for _ in range(num_gpus)]
    for _ in range(replica_slots * num_gpus):
        share = load / count
        gpu_load = holds.astype(np.float64) @ share  # the expert's load split evenly over its copies
        placeable = (~holds) & (free > 0)[:, None]  # [G, E]
        candidates = np.flatnonzero(placeable.any(0))
        expert = int(candidates[np.argmax(share[candidates])])  # first maximum on ties
        gpus = np.flatnonzero(placeable[:, expert])
        gpu = int(gpus[np.argmin(gpu_load[gpus])])
        holds[gpu, expert] = True
        count[expert] += 1
        free[gpu] -= 1
        spare[gpu].append(expert)
    for g in range(num_gpus):
        phy2log[g * per:g * per + home] = np.arange(g * home, (g + 1) * home)
        phy2log[g * per + home:(g + 1) * per] = spare[g]
    return phy2log


def plan_replicas(load: np.ndarray, num_gpus: int, replica_slots: int, planner: str = "eplb",
                  previous: np.ndarray | None = None) -> np.ndarray:
    """phy2log int64 [P = E + R·G] for a forecast ``load`` float [E] (see the module docstring).

    ``previous`` [P]: the plan in force; an ``eplb`` plan is renumbered to move as little as it can.
    """
    load = np.asarray(load, dtype=np.float64)
    e = load.size
    if replica_slots < 0:
        raise ValueError(f"--replica-slots {replica_slots}: must be >= 0")
    if num_gpus < 1:
        raise ValueError(f"--gpus {num_gpus}: must be >= 1")
    if planner not in PLANNERS:
        raise ValueError(f"--planner {planner!r}: unknown; choose one of {', '.join(PLANNERS)}")
    if planner == "greedy":
        return check_plan(_greedy(load, num_gpus, replica_slots), e, num_gpus, replica_slots)
    num_physical = e + replica_slots * num_gpus
    if e % num_gpus:
        raise ValueError(f"--replica-slots {replica_slots}: EPLB needs the {e} experts to divide over "
                         f"--gpus {num_gpus}")
    phy2log = rebalance_experts(load[None, :], num_physical, 1, 1, num_gpus, "global")[0][0]
    if previous is not None and previous.size == phy2log.size:
        phy2log = align_to(previous, phy2log, num_gpus, e)
    return check_plan(phy2log, e, num_gpus, replica_slots)


def calibration_bases(loads: np.ndarray, tokens: int, tokens_per_step: float) -> np.ndarray:
    """float64 [L, E]: calibration loads [L, E] over ``tokens`` tokens, scaled to one step of
    ``tokens_per_step`` tokens (the start value of every forecaster)."""
    if tokens < 1:
        raise ValueError("calibration trace has no tokens")
    return np.asarray(loads, dtype=np.float64) * (tokens_per_step / tokens)


def transitions(topk_ids: np.ndarray, num_experts: int, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """{layer l: :func:`transition_matrix` from layer l - 1 to l} on a trace's topk_ids int [L, T, K]."""
    layers = range(1, topk_ids.shape[0]) if layers is None else [l for l in layers if l >= 1]
    return {l: transition_matrix(topk_ids[l - 1], topk_ids[l], num_experts) for l in layers}


def plan_layers(load: np.ndarray, num_gpus: int, replica_slots: int, planner: str = "eplb",
                previous: np.ndarray | None = None) -> np.ndarray:
    """:func:`plan_replicas` for every layer: load float [L, E], previous int [L, P] or None.
    Returns phy2log int64 [L, E + R·G]."""
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise ValueError(f"plan_layers: load must be [layers, experts], got shape {load.shape}")
    return np.stack([plan_replicas(load[l], num_gpus, replica_slots, planner,
                                   previous=None if previous is None else np.asarray(previous[l]))
                     for l in range(load.shape[0])])


def spare_slots(num_physical: int, num_experts: int, num_gpus: int) -> int:
    """R, the spare slots per GPU of a layout of P physical slots for E experts on G GPUs; a ValueError
    naming ``--replica-slots`` when the redundant slots do not split evenly over the GPUs."""
    extra = num_physical - num_experts
    if extra < 0 or num_physical % num_gpus or extra % num_gpus:
        raise ValueError(f"--replica-slots: {num_physical} physical slots for {num_experts} experts do not leave "
                         f"the same number of spare slots on each of {num_gpus} GPUs")
    return extra // num_gpus
