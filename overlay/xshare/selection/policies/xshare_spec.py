"""``xshare_spec``: hierarchical XShare for speculative decoding (verify batches).

Stage 1, per request r (``groups``): S_r = W_r ∪ the best experts by the request's summed gate
score, |S_r| <= max(m_r, |W_r|) (``group_budget``, default top_k), W_r = its tokens' top-k0 and, for a
request with several rows, its first row's top-``anchor_k`` (default top_k: in a verify batch that row
is the accepted token, whose output is kept whatever the drafts' fate, so it keeps its own routing).
Stage 2, per batch: S = W ∪ the best experts of ∪_r S_r by the batch's summed gate score,
|S| <= max(m, |W|), W = ∪_r W_r (exact for  max Σ p over S  s.t.  W ⊆ S ⊆ ∪_r S_r).
A token of request r routes inside S_r ∩ S, widening to S, then to its own top_k, if it would
otherwise have fewer than top_k usable experts. All requests are handled at once through a
[T, T] same-request matrix: no loop over requests.
"""

import torch
from torch import Tensor

from xshare.selection.common import SUM_SCALE, Batch, fixed_point, tiers_inside, top_by_score
from xshare.selection.registry import Policy, register_policy


def request_sets(batch: Batch) -> tuple[Tensor, Tensor]:
    """(S_r, W_r) as bool [T, E]: row t holds the sets of token t's request."""
    same = batch.group_matrix()  # [T, T]
    # each row: its request's column sums, read from one row per request (its first valid row), so that
    # every row of a request gets the same float sums (a matmul's summation order differs per row, and
    # a last-bit difference would break a tie differently and give rows of one request other sets)
    leader = torch.argmax((same > 0).to(torch.int8), dim=1)
    rows = torch.arange(leader.shape[0], device=leader.device)
    anchor = (leader == rows) & ((same > 0).sum(dim=1) > 1)  # the first valid row of a multi-row request
    k = torch.where(anchor, batch.anchor_k, batch.warmup_k).unsqueeze(1)
    w_r = (same @ batch.own_topk(k).to(torch.float32)) > 0
    # fixed-point scores (common.fixed_point_sums): the float64 sums of these integers are exact, in any order
    g_r = (same.to(torch.float64) @ fixed_point(batch.scores).to(torch.float64))[leader] / SUM_SCALE
    return top_by_score(g_r, w_r, batch.group_budget), w_r


def xshare_spec_sets(batch: Batch) -> tuple[Tensor, Tensor]:
    """(S_r bool [T, E] per token's request, S bool [E] for the batch)."""
    s_r, w_r = request_sets(batch)
    union = batch.batch_union(s_r)
    s = top_by_score(batch.column_sums(), batch.batch_union(w_r), batch.budget, allowed=union)
    return s_r, s


@register_policy
class XShareSpec(Policy):
    name = "xshare_spec"
    knobs = ("budget", "warmup_k", "group_budget")  # (and anchor_k, a setting no sweep varies)
    groups = "required"
    kernels = frozenset({"triton"})
    color = "tab:cyan"
    summary = "per-request sets (budget m_r) over draft tokens, then a batch set (budget m)"

    def tiers(self, batch: Batch) -> Tensor:
        s_r, s = xshare_spec_sets(batch)
        return tiers_inside(batch, s_r & s.unsqueeze(0), s)
