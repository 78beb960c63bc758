"""DeepEP 'global' mode: one expert set per layer for the whole EP group.

With an all-to-all MoE backend (``--moe-a2a-backend deepep``, usually with DP attention) each rank
routes only its own tokens. In 'local' mode every rank runs the policy on its own rows (no
communication; each rank's expert set can differ, so the union of experts the group activates can
exceed the budget). In 'global' mode every rank contributes its batch statistics, the E column
sums of gate scores and the warm-up counts, to one all-reduce per MoE layer; every rank then derives
the same expert set S from the group's statistics and routes its own tokens inside S. Every rank
of the group must join that all-reduce in every applicable layer, including ranks with zero
tokens (SGLang's ``TopK.empty_topk_output`` path), or the group deadlocks; :func:`join_empty`
is the zero-token contribution.

Pure torch (+ torch.distributed through the ``all_reduce`` callable): no sglang import here.
Supported policies: topk, xshare, xshare_ep (their set depends on the batch only through these
statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from xshare.selection import Placement, Routing, SelectorConfig, get_policy
from xshare.selection.api import prepare_batch
from xshare.selection.common import Batch, active_experts, assign_replicas, route

GLOBAL_POLICIES = ("topk", "xshare", "xshare_ep")
AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the group; may be in place or not


def local_statistics(batch: Batch) -> Tensor:
    """float32 [2E]: this rank's gate-score column sums, then its warm-up counts (tokens whose
    top-k0 contains the expert)."""
    own = batch.own_topk(batch.warmup_k) & batch.valid.unsqueeze(1)
    return torch.cat([batch.column_sums(), own.sum(0).to(torch.float32)])


def join_empty(num_experts: int, all_reduce: AllReduce, device: torch.device | str = "cpu") -> Tensor:
    """A zero-token rank's part of the layer's all-reduce (zeros); returns the group's statistics."""
    return all_reduce(torch.zeros(2 * num_experts, dtype=torch.float32, device=device))


@dataclasses.dataclass
class _GlobalBatch(Batch):
    """A Batch whose batch statistics (column sums, warm-up set) are the EP group's."""

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


def prepare_global(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
) -> tuple[Batch, Tensor]:
    """This rank's batch and its float32 [2E] statistics (the all-reduce's input)."""
    if config.policy not in GLOBAL_POLICIES:
        raise ValueError(f"global mode supports policies {', '.join(GLOBAL_POLICIES)}; got {config.policy!r}")
    batch = prepare_batch(router_logits, top_k, config, placement=placement, num_tokens=num_tokens, validate=False)
    return batch, local_statistics(batch)


def finish_global(batch: Batch, group_stats: Tensor, config: SelectorConfig) -> Routing:
    """Route this rank's rows inside the set the group's statistics (all-reduced) determine."""
    num_experts = batch.num_experts
    if group_stats.shape != (2 * num_experts,):
        raise ValueError(f"group statistics must have shape [2E] = [{2 * num_experts}], got {tuple(group_stats.shape)}")
    gbatch = _GlobalBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)},
                          global_sums=group_stats[:num_experts], global_warmup=group_stats[num_experts:] > 0)
    policy = get_policy(config.policy)
    tiers = policy.tiers(gbatch)
    ids, weights = route(gbatch, tiers)
    active = active_experts(ids, batch.valid, num_experts)
    physical = None
    if gbatch.placement is not None and gbatch.placement.has_replicas:
        physical = assign_replicas(ids, active, gbatch.placement, policy.replica_strategy)
    return Routing(topk_ids=ids, topk_weights=weights, active=active, physical_ids=physical)


def global_select(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    all_reduce: AllReduce,
    *,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
) -> Routing:
    """Like :func:`xshare.selection.select` for this rank's rows, with the group's statistics.

    Exactly one ``all_reduce`` call (of a float32 [2E] tensor) per invocation, whatever the rows
    (zero rows included). The caller decides applicability (batch-size range) from group-wide
    numbers, identically on every rank, before calling.
    """
    batch, local = prepare_global(router_logits, top_k, config, placement=placement, num_tokens=num_tokens)
    return finish_global(batch, all_reduce(local), config)
