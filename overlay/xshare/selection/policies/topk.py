"""``topk``: vanilla routing, the baseline (identical to SGLang's torch-native fused top-k)."""

from torch import Tensor

from xshare.selection.common import Batch
from xshare.selection.registry import Policy, register_policy


@register_policy
class TopK(Policy):
    name = "topk"
    knobs = ()
    vanilla = True
    sweep_knob = None
    global_stats = True
    kernels = frozenset({"cpu", "triton"})
    color = "black"
    summary = "vanilla routing: each token's own top_k experts"

    def tiers(self, batch: Batch) -> Tensor:
        return batch.usable.long()
