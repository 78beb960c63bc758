"""``des_vote``: DES-Vote (Dynamic Expert Sharing, arXiv 2602.00879, Alg. 3).

Each token votes for its own top-K experts with its gate scores (scores outside its top-K are
masked); the coreset C is the top-m experts by total vote (m = budget, i.e. β·E). Tokens re-pick
their top_k inside C (widening to their own best only when C holds fewer than top_k usable). No
warm-up: a minority token can lose its top-1 expert. The "block" of parallel tokens is the batch.
"""

import torch
from torch import Tensor

from xshare.selection.common import Batch, top_by_score
from xshare.selection.registry import Policy, register_policy


@register_policy
class DESVote(Policy):
    name = "des_vote"
    knobs = ("budget",)
    color = "tab:green"
    summary = "coreset = top-m experts by saliency-weighted top-K votes; no warm-up"

    def batch_set(self, batch: Batch) -> Tensor:
        votes = batch.column_sums(batch.scores * batch.own_topk(batch.top_k))
        none = torch.zeros_like(votes, dtype=torch.bool)
        return top_by_score(votes, none, batch.budget, allowed=votes > 0)
