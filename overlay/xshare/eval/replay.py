"""Replay a trace through :func:`xshare.selection.select` and measure what each policy does.

For every replayed layer and batch, each policy setting (and the vanilla ``topk`` reference) is run
through the selection core exactly as the server runs it, one forward batch per call; the metrics
are then computed for all batches of the layer at once (vectorised tensors):

    activated experts  distinct experts routed by at least one token of the batch
    gate mass kept     sum of the stored probabilities of each token's final experts / sum of its
                       stored top-K probabilities (over the batch's tokens; unknown probabilities = 0)
    top-1 kept         share of tokens whose own stored top-1 expert is among their final experts
    cap bound          with a mass target: share of (layer, batch) calls whose budget stopped the
                       set before the target was reached (``Routing.cap_bound``)
    GPU load           activated physical experts per GPU under the placement (a replicated expert
                       counts once per replica that receives tokens); peak = the busiest GPU
    tokens per GPU     token-expert assignments per GPU: the busiest GPU's, the mean, their ratio
    a2a volume         tokens each GPU sends to / receives from other GPUs (token i starts on GPU i mod G)

Averages are over layers and batches (``../shared/traces/README.md``).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xshare.eval.batching import Batches
from xshare.eval.costmodel import CostModel
from xshare.eval.traces import Trace
from xshare.selection import Placement, SelectorConfig, get_policy
from xshare.selection.decide import LayerCall, LayerRouting, decide
from xshare.selection.registry import validated
from xshare.selection.schema import SELECTOR, SWEEP_FIELDS

KNOBS = tuple(f.name for f in SWEEP_FIELDS)  # the settings a sweep can vary (one schema)


def knobs_of(policy: str) -> tuple[str, ...]:
    """The knobs ``policy`` reads (``Policy.knobs``): only these are swept for it."""
    return get_policy(policy).knobs


@dataclass(frozen=True)
class Setting:
    """One point of the sweep. ``batch`` None = the recorded batches; a knob None = the default."""

    policy: str
    batch: int | None
    budget: int | float | None = None
    warmup_k: int | None = None
    group_budget: int | float | None = None
    gpu_cap: int | None = None
    target_mass: float | None = None

    def config(self) -> SelectorConfig:
        kw: dict[str, Any] = {"policy": self.policy}
        for k in KNOBS:
            v = getattr(self, k)
            if isinstance(v, str):  # a per-layer value, held as its JSON text (hashable)
                v = SELECTOR[k].parse(v)
            if v is not None:
                kw[k] = v
        return validated(SelectorConfig(**kw))

    def label(self) -> str:
        parts = [self.policy]
        if self.budget is not None:
            parts.append(f"m={self.budget}")
        if self.target_mass is not None:
            parts.append(f"tau={self.target_mass}")
        if self.warmup_k is not None:
            parts.append(f"k0={self.warmup_k}")
        if self.group_budget is not None:
            parts.append(f"mr={self.group_budget}")
        if self.gpu_cap is not None:
            parts.append(f"cap={self.gpu_cap}")
        return " ".join(parts)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, list[str]]]:
    """'oea:warmup_k=1,2,3;budget=16' -> ('oea', {'warmup_k': ['1', '2', '3'], 'budget': ['16']})."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    overrides: dict[str, list[str]] = {}
    if rest.strip():
        for item in rest.split(";"):
            key, eq, values = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in KNOBS:
                raise ValueError(f"--policy {spec!r}: expected NAME:knob=v1,v2;knob=v with knob in {', '.join(KNOBS)}")
            vals = [v.strip() for v in values.split(",") if v.strip()]
            if not vals:
                raise ValueError(f"--policy {spec!r}: no value for {key}")
            overrides[key] = vals
    return name, overrides


def make_settings(policies: Sequence[tuple[str, dict[str, Sequence[Any]]]], batches: Sequence[int | None],
                  axes: dict[str, Sequence[Any]]) -> list[Setting]:
    """The cartesian product of the knobs each policy reads, per batch size (deduplicated, ordered).

    ``policies``: (name, overrides) pairs; an override replaces the global axis for that policy.
    ``axes``: knob -> values (an empty list = the SelectorConfig default).
    """
    out: dict[Setting, None] = {}
    for b in batches:
        for p, overrides in policies:
            combos: list[dict[str, Any]] = [{}]
            for k in knobs_of(p):
                values = list(overrides.get(k, axes.get(k, ()))) or [None]
                combos = [{**c, k: v} for c in combos for v in values]
            for c in combos:
                out[Setting(policy=p, batch=b, **c)] = None
    # rows of one policy together (a policy named twice, e.g. 'all' and 'oea:warmup_k=...', merges)
    first = {p: i for i, (p, _) in reversed(list(enumerate(policies)))}
    batch_order = {b: i for i, b in enumerate(batches)}
    return sorted(out, key=lambda s: (batch_order[s.batch], first[s.policy]))


