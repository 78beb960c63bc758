"""DeepEP 'global' mode: one expert set per layer for the whole EP group.

With an all-to-all MoE backend (``--moe-a2a-backend deepep``, usually with DP attention) each rank
routes only its own tokens. In 'local' mode every rank runs the policy on its own rows (no
communication; each rank's expert set can differ, so the group as a whole can activate more than
the budget). In 'global' mode every rank contributes its batch statistics, the E column sums of
gate scores and the warm-up counts, to one all-reduce per MoE layer; every rank then derives the
same expert set S from the group's statistics and routes its own tokens inside S. Every rank of
the group must join that all-reduce in every applicable layer, including ranks with zero tokens
(SGLang's ``TopK.empty_topk_output`` path), or the group deadlocks; :func:`join_empty` is the
zero-token contribution.

Pure torch (+ torch.distributed through the ``all_reduce`` callable). Supported policies: those
whose set depends on the batch only through these statistics (``Policy.global_stats``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from xshare.selection.backends.reference import finish_routing, prepare_batch
from xshare.selection.call import AllReduce, Decision, LayerCall
from xshare.selection.common import Batch
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import all_policies, get_policy


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


def local_statistics(batch: Batch) -> Tensor:
    """float32 [2E]: the batch's gate-score column sums, then its warm-up counts (tokens whose
    top-k0 contains the expert): what DeepEP global mode all-reduces."""
    own = batch.own_topk(batch.warmup_k) & batch.valid.unsqueeze(1)
    return torch.cat([batch.column_sums().to(torch.float32), own.sum(0).to(torch.float32)])


def with_group_statistics(batch: Batch, group_stats: Tensor) -> Batch:
    """The same batch, its batch statistics replaced by the group's (float32 [2E], all-reduced)."""
    num_experts = batch.num_experts
    if group_stats.shape != (2 * num_experts,):
        raise ValueError(f"group statistics must have shape [2E] = [{2 * num_experts}], got {tuple(group_stats.shape)}")
    return _GroupBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)},
                       global_sums=group_stats[:num_experts], global_warmup=group_stats[num_experts:] > 0)


def global_policies() -> list[str]:
    """The policies DeepEP global mode supports (``Policy.global_stats``)."""
    return [p.name for p in all_policies() if p.global_stats]


def join_empty(num_experts: int, all_reduce: AllReduce, device: torch.device | str = "cpu") -> Tensor:
    """A zero-token rank's part of the layer's all-reduce (zeros); returns the group's statistics."""
    return all_reduce(torch.zeros(2 * num_experts, dtype=torch.float32, device=device))


def _prepare(call: LayerCall, config: SelectorConfig) -> tuple[Batch, Tensor]:
    """This rank's batch and its float32 [2E] statistics (the all-reduce's input)."""
    if not get_policy(config.policy).global_stats:
        raise ValueError(f"global mode supports policies {', '.join(global_policies())}; got {config.policy!r}")
    # the group decides together: no request groups, device knobs or exact rows, no host-sync checks
    rank_call = dataclasses.replace(call, groups=None, knobs=None, exact=None, validate=False)
    batch = prepare_batch(rank_call, config)
    return batch, local_statistics(batch)


def decide_global(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None = None) -> Decision:
    """The decision for a plain layer call in DeepEP global mode (``call.all_reduce`` set; ``config``
    with the layer's scoring applied): this rank's rows routed inside the set the group's all-reduced
    statistics determine. Exactly one ``all_reduce`` of a float32 [2E] tensor per call, whatever the
    rows (zero rows included), even when this rank's own part fails. The caller decides applicability
    (batch-size range) from group-wide numbers, identically on every rank, before calling."""
    try:
        batch, local = _prepare(call, config)
    except Exception:
        # Every rank joins the all-reduce, even if its own part failed: otherwise the group hangs.
        join_empty(call.router_logits.shape[1], call.all_reduce, call.router_logits.device)
        raise
    group_stats = call.all_reduce(local)
    if checkpoint is not None:
        checkpoint()
    batch = with_group_statistics(batch, group_stats)
    if config is not batch.config:
        batch = dataclasses.replace(batch, config=config)
    return Decision(finish_routing(batch, decided=True), config)
