"""The selection call the adapter makes: :func:`xshare.selection.select`'s flow, with ties broken
the way SGLang broke them, and an optional group-wide statistic (DeepEP global mode).

Why: SGLang's own top-k (``torch.topk`` over float32 gate probabilities) breaks exact ties in an
implementation-defined order; the core breaks them by the lower expert index. Router logits in
bf16 tie often. A token whose own top-k contains such a tie would then get a different (equally
scored) expert from the selector even when the policy keeps every expert, and the model's output
would change. Here each token's preference order is: usable first, then gate score, then SGLang's
own pick (in SGLang's column order), then the expert index. Every policy reads that order
(``Batch.rank``), so a token's "own top-k" is exactly SGLang's, and with a budget >= E the
routing, its column order and its weights are bitwise SGLang's.

Pure torch: no sglang import. Mirrors the end of :func:`xshare.selection.api.select` (kept in
step with it; see tests/test_sglang_runtime.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from xshare.selection import Placement, Routing, SelectorConfig, get_policy
from xshare.selection.api import prepare_batch
from xshare.selection.common import Batch, active_experts, assign_replicas, route
from xshare.selection.knobs import SelectorKnobs


def sglang_preference_rank(scores: Tensor, usable: Tensor, sglang_ids: Tensor | None) -> Tensor:
    """rank[t, e]: position of expert e in token t's order (usable, score desc, SGLang's own picks
    first in SGLang's column order, index asc). ``sglang_ids`` int [T, k] (-1 = none) or None."""
    num_rows, num_experts = scores.shape
    order = torch.arange(num_experts, device=scores.device).expand(num_rows, num_experts)
    if sglang_ids is not None and sglang_ids.numel():
        k = sglang_ids.shape[1]
        own = torch.full((num_rows, num_experts + 1), k, dtype=torch.int64, device=scores.device)
        ids = sglang_ids.to(torch.int64)
        ids = torch.where(ids >= 0, ids, torch.full_like(ids, num_experts))  # -1 -> a spare column
        own.scatter_(1, ids, torch.arange(k, device=scores.device).expand(num_rows, k))
        order = torch.argsort(own[:, :num_experts], dim=-1, stable=True)  # own picks first, then index
    key = torch.where(usable, scores, torch.full_like(scores, -1.0)).gather(1, order)
    order = order.gather(1, torch.argsort(key, dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    pos = torch.arange(num_experts, device=scores.device).expand_as(order)
    return rank.scatter_(-1, order, pos)


@dataclasses.dataclass
class _GroupBatch(Batch):
    """A Batch whose batch statistics (column sums, warm-up set) are a group's (DeepEP global mode)."""

    global_sums: Tensor | None = None
    global_warmup: Tensor | None = None

    def column_sums(self, scores: Tensor | None = None) -> Tensor:
        if scores is None and self.global_sums is not None:
            return self.global_sums
        return super().column_sums(scores)

    def warmup(self) -> Tensor:
        if self.global_warmup is not None:
            return self.global_warmup
        return super().warmup()


def prepare(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    sglang_ids: Tensor | None = None,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
) -> Batch:
    """:func:`xshare.selection.api.prepare_batch` with SGLang's tie-breaking (see the module doc)."""
    batch = prepare_batch(router_logits, top_k, config, groups=groups, placement=placement, num_tokens=num_tokens,
                          knobs=knobs, validate=False)
    batch._rank = sglang_preference_rank(batch.scores, batch.usable, sglang_ids)
    return batch


def local_statistics(batch: Batch) -> Tensor:
    """float32 [2E]: the batch's gate-score column sums, then its warm-up counts (tokens whose
    top-k0 contains the expert): what DeepEP global mode all-reduces."""
    own = batch.own_topk(batch.warmup_k) & batch.valid.unsqueeze(1)
    return torch.cat([batch.column_sums(), own.sum(0).to(torch.float32)])


def with_group_statistics(batch: Batch, group_stats: Tensor) -> Batch:
    """The same batch, its batch statistics replaced by the group's (float32 [2E], all-reduced)."""
    num_experts = batch.num_experts
    if group_stats.shape != (2 * num_experts,):
        raise ValueError(f"group statistics must have shape [2E] = [{2 * num_experts}], got {tuple(group_stats.shape)}")
    return _GroupBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)},
                       global_sums=group_stats[:num_experts], global_warmup=group_stats[num_experts:] > 0)


def finish(
    batch: Batch,
    config: SelectorConfig,
    *,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    decided: bool = False,
) -> Routing:
    """The policy's routing of ``batch`` (the second half of :func:`xshare.selection.select`).

    ``decided``: the caller has already decided that the policy applies (DeepEP global mode decides
    from the group's batch size); padded rows still route like 'topk'."""
    policy = get_policy(config.policy)
    vanilla = get_policy("topk")
    valid = batch.valid
    if decided:
        tiers = torch.where(valid.unsqueeze(1), policy.tiers(batch), vanilla.tiers(batch))
        strategy = policy.replica_strategy
    elif num_tokens is None and knobs is None:
        chosen = policy if config.applies_to(batch.num_tokens) else vanilla
        tiers = chosen.tiers(batch)
        strategy = chosen.replica_strategy
    else:
        n = valid.sum()
        if knobs is None:
            apply = n >= config.min_tokens
            if config.max_tokens is not None:
                apply = apply & (n <= config.max_tokens)
        else:
            apply = knobs.enabled & (n >= knobs.min_tokens) & (n <= knobs.max_tokens)
        tiers = torch.where(apply & valid.unsqueeze(1), policy.tiers(batch), vanilla.tiers(batch))
        strategy = policy.replica_strategy
    ids, weights = route(batch, tiers)
    active = active_experts(ids, valid, batch.num_experts)
    physical = None
    if batch.placement is not None and batch.placement.has_replicas:
        physical = assign_replicas(ids, active, batch.placement, strategy)
    return Routing(topk_ids=ids, topk_weights=weights, active=active, physical_ids=physical)
