"""``xshare_ep``: GPU-aware XShare for expert parallelism.

Experts live on G GPUs (``placement``); each GPU may contribute at most c experts (``gpu_cap``,
default ceil(m / G)), so the slowest GPU's weight loading shrinks. S is the exact optimum of
    max Σ_t Σ_{e∈S} p[t,e]  s.t.  W ⊆ S,  |S| <= max(m, |W|),  |S ∩ g| <= max(c, |W ∩ g|) ∀g
(a truncated partition matroid: greedy by batch gate mass is exact). An expert with replicas is
charged to the GPU of its first replica; all of its tokens then go to the replica on the
least-loaded GPU. With ``target_mass`` tau, the greedy prefix stops at the first size whose mass
reaches tau of the batch's total (the fewest experts under the caps: greedy is exact on a matroid).
"""

import torch
from torch import Tensor

from xshare.selection.common import Batch, device_scalar, tiers_inside, top_by_score_capped_bound
from xshare.selection.registry import Policy, register_policy


def gpu_cap(batch: Batch) -> Tensor:
    """c as a 0-d tensor: the configured cap, or ceil(m / G) when it is 0 (unset)."""
    device = batch.scores.device
    cap = device_scalar(batch.gpu_cap, device, torch.int64)
    default = -(-device_scalar(batch.budget, device, torch.int64) // batch.placement.num_gpus)
    return torch.where(cap > 0, cap, default)


def xshare_ep_set(batch: Batch) -> Tensor:
    placement = batch.placement
    cap = gpu_cap(batch).expand(placement.num_gpus)
    s, bound = top_by_score_capped_bound(batch.column_sums(), batch.warmup(), batch.budget, placement.primary_gpu,
                                         cap, target_mass=batch.target_mass)
    batch.note_cap_bound(bound)
    return s


@register_policy
class XShareEP(Policy):
    name = "xshare_ep"
    knobs = ("budget", "warmup_k", "gpu_cap", "target_mass")
    global_stats = True
    kernels = frozenset({"triton"})
    color = "tab:orange"
    needs_placement = True
    replica_strategy = "least_loaded"
    summary = "xshare with a per-GPU cap on selected experts (cuts the peak GPU load under EP)"

    def tiers(self, batch: Batch) -> Tensor:
        return tiers_inside(batch, xshare_ep_set(batch))
