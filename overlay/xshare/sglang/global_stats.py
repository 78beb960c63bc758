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

Pure torch (+ torch.distributed through the ``all_reduce`` callable): no sglang import here.
Supported policies: topk, xshare, xshare_ep (their set depends on the batch only through these
statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from xshare.selection import Placement, Routing, SelectorConfig
from xshare.selection.common import Batch
from xshare.sglang.selecting import finish, local_statistics, prepare, with_group_statistics

GLOBAL_POLICIES = ("topk", "xshare", "xshare_ep")
AllReduce = Callable[[Tensor], Tensor]  # sums a tensor over the group; may be in place or not


def join_empty(num_experts: int, all_reduce: AllReduce, device: torch.device | str = "cpu") -> Tensor:
    """A zero-token rank's part of the layer's all-reduce (zeros); returns the group's statistics."""
    return all_reduce(torch.zeros(2 * num_experts, dtype=torch.float32, device=device))


def prepare_global(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    sglang_ids: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
) -> tuple[Batch, Tensor]:
    """This rank's batch and its float32 [2E] statistics (the all-reduce's input)."""
    if config.policy not in GLOBAL_POLICIES:
        raise ValueError(f"global mode supports policies {', '.join(GLOBAL_POLICIES)}; got {config.policy!r}")
    batch = prepare(router_logits, top_k, config, sglang_ids=sglang_ids, placement=placement, num_tokens=num_tokens)
    return batch, local_statistics(batch)


def finish_global(batch: Batch, group_stats: Tensor, config: SelectorConfig) -> Routing:
    """Route this rank's rows inside the set the group's (all-reduced) statistics determine."""
    return finish(with_group_statistics(batch, group_stats), config, decided=True)


def global_select(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    all_reduce: AllReduce,
    *,
    sglang_ids: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
) -> Routing:
    """Like :func:`xshare.selection.select` for this rank's rows, with the group's statistics.

    Exactly one ``all_reduce`` call (of a float32 [2E] tensor) per invocation, whatever the rows
    (zero rows included). The caller decides applicability (batch-size range) from group-wide
    numbers, identically on every rank, before calling.
    """
    batch, local = prepare_global(router_logits, top_k, config, sglang_ids=sglang_ids, placement=placement,
                                  num_tokens=num_tokens)
    return finish_global(batch, all_reduce(local), config)
