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

Pure torch: no sglang import. The tie order is the core's ``prefer`` argument; the routing is the
core's :func:`xshare.selection.api.finish_routing`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from xshare.selection import Placement, Routing, SelectorConfig
from xshare.selection.api import finish_routing, prepare_batch
from xshare.selection.common import Batch
from xshare.selection.knobs import SelectorKnobs


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
    return prepare_batch(router_logits, top_k, config, groups=groups, placement=placement, num_tokens=num_tokens,
                         knobs=knobs, prefer=sglang_ids, validate=False)


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
    """The policy's routing of ``batch`` (:func:`xshare.selection.api.finish_routing`)."""
    if config is not batch.config:
        batch = dataclasses.replace(batch, config=config)
    return finish_routing(batch, num_tokens=num_tokens, knobs=knobs, decided=decided)