@dataclass
class Plan:
    """Everything a replay needs; picklable (worker processes get a copy)."""

    trace: Trace
    layers: list[int]
    batches: dict[int | None, Batches]
    settings: list[Setting]
    placements: list[Placement]  # one per replayed layer
    cost: CostModel | None = None
    placement_kind: str = "contiguous"  # the rows' 'placement'

    def settings_for(self, bkey: int | None) -> list[Setting]:
        return [s for s in self.settings if s.batch == bkey]


@dataclass
class LayerStats:
    """Per-batch metrics of one setting on one layer (numpy, [NB] unless noted)."""

    active: np.ndarray
    peak: np.ndarray
    peak_over_mean: np.ndarray
    tokens_max_over_mean: np.ndarray
    tokens_peak: np.ndarray  # token-expert assignments on the busiest GPU
    tokens_mean: np.ndarray  # token-expert assignments per GPU, mean over GPUs
    mass: np.ndarray
    top1: np.ndarray
    gpu_active_mean: np.ndarray  # [G]
    moe_seconds: np.ndarray | None
    select_seconds: float
    calls: int
    cap_bound: np.ndarray | None = None  # bool [NB]: the budget stopped the mass target short (None: no target)


def _route(plan: Plan, cfg: SelectorConfig, logits: Tensor, groups: Tensor, sizes: list[int],
           placement: Placement, layer: int = 0) -> tuple[Tensor, Tensor | None, float, np.ndarray | None]:
    """Route every batch of a layer through the core's one seam (:func:`xshare.selection.decide.decide`,
    as the server does); ids/physical padded to [NB, W, k] with 0, and per batch whether the budget
    stopped the mass target short (``Routing.cap_bound``; None when the policy has no mass target)."""
    nb, width = logits.shape[0], logits.shape[1]
    k = plan.trace.top_k
    ids = torch.zeros((nb, width, k), dtype=torch.int64)
    phys: Tensor | None = None
    bound: np.ndarray | None = None
    seconds = 0.0
    clock = time.perf_counter
    router = plan.trace.layer_router(layer) or LayerRouting(cfg.scoring, cfg.renormalize)
    for b in range(nb):
        n = sizes[b]
        t0 = clock()
        call = LayerCall(logits[b, :n], k, router, groups=groups[b, :n], placement=placement)
        r = decide(call, cfg).routing
        seconds += clock() - t0
        ids[b, :n] = r.topk_ids
        if r.cap_bound is not None:
            if bound is None:
                bound = np.zeros(nb, dtype=bool)
            bound[b] = bool(r.cap_bound)
        if r.physical_ids is not None:
            if phys is None:
                phys = torch.zeros((nb, width, k), dtype=torch.int64)
            phys[b, :n] = r.physical_ids
    return ids, phys, seconds, bound


