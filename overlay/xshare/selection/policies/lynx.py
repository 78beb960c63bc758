"""``lynx``: Lynx (arXiv 2411.08982), confidence-binned batch expert scores; decode only.

Per token t and each expert e in its top-K: r = z[t,e] - z[t,top1] (a log-probability ratio;
pre-sigmoid scores for sigmoid routers), bin = clamp(floor(α·r), -β, 0). Batch score of e =
Σ_t [e ∈ top-K_t] · B^bin (B = batch size), so confident votes dominate. High-confidence tokens
(their second expert a full bin width below the first: r_2 < -1/α, bin <= -2; the top-1 itself is
the only expert in bin 0) always keep their top-1 expert. The kept
set is those top-1 experts plus the best by score up to the budget m (the paper sizes it
dynamically; here the budget makes it comparable side by side). Tokens then re-pick their top_k
inside it (the remapper); weights are renormalised as the model does.

Knobs (``SelectorConfig.extra``): ``lynx_alpha`` (bins per unit of log-ratio; default
1 / ln(E / K), one bin per factor E/K of probability) and ``lynx_beta`` (max bins, default 3).
Lynx is decode-only: the serving adapter never applies any policy to prefill by default.
"""

import math

import torch
from torch import Tensor

from xshare.selection.common import Batch, top_by_score
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import Policy, register_policy


def lynx_scores(batch: Batch) -> tuple[Tensor, Tensor]:
    """(batch score [E], forced top-1 experts of high-confidence tokens [E])."""
    e, k = batch.num_experts, batch.top_k
    alpha = float(batch.config.extra.get("lynx_alpha", 1.0 / math.log(e / k) if e > k else 1.0))
    beta = float(batch.config.extra.get("lynx_beta", 3.0))
    z = batch.logits
    top1 = batch.own_topk(1)
    z1 = torch.where(top1, z, torch.zeros_like(z)).sum(-1, keepdim=True)
    ratio = torch.where(batch.usable, z - z1, torch.full_like(z, -1e9))
    bins = torch.clamp(torch.floor(ratio * alpha), min=-beta, max=0.0)
    base = batch.valid.sum().clamp_min(2).to(torch.float32)
    in_topk = batch.own_topk(k) & batch.valid.unsqueeze(1)
    score = (torch.pow(base, bins) * in_topk).sum(0)
    second = (batch.rank == 1) & batch.usable
    second_bin = torch.where(second, bins, torch.zeros_like(bins)).sum(-1)
    has_second = second.any(-1)
    confident = batch.valid & (~has_second | (second_bin <= -2))
    forced = (top1 & confident.unsqueeze(1)).any(0)
    return score, forced


@register_policy
class Lynx(Policy):
    name = "lynx"
    knobs = ("budget",)
    extra_knobs = ("lynx_alpha", "lynx_beta")
    color = "tab:red"
    summary = "confidence-binned top-K votes (B^bin), confident tokens keep top-1; decode only"

    def validate_config(self, config: SelectorConfig) -> None:
        if config.extra.get("lynx_alpha", 1.0) <= 0:
            raise ValueError("extra['lynx_alpha'] must be > 0")
        if config.extra.get("lynx_beta", 1.0) < 0:
            raise ValueError("extra['lynx_beta'] must be >= 0")

    def batch_set(self, batch: Batch) -> Tensor:
        score, forced = lynx_scores(batch)
        return top_by_score(score, forced, batch.budget, allowed=score > 0)
