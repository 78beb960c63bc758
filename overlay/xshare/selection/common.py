"""Shared, vectorised building blocks of the policies.

Everything here works on whole tensors with static shapes: no Python loop over tokens or experts,
no host synchronisation (no ``.item()``, ``.tolist()``, ``nonzero()``, no ``bool(tensor)``), so a
policy built from these pieces can be captured in a CUDA graph. Tie-breaking is always by the lower
expert index (stable sorts, and integer ranking keys that cannot tie).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from xshare.selection.config import SelectorConfig
from xshare.selection.types import RENORMALIZE_EPS, Placement


def device_scalar(value: float | Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` as a tensor on ``device``: a tensor as it is (cast or moved only where it differs), a
    Python number filled there (``torch.full``). A number is never copied from a host tensor, so a
    setting given as a host value is as capture safe as a runtime knob (a 0-d device tensor)."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((), value, dtype=dtype, device=device)


def valid_rows(num_rows: int, num_tokens: int | Tensor | None, device: torch.device | str) -> Tensor:
    """bool [num_rows]: rows below ``num_tokens`` (an int or a 0-d device tensor; None = every row).
    Rows at and beyond it are CUDA-graph padding."""
    if num_tokens is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    return torch.arange(num_rows, device=device) < device_scalar(num_tokens, device)


def gate_scores(logits: Tensor, usable: Tensor, scoring: str) -> Tensor:
    """Gate probabilities as the model computes them, 0 where an expert is unusable (float32).

    A row whose experts are all unusable gets all-zero scores (not NaN).
    """
    z = torch.where(usable, logits, torch.full_like(logits, float("-inf")))
    if scoring == "softmax":
        p = torch.softmax(z, dim=-1)
    else:
        p = torch.sigmoid(z)
    return torch.where(usable, p, torch.zeros_like(p))


def preference_rank(scores: Tensor, usable: Tensor, prefer: Tensor | None = None, *,
                    floor: float = -1.0) -> Tensor:
    """rank[t, e] = position of expert e in token t's own order: usable first, then score desc, then
    (among exactly equal scores) the experts listed in ``prefer[t]`` in that order, then index asc.

    ``prefer`` int [T, k] (-1 = none) lets a caller reproduce another implementation's tie order,
    e.g. the serving engine's own top-k picks, so that a policy keeping every expert routes bitwise
    like the engine. Without it, ties go to the lower index.
    """
    num_rows, num_experts = scores.shape
    order = torch.arange(num_experts, device=scores.device).expand(num_rows, num_experts)
    if prefer is not None and prefer.numel():
        k = prefer.shape[1]
        slot = torch.full((num_rows, num_experts + 1), k, dtype=torch.int64, device=scores.device)
        ids = prefer.to(torch.int64)
        ids = torch.where(ids >= 0, ids, torch.full_like(ids, num_experts))  # -1 -> a spare column
        slot.scatter_(1, ids, torch.arange(k, device=scores.device).expand(num_rows, k))
        order = torch.argsort(slot[:, :num_experts], dim=-1, stable=True)  # preferred first, then index
    key = torch.where(usable, scores, torch.full_like(scores, floor)).gather(1, order)
    order = order.gather(1, torch.argsort(key, dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    pos = torch.arange(num_experts, device=scores.device).expand_as(order)
    return rank.scatter_(-1, order, pos)


def positions_by_score(score: Tensor, candidate: Tensor) -> Tensor:
    """Position of each candidate in descending ``score`` order (ties: lower index first), over the
    last dim; non-candidates get positions after every candidate."""
    key = torch.where(candidate, score, torch.full_like(score, float("-inf")))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    pos = torch.empty_like(order)
    return pos.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


# A mass target counts as reached within this relative tolerance (float32 sums in another order).
MASS_RTOL = 1e-6


def mass_fill(score: Tensor, forced: Tensor, cand: Tensor, target_mass: Tensor | float) -> Tensor:
    """int64 [...]: how many of the best candidates (by ``score``, ties: lower index) S = forced ∪
    them needs so that sum(score[S]) >= target_mass · sum(score) (the total over every expert, within
    :data:`MASS_RTOL`); every candidate when even all of them fall short. ``target_mass`` <= 0
    means no mass target (the result is then E, i.e. no limit). Last dim = experts; static shapes."""
    num = score.shape[-1]
    tau = device_scalar(target_mass, score.device, torch.float32)
    need = _mass_need(score, forced, cand, tau)
    return torch.where(tau > 0, need, torch.full_like(need, num))


def _mass_need(score: Tensor, forced: Tensor, cand: Tensor, tau: Tensor) -> Tensor:
    """:func:`mass_fill` for a mass target ``tau`` > 0 (a float32 tensor)."""
    num = score.shape[-1]
    score = score.to(torch.float64)  # column sums are fixed point (exact in float64): sums in any order agree
    whole = score.sum(-1, keepdim=True)
    have = (score * forced).sum(-1, keepdim=True)
    key = torch.where(cand, score, torch.full_like(score, float("-inf")))
    ordered = torch.sort(key, dim=-1, descending=True, stable=True).values
    ordered = torch.where(torch.isfinite(ordered), ordered, torch.zeros_like(ordered))
    before = torch.cumsum(ordered, -1) - ordered  # mass of the candidates ahead of each position
    goal = tau.to(torch.float64) * whole * (1.0 - MASS_RTOL)
    num_cand = cand.sum(-1, keepdim=True)
    slot = torch.arange(num, device=score.device)
    return ((have + before < goal) & (slot < num_cand)).sum(-1)


def fill_count(score: Tensor, forced: Tensor, cand: Tensor, total: Tensor | int,
               target_mass: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """How many of the best candidates join S = forced ∪ them, and whether the budget bound.

    Returns (fill int64 [...], cap_bound bool [...]): fill = the budget's room (``total`` − |forced|,
    at least 0), or fewer when ``target_mass`` tau is reached first (:func:`mass_fill`); cap_bound =
    a mass target is set (tau > 0) and the budget stopped the fill before it was reached (the mass
    needed more candidates than the budget left room for). Without a mass target (None or <= 0),
    cap_bound is False. Device tensors only, no host sync (``total`` and tau may be 0-d knobs)."""
    room = (device_scalar(total, score.device) - forced.sum(-1)).clamp_min(0)
    if target_mass is None:
        return room, torch.zeros_like(room, dtype=torch.bool)
    tau = device_scalar(target_mass, score.device, torch.float32)
    need = _mass_need(score, forced, cand, tau)
    on = tau > 0
    fill = torch.where(on, torch.minimum(room, need), room)
    return fill, on & (room < need)


def top_by_score(score: Tensor, forced: Tensor, total: Tensor | int, allowed: Tensor | None = None,
                 target_mass: Tensor | float | None = None) -> Tensor:
    """The exact maximiser of sum(score[S]) s.t. forced ⊆ S ⊆ forced ∪ allowed, |S| <= max(total, |forced|).

    Works on the last dim (leading dims are independent rows). ``score`` must be >= 0, which makes
    "fill up to the budget" optimal. ``total`` may be a device tensor (a runtime knob).

    ``target_mass`` tau (a float or a 0-d device tensor; None or <= 0: off): S stops growing once its
    mass reaches tau of the total over every expert (:func:`mass_fill`), so S is the exact minimiser
    of |S| s.t. forced ⊆ S ⊆ forced ∪ allowed, sum(score[S]) >= tau · sum(score), capped at
    max(total, |forced|) (where the cap binds, the maximiser above). Exact because the objective is
    modular: the best n candidates carry the most mass of any n.
    """
    return top_by_score_bound(score, forced, total, allowed, target_mass)[0]


def top_by_score_bound(score: Tensor, forced: Tensor, total: Tensor | int, allowed: Tensor | None = None,
                       target_mass: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`top_by_score` and whether its budget cut S short of the mass target (bool [...], the
    leading dims; :func:`fill_count`)."""
    cand = ~forced if allowed is None else (allowed & ~forced)
    fill, bound = fill_count(score, forced, cand, total, target_mass)
    pos = positions_by_score(score, cand)
    return forced | (cand & (pos < fill.unsqueeze(-1))), bound


