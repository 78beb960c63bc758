"""Stand-ins for the SGLang objects of one MoE layer's routing call (SGLang is not installed where the GPU check
runs), and each router family's gate as plain torch ops.

:class:`TopKConfigStandIn` mirrors the fields of SGLang 0.5.23's ``TopKConfig`` (a test compares them with the real
class where SGLang is installed); :func:`topk_config` builds one per router family of
:data:`xshare.bench.gpu.context.SERVED_FAMILIES`; :class:`Llama4MoE` carries Llama-4's routing function under the
name the adapter recognises; :func:`vanilla_gate` turns router logits [T, E] into the family's routed ids and
weights. Part 5 (:mod:`xshare.bench.gpu.served`) builds its calls from these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SharedExpertsStandIn:
    """The shared-expert layout a ``TopKConfig`` carries (``shared_experts``): fused shared experts
    occupy ``num_shared_topk_slots`` columns after the routed ones (none under Waterfill expansion)."""

    fusion_disabled: bool = False
    num_fused_shared_experts: int = 0
    use_waterfill: bool = False

    @property
    def num_shared_topk_slots(self) -> int:
        return 0 if self.use_waterfill else self.num_fused_shared_experts


@dataclass
class TopKConfigStandIn:
    """The fields of SGLang 0.5.23's ``TopKConfig`` (``sglang.srt.layers.moe.topk``) under their names,
    with its defaults: what the adapter reads from a layer. ``top_k`` is the output width (routed
    experts plus shared slots)."""

    top_k: int
    use_grouped_topk: bool = False
    topk_group: int | None = None
    num_expert_group: int | None = None
    renormalize: bool = True
    shared_experts: SharedExpertsStandIn = field(default_factory=SharedExpertsStandIn)
    custom_routing_function: Callable[..., Any] | None = None
    correction_bias: Tensor | None = None
    torch_native: bool = False
    routed_scaling_factor: float | None = None
    apply_routed_scaling_factor_on_output: bool = False
    fused_shared_experts_scaling_factor: float | None = None
    output_format: Any = None
    runner_backend: Any = None
    routing_method_type: Any = None
    scoring_func: str = "softmax"
    sqrtsoftplus_log1p: bool = False
    fused_gate_packed_ids: bool = False
    allow_routed_experts_capture: bool = True
    layer_id: int | None = None

    @property
    def num_shared_topk_slots(self) -> int:
        return self.shared_experts.num_shared_topk_slots


class Llama4MoE:
    """Holds Llama-4's router function under the qualified name SGLang's model gives it
    (``Llama4MoE.custom_routing_function``), which is how the adapter recognises that router."""

    @staticmethod
    def custom_routing_function(hidden_states: Tensor, gating_output: Tensor, topk: int,
                                renormalize: bool) -> tuple[Tensor, Tensor]:
        """(weights [T, topk] in the hidden dtype, ids int32 [T, topk]): each token's top logits, each
        weighted by its own sigmoid (no renormalisation)."""
        values, ids = torch.topk(gating_output, topk, dim=-1)
        return torch.sigmoid(values.float()).to(hidden_states.dtype), ids.to(torch.int32)


def topk_config(family: dict[str, Any], device: torch.device, seed: int = 0) -> TopKConfigStandIn:
    """The ``TopKConfig`` a model of ``family`` (:data:`~xshare.bench.gpu.context.SERVED_FAMILIES`)
    builds for one MoE layer; the correction bias (float32 [E]) is drawn from ``seed`` on the device."""
    e, k = family["experts"], family["top_k"]
    shared = int(family.get("shared", 0))
    groups = family.get("groups")
    bias = None
    if family.get("bias"):
        bias = (torch.randn(e, generator=torch.Generator().manual_seed(seed)) * 0.1).to(device)
    custom = Llama4MoE.custom_routing_function if family.get("custom") == "llama4" else None
    return TopKConfigStandIn(
        top_k=k + shared, use_grouped_topk=groups is not None,
        num_expert_group=groups[0] if groups else None, topk_group=groups[1] if groups else None,
        renormalize=bool(family.get("renormalize", True)),
        shared_experts=SharedExpertsStandIn(num_fused_shared_experts=shared),
        custom_routing_function=custom, correction_bias=bias, routed_scaling_factor=family.get("scaling"),
        fused_shared_experts_scaling_factor=1.0 if shared else None,
        scoring_func=family["scoring"] if custom is None else "softmax")


def vanilla_gate(cfg: TopKConfigStandIn, logits: Tensor) -> tuple[Tensor, Tensor]:
    """The family's gate alone, as plain torch ops (no host read, no host-to-device copy: capturable).

    logits  float [T, E] router logits.
    Returns (ids int32 [T, cfg.top_k], weights float32 [T, cfg.top_k]): each token's routed experts by
    the router's choice score (bias added, outside its best ``topk_group`` groups excluded), weighted by
    the unbiased score, renormalised if the config says so, the scaling factor applied when it goes into
    the weights, then the fused shared slots (ids E, E + 1, ...; weight 1 / scaling, or 1 when the
    scaling is in the weights).
    """
    shared = cfg.num_shared_topk_slots
    k = cfg.top_k - shared
    if cfg.custom_routing_function is not None:
        weights, ids = cfg.custom_routing_function(logits, logits, k, cfg.renormalize)
        return ids.to(torch.int32), weights.float()
    x = logits.float()
    t, e = x.shape
    bias = cfg.correction_bias
    scores = torch.softmax(x, dim=-1) if cfg.scoring_func == "softmax" and bias is None else torch.sigmoid(x)
    choice = scores if bias is None else scores + bias
    if cfg.use_grouped_topk:
        g, keep = int(cfg.num_expert_group), int(cfg.topk_group)
        per_group = choice.view(t, g, e // g)
        group_score = per_group.topk(2, dim=-1).values.sum(-1) if bias is not None else per_group.amax(-1)
        kept = torch.zeros(t, g, dtype=torch.bool, device=x.device).scatter_(
            1, group_score.topk(keep, dim=-1).indices, True)
        choice = choice.masked_fill(~kept.unsqueeze(-1).expand(t, g, e // g).reshape(t, e), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    factor = cfg.routed_scaling_factor
    if factor and cfg.apply_routed_scaling_factor_on_output:
        weights = weights * factor
    ids = ids.to(torch.int32)
    if shared:
        weight = 1.0 if (cfg.apply_routed_scaling_factor_on_output or not factor) else 1.0 / factor
        weight *= cfg.fused_shared_experts_scaling_factor or 1.0
        slots = (torch.arange(shared, dtype=torch.int32, device=x.device) + e).expand(t, shared)
        ids = torch.cat([ids, slots], dim=1)
        weights = torch.cat([weights, torch.full((t, shared), weight, device=x.device)], dim=1)
    return ids, weights
