"""``des_seq``: DES-Seq (Dynamic Expert Sharing, arXiv 2602.00879, Alg. 2).

The coreset of a sequence block is the union of its tokens' top-k experts with k < K (k =
``warmup_k``); each token re-picks its top-K inside its block's coreset. The block is a request
(``groups``: a speculative verify batch holds several draft tokens per request); without groups the
whole batch is one block, which makes it the same rule as OEA's phase 1 + piggyback. No budget.
"""

import torch
from torch import Tensor

from xshare.selection.common import Batch, tiers_inside
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import Policy, register_policy, require_warmup_k


@register_policy
class DESSeq(Policy):
    name = "des_seq"
    knobs = ("warmup_k",)
    sweep_knob = "warmup_k"
    groups = "optional"
    color = "tab:olive"
    summary = "coreset = union of top-k0 experts per request block; budget unused"

    def validate_config(self, config: SelectorConfig) -> None:
        require_warmup_k(config, self.name, "DES-Seq's k")

    def tiers(self, batch: Batch) -> Tensor:
        own = batch.own_topk(batch.warmup_k)
        if batch.groups is None:
            return tiers_inside(batch, batch.batch_union(own))
        coreset = (batch.group_matrix() @ own.to(torch.float32)) > 0  # [T, E] per request
        return tiers_inside(batch, coreset)