def top_by_score_capped(
    score: Tensor, forced: Tensor, total: Tensor | int, group: Tensor, cap: Tensor, allowed: Tensor | None = None,
    target_mass: Tensor | float | None = None,
) -> Tensor:
    """Like :func:`top_by_score` with a per-group cap: |S ∩ g| <= max(cap[g], |forced ∩ g|).

    ``score`` [E] >= 0, ``group`` int64 [E] in [0, G), ``cap`` int64 [G]. The feasible sets form a
    truncated partition matroid, so greedy in score order is exact; it is computed without a loop:
    a candidate is admissible iff fewer than the group's spare capacity better candidates share its
    group, and the best ``fill`` admissible candidates are taken. With ``target_mass``, the greedy
    prefix stops at the mass target: on a matroid the greedy prefix of each size has the most mass
    of any feasible set of that size, so the result is the fewest experts reaching it.
    """
    return top_by_score_capped_bound(score, forced, total, group, cap, allowed, target_mass)[0]


def top_by_score_capped_bound(
    score: Tensor, forced: Tensor, total: Tensor | int, group: Tensor, cap: Tensor, allowed: Tensor | None = None,
    target_mass: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`top_by_score_capped` and whether the budget (not a per-group cap) cut S short of the
    mass target (bool 0-d; :func:`fill_count`)."""
    num_groups = cap.shape[0]
    cand = ~forced if allowed is None else (allowed & ~forced)
    onehot = group.unsqueeze(-1) == torch.arange(num_groups, device=group.device)  # [E, G]
    forced_per_group = (onehot & forced.unsqueeze(-1)).sum(0)  # [G]
    spare = (torch.maximum(cap, forced_per_group) - forced_per_group)  # [G] >= 0
    key = torch.where(cand, score, torch.full_like(score, float("-inf")))
    order = torch.argsort(key, descending=True, stable=True)
    sorted_onehot = (onehot & cand.unsqueeze(-1))[order]  # [E, G]
    within = (sorted_onehot.long().cumsum(0) * sorted_onehot).sum(-1) - 1  # 0-based rank in own group
    admissible_sorted = cand[order] & (within < spare[group[order]])
    admissible = torch.empty_like(admissible_sorted).scatter_(0, order, admissible_sorted)
    return top_by_score_bound(score, forced, total, allowed=admissible, target_mass=target_mass)


# Column sums are accumulated in fixed point: floor(score * 2**30) as int64. Integer sums do not depend
# on the order of the additions, so the torch reference, the fused kernel (atomic adds from any number
# of programs) and every TP rank rank experts identically, ties included; converted back they are exact
# float64 values (below 2**23 in total), so sums of them (mass targets) are exact in any order too.
SUM_SCALE = 2.0 ** 30


def fixed_point(scores: Tensor) -> Tensor:
    """int64, the shape of ``scores`` (>= 0): each score in whole units of 2**-30, truncated."""
    return (scores.to(torch.float32) * SUM_SCALE).to(torch.int64)


def fixed_point_totals(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """int64 [E]: the column sums of ``scores`` float [T, E] (>= 0) in units of 2**-30 over the rows
    where ``valid`` (bool [T]; None: every row), each score truncated to a whole unit first."""
    if valid is not None:
        scores = torch.where(valid.unsqueeze(1), scores, torch.zeros_like(scores))
    return fixed_point(scores).sum(0)


def fixed_point_sums(scores: Tensor, valid: Tensor) -> Tensor:
    """float64 [E]: :func:`fixed_point_totals` as exact float64 sums of the scores."""
    return fixed_point_totals(scores, valid).to(torch.float64) / SUM_SCALE


def same_group_matrix(groups: Tensor, valid: Tensor) -> Tensor:
    """float32 [T, T]: 1 where token u is a valid token of token t's request."""
    same = (groups.unsqueeze(1) == groups.unsqueeze(0)) & valid.unsqueeze(0)
    return same.to(torch.float32)


@dataclass
class Batch:
    """One layer's batch as the policies see it (built by :func:`xshare.selection.select`)."""

    logits: Tensor  # float32 [T, E]; unusable entries are -inf
    scores: Tensor  # float32 [T, E]; gate scores, 0 where unusable
    usable: Tensor  # bool [T, E]
    valid: Tensor  # bool [T]: rows that count in batch statistics (False for CUDA-graph padding)
    top_k: int
    config: SelectorConfig
    budget: int | Tensor  # m, resolved against E (a 0-d device tensor when knobs are used)
    groups: Tensor | None  # int64 [T] request id per token, or None
    placement: Placement | None
    warmup_k: int | Tensor = 0  # k0
    target_mass: float | Tensor = 0.0  # tau; 0 = off (the budget alone)
    # bool [T] or None: rows that keep their own top_k exactly (per-request exact routing); their
    # experts are part of the warm-up W, so every set built on W contains them
    exact: Tensor | None = None
    group_budget: int | Tensor = 0  # m_r, resolved
    anchor_k: int | Tensor = 0  # the first row of a multi-row request keeps its top anchor_k (resolved, >= k0)
    gpu_cap: int | Tensor = 0  # c; 0 = ceil(m / G)
    _rank: Tensor | None = field(default=None, repr=False)
    # bool 0-d, noted by a policy with a mass target as it builds its set (:meth:`note_cap_bound`):
    # the budget stopped the set short of tau; None for the other policies
    cap_bound: Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.scores.shape[1])

    @property
    def rank(self) -> Tensor:
        if self._rank is None:
            self._rank = preference_rank(self.scores, self.usable)
        return self._rank

    def note_cap_bound(self, bound: Tensor) -> None:
        """Record that the budget cut this batch's set short of its mass target (bool 0-d, from
        :func:`top_by_score_bound`); read into :attr:`Routing.cap_bound` by the routing."""
        self.cap_bound = bound

    def own_topk(self, k: int | Tensor) -> Tensor:
        """bool [T, E]: each token's own top-k usable experts (all rows)."""
        return (self.rank < k) & self.usable

    def batch_union(self, mask: Tensor) -> Tensor:
        """bool [E]: union of ``mask`` [T, E] over the valid rows."""
        return (mask & self.valid.unsqueeze(1)).any(0)

    def column_sums(self, scores: Tensor | None = None) -> Tensor:
        """float64 [E]: the batch's summed gate scores over the valid rows (:func:`fixed_point_sums`)."""
        s = self.scores if scores is None else scores
        return fixed_point_sums(s, self.valid)

    def warmup(self) -> Tensor:
        """bool [E]: W = the union of every valid token's top-k0 experts, and of every exact row's
        own top_k (those rows keep their routing, so their experts are in S and count in its budget)."""
        w = self.batch_union(self.own_topk(self.warmup_k))
        if self.exact is not None:
            w = w | self.batch_union(self.own_topk(self.top_k) & self.exact.unsqueeze(1))
        return w

    def group_matrix(self) -> Tensor:
        """float32 [T, T] same-request matrix (each token its own request when groups is None)."""
        if self.groups is None:
            return torch.diag(self.valid.to(torch.float32))
        return same_group_matrix(self.groups, self.valid)


