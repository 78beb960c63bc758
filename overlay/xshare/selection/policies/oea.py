"""``oea``: Opportunistic Expert Activation (arXiv 2511.02237).

Phase 1: every token keeps its top-k0 experts (k0 = ``warmup_k``); S_base = their union over the
batch. Phase 2 (piggyback): each token walks its own ranking and takes experts already in S_base,
up to top_k; no expert is added to the batch set, except that a token left with fewer than top_k
usable experts is filled from its own ranking (the project-wide top_k guarantee). No budget: the
batch set size follows from k0 (OEA's additive counterpart to XShare's budgeted fill).
"""

from torch import Tensor

from xshare.selection.common import Batch
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import Policy, register_policy, require_warmup_k


@register_policy
class OEA(Policy):
    name = "oea"
    knobs = ("warmup_k",)
    sweep_knob = "warmup_k"
    color = "tab:purple"
    summary = "union of top-k0 per token, others piggyback on it; budget unused"

    def validate_config(self, config: SelectorConfig) -> None:
        require_warmup_k(config, self.name, "OEA's k0")

    def batch_set(self, batch: Batch) -> Tensor:
        return batch.warmup()
