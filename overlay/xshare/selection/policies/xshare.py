"""``xshare``: batch-level expert sharing (XShare, arXiv 2602.07265, §3.4).

S = W ∪ the best experts by the batch's summed gate score, up to the budget m, where the warm-up
W is the union of every token's top-k0 experts (always kept, even when |W| > m). S is the exact
optimum of  max Σ_t Σ_{e∈S} p[t,e]  s.t.  W ⊆ S, |S| <= max(m, |W|)  (the objective is modular).
With ``target_mass`` tau, S is the fewest experts (W included) whose batch gate mass reaches tau of
the batch's total, still capped by the budget: the exact optimum of  min |S|  s.t.  W ⊆ S,
Σ_t Σ_{e∈S} p[t,e] >= tau · Σ_t Σ_e p[t,e],  |S| <= max(m, |W|).
Refinement: each token re-picks its top_k inside S (widening to its own best outside S only if S
holds fewer than top_k of its usable experts); weights renormalised as the model does.
"""

from torch import Tensor

from xshare.selection.common import Batch, top_by_score_bound
from xshare.selection.registry import Policy, register_policy


def xshare_set(batch: Batch) -> Tensor:
    """bool [E]: the batch's expert set S (noting on ``batch`` whether the budget cut it short of the
    mass target)."""
    s, bound = top_by_score_bound(batch.column_sums(), batch.warmup(), batch.budget, target_mass=batch.target_mass)
    batch.note_cap_bound(bound)
    return s


@register_policy
class XShare(Policy):
    name = "xshare"
    knobs = ("budget", "warmup_k", "target_mass")
    global_stats = True
    kernels = frozenset({"cpu", "triton"})
    color = "tab:blue"
    summary = "warm-up top-k0 per token + greedy fill by batch gate mass up to budget m"

    def batch_set(self, batch: Batch) -> Tensor:
        return xshare_set(batch)