def tiers_inside(batch: Batch, *sets: Tensor) -> Tensor:
    """Preference tiers for :func:`route`: a token prefers usable experts inside ``sets[0]``, then
    inside ``sets[1]``, …, then any usable expert (its own top-k), then unusable ones.

    Each set is bool [E] (the same for every token) or [T, E] (per token). Returns int64 [T, E].
    """
    tiers = batch.usable.long()
    n = len(sets)
    for i in reversed(range(n)):  # earlier sets win: they are written last
        s = sets[i]
        inside = batch.usable & (s if s.ndim == 2 else s.unsqueeze(0))
        tiers = torch.where(inside, torch.full_like(tiers, n + 1 - i), tiers)
    return tiers


def route(batch: Batch, tiers: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's top_k distinct experts by (tier desc, score desc, index asc) and their weights.

    Returns int32 ids [T, top_k] and float32 weights [T, top_k], renormalised when configured.
    """
    e = batch.num_experts
    key = tiers * e + (e - 1 - batch.rank)  # unique per row: no ties
    ids = torch.topk(key, batch.top_k, dim=-1, sorted=True).indices
    weights = batch.scores.gather(1, ids)
    if batch.config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True, dtype=torch.float32) + RENORMALIZE_EPS)
    return ids.to(torch.int32), weights.to(torch.float32)


def active_experts(ids: Tensor, valid: Tensor, num_experts: int) -> Tensor:
    """bool [E]: experts routed by at least one valid token."""
    hits = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    src = valid.to(torch.int32).unsqueeze(1).expand_as(ids)
    return hits.scatter_add_(0, ids.long().flatten(), src.flatten()) > 0


def assign_replicas(ids: Tensor, active: Tensor, placement: Placement, strategy: str) -> Tensor:
    """Physical slot of every (token, expert) assignment, int32 [T, top_k].

    'least_loaded': all tokens of an expert go to one replica, the one on the GPU with the fewest
    activated single-replica experts (ties: the expert's first replica). 'spread': token t uses
    replica t mod (#replicas), like SGLang's rank-invariant dynamic dispatch.
    """
    replicas = placement.replicas
    num_rep = (replicas >= 0).sum(-1)  # [E]
    ids = ids.long()
    if strategy == "least_loaded":
        single = active & (num_rep == 1)
        onehot = placement.primary_gpu.unsqueeze(-1) == torch.arange(placement.num_gpus, device=ids.device)
        base = (onehot & single.unsqueeze(-1)).sum(0)  # [G]
        big = torch.iinfo(torch.int64).max
        load = torch.where(placement.replica_gpu >= 0, base[placement.replica_gpu.clamp_min(0)],
                           torch.full_like(placement.replica_gpu, big))
        choice = torch.argmin(load, dim=-1)  # first minimum = lower replica index
        slot_of_expert = replicas.gather(1, choice.unsqueeze(-1)).squeeze(-1)
        return slot_of_expert[ids].to(torch.int32)
    t = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
    j = t % num_rep[ids]
    return replicas[ids, j].to(torch.int32)