def layer_metrics(ids: Tensor, phys: Tensor | None, valid: Tensor, tokens: Tensor, probs: Tensor,
                  stored_ids: Tensor, placement: Placement, cost: CostModel | None) -> dict[str, Any]:
    """Metrics of every batch of one layer at once.

    ids [NB, W, k] routed logical experts, phys [NB, W, k] physical slots or None, valid bool
    [NB, W], tokens [NB, W] token indices, probs [T, E] stored probabilities, stored_ids [T, K]
    the recorded top-K (highest first).
    """
    nb, width, _ = ids.shape
    num_experts = probs.shape[1]
    tok = tokens.clamp_min(0)
    vk = valid.unsqueeze(-1)
    n_valid = valid.sum(1)
    # activated experts
    idx = torch.where(vk, ids, torch.full_like(ids, num_experts)).reshape(nb, -1)
    act = torch.zeros((nb, num_experts + 1), dtype=torch.bool).scatter_(1, idx, True)[:, :num_experts]
    active = act.sum(1)
    # gate mass kept and top-1 kept
    p = probs[tok]  # [NB, W, E]
    kept = (p.gather(2, ids) .sum(-1) * valid).sum(1)
    total = (p.gather(2, stored_ids[tok]).sum(-1) * valid).sum(1)
    mass = torch.where(total > 0, kept / total.clamp_min(1e-30), torch.ones_like(total))
    top1 = ((ids == stored_ids[tok][..., :1]).any(-1) & valid).sum(1) / n_valid.clamp_min(1)
    # GPU load under the placement (physical slots)
    slots = phys if phys is not None else placement.replicas[ids, 0]
    num_slots, g = placement.num_slots, placement.num_gpus
    sidx = torch.where(vk, slots, torch.full_like(slots, num_slots)).reshape(nb, -1)
    act_slots = torch.zeros((nb, num_slots + 1), dtype=torch.bool).scatter_(1, sidx, True)[:, :num_slots]
    gpu_active = torch.zeros((nb, g), dtype=torch.float64).index_add_(1, placement.slot_gpu, act_slots.double())
    gpu = placement.slot_gpu[slots]
    gidx = torch.where(vk, gpu, torch.full_like(gpu, g))
    gpu_assign = torch.zeros((nb, g + 1), dtype=torch.float64).scatter_add_(
        1, gidx.reshape(nb, -1), torch.ones(gidx.numel() // nb, dtype=torch.float64).expand(nb, -1))[:, :g]
    peak = gpu_active.max(1).values
    out = {
        "active": active.numpy().astype(np.int32),
        "peak": peak.numpy().astype(np.int32),
        "peak_over_mean": (peak / gpu_active.mean(1).clamp_min(1e-12)).numpy().astype(np.float32),
        "tokens_max_over_mean": (gpu_assign.max(1).values / gpu_assign.mean(1).clamp_min(1e-12)).numpy()
        .astype(np.float32),
        "tokens_peak": gpu_assign.max(1).values.numpy().astype(np.float32),
        "tokens_mean": gpu_assign.mean(1).numpy().astype(np.float32),
        "mass": mass.numpy().astype(np.float32),
        "top1": top1.numpy().astype(np.float32),
        "gpu_active_mean": gpu_active.mean(0).numpy(),
        "moe_seconds": None,
    }
    if cost is not None:
        # all-to-all: token i of a batch starts on GPU i mod G and is sent once to every other GPU
        # holding one of its experts
        on_gpu = torch.zeros((nb, width, g + 1), dtype=torch.bool).scatter_(2, gidx, True)[..., :g]
        origin = torch.arange(width) % g
        remote = on_gpu & (torch.arange(g) != origin.unsqueeze(-1)) & vk
        received = remote.sum(1).double()
        sent = torch.zeros((nb, g), dtype=torch.float64).index_add_(1, origin, remote.sum(-1).double())
        out["moe_seconds"] = cost.layer_times(gpu_active.numpy(), gpu_assign.numpy(), sent.numpy(),
                                              received.numpy(), n_valid.numpy())
    return out


VANILLA = "topk"


@dataclass
class LayerInputs:
    """One layer's batches: tokens int [NB, W] (-1 padded), valid bool [NB, W], sizes [NB], logits
    float [NB, W, E], groups (request ids) [NB, W]; probs float [T, E] and stored int [T, K] per trace token."""

    tokens: Tensor
    valid: Tensor
    sizes: list[int]
    logits: Tensor
    groups: Tensor
    probs: Tensor
    stored: Tensor

    def steps(self, start: int, stop: int) -> LayerInputs:
        """The batches [start, stop) only."""
        return LayerInputs(self.tokens[start:stop], self.valid[start:stop], self.sizes[start:stop],
                           self.logits[start:stop], self.groups[start:stop], self.probs, self.stored)


def layer_inputs(plan: Plan, bkey: int | None, layer: int) -> LayerInputs:
    trace = plan.trace
    tokens = torch.from_numpy(plan.batches[bkey].tokens)
    valid = tokens >= 0
    tok = tokens.clamp_min(0)
    return LayerInputs(tokens, valid, valid.sum(1).tolist(), trace.layer_logits(layer)[tok],
                       torch.from_numpy(trace.seq_ids)[tok], trace.layer_probs(layer),
                       torch.from_numpy(trace.topk_ids[layer]))


def unit_settings(plan: Plan, bkey: int | None) -> list[Setting]:
    """The settings of one batch size, the vanilla reference first."""
    return [Setting(VANILLA, bkey)] + [s for s in plan.settings_for(bkey) if s != Setting(VANILLA, bkey)]


def route_and_measure(plan: Plan, cfg: SelectorConfig, inp: LayerInputs, placement: Placement,
                      layer: int) -> tuple[LayerStats, Tensor]:
    """Route the batches of ``inp`` under ``placement`` and measure them: (stats, routed ids [NB, W, k])."""
    ids, phys, seconds, bound = _route(plan, cfg, inp.logits, inp.groups, inp.sizes, placement, layer)
    m = layer_metrics(ids, phys, inp.valid, inp.tokens, inp.probs, inp.stored, placement, plan.cost)
    return LayerStats(**m, select_seconds=seconds, calls=len(inp.sizes), cap_bound=bound), ids


@torch.inference_mode()
def replay_unit(plan: Plan, bkey: int | None, li: int) -> dict[Setting, LayerStats]:
    """All settings of one batch size on one layer (plus the vanilla reference)."""
    layer = plan.layers[li]
    inp = layer_inputs(plan, bkey, layer)
    out: dict[Setting, LayerStats] = {}
    for s in unit_settings(plan, bkey):
        cfg = s.config().for_layer(layer, range(plan.trace.num_layers))  # per-layer values: the trace's layers
        out[s] = route_and_measure(plan, cfg, inp, plan.placements[li], layer)[0]
    return out


def concat_stats(parts: Sequence[LayerStats]) -> LayerStats:
    """The stats of consecutive runs of batches of one layer as one (per-GPU means weighted by batches)."""
    n = np.array([len(p.active) for p in parts], dtype=np.float64)

    def cat(name: str) -> np.ndarray | None:
        vals = [getattr(p, name) for p in parts]
        return None if any(v is None for v in vals) else np.concatenate(vals)

    return LayerStats(
        active=cat("active"), peak=cat("peak"), peak_over_mean=cat("peak_over_mean"),
        tokens_max_over_mean=cat("tokens_max_over_mean"), tokens_peak=cat("tokens_peak"),
        tokens_mean=cat("tokens_mean"), mass=cat("mass"), top1=cat("top1"),
        gpu_active_mean=np.average(np.stack([p.gpu_active_mean for p in parts]), axis=0, weights=n),
        moe_seconds=cat("moe_seconds"), select_seconds=sum(p.select_seconds for p in parts),
        calls=sum(p.calls for p in parts), cap_bound=cat("cap_bound"))


_WORKER_STATE: Any = None


def _init_worker(state: Any) -> None:
    global _WORKER_STATE
    torch.set_num_threads(1)
    _WORKER_STATE = state


def _worker_unit(fn: Callable[..., Any], key: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    return key, fn(_WORKER_STATE, *key)


def run_units(state: Any, fn: Callable[..., Any], units: Sequence[tuple[Any, ...]], weights: Sequence[int],
              jobs: int = 1, progress: bool | None = None, desc: str = "xshare eval") -> dict[tuple[Any, ...], Any]:
    """``fn(state, *unit)`` for every unit, in ``jobs`` processes (spawned, one torch thread each, ``state``
    copied once per process; ``fn`` a module-level function); a tqdm bar advancing by each unit's weight
    when ``progress`` (None: only on a terminal). Returns {unit: result}."""
    from tqdm import tqdm

    collected: dict[tuple[Any, ...], Any] = {}
    disable = None if progress is None else not progress
    bar = tqdm(total=sum(weights), desc=desc, disable=disable, leave=False)
    weight = dict(zip(units, weights, strict=True))
    threads = torch.get_num_threads()
    try:
        if jobs <= 1 or len(units) == 1:
            torch.set_num_threads(1)
            for u in units:
                collected[u] = fn(state, *u)
                bar.update(weight[u])
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(state,)) as pool:
                futs = [pool.submit(_worker_unit, fn, u) for u in units]
                for f in as_completed(futs):
                    u, res = f.result()
                    collected[u] = res
                    bar.update(weight[u])
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return collected


@dataclass
class ReplayResult:
    plan: Plan
    stats: dict[Setting, list[LayerStats]] = field(default_factory=dict)  # per replayed layer, in order
    wall_seconds: float = 0.0


def replay(plan: Plan, jobs: int = 1, progress: bool | None = None) -> ReplayResult:
    """Run every (batch size, layer) unit, in ``jobs`` processes; a tqdm bar when ``progress``."""
    units = [(b, li) for b in plan.batches for li in range(len(plan.layers))]
    per_unit = {b: 1 + len([s for s in plan.settings_for(b) if s.policy != VANILLA]) for b in plan.batches}
    t0 = time.perf_counter()
    collected = run_units(plan, replay_unit, units, [per_unit[b] for b, _ in units], jobs, progress)
    result = ReplayResult(plan=plan, wall_seconds=time.perf_counter() - t0)
    for b in plan.batches:
        for li in range(len(plan.layers)):
            for s, st in collected[(b, li)].items():
                result.stats.setdefault(s, []).append(st)
    return result
