"""The fused Triton backend's decision: :func:`decide_fused` routes one
:class:`~xshare.selection.call.LayerCall` with the two kernels of :mod:`~xshare.selection.backends.triton.launch`
and returns what the torch reference would have (the same contract: plain layers as
:func:`~xshare.selection.backends.reference.decide_plain`, router specs as
:func:`~xshare.selection.backends.reference_router.decide_router`; ids equal, weights to float32 rounding).

The kernels allocate their outputs and never synchronise with the host. Under CUDA-graph capture pass
``knobs`` (device tensors, read by the kernels at replay) and a :class:`Placement` already on the device;
without ``knobs`` they are made from ``config`` (a host-to-device copy: eager calls only). Triton is
optional: this module imports without it (:func:`triton_available`).
"""

from __future__ import annotations

from torch import Tensor

from xshare.selection.backends.triton.launch import MAX_EXPERTS, FusedLaunch, fused_route, prepare_fused, triton_module
from xshare.selection.call import Decision, LayerCall, layer_config, plain_layer
from xshare.selection.checks import check_exact, check_inputs
from xshare.selection.common import assign_replicas
from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import all_policies, get_policy
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import Placement, Routing


def triton_available() -> bool:
    """Whether Triton (and so the fused kernels) can be imported here."""
    return triton_module() is not None


def kernel_policies() -> tuple[str, ...]:
    """The policies the fused kernels implement (``'triton' in Policy.kernels``)."""
    return tuple(p.name for p in all_policies() if "triton" in p.kernels)


def kernel_supports(config: SelectorConfig, num_experts: int) -> bool:
    """Whether the fused kernels implement this policy at this layer size."""
    return config.policy in kernel_policies() and 1 <= num_experts <= MAX_EXPERTS


def prepare_select(router_logits: Tensor, top_k: int, config: SelectorConfig, *, placement: Placement | None = None,
                   num_tokens: int | Tensor | None = None, knobs: SelectorKnobs | None = None) -> FusedLaunch:
    """The bound launches of one plain-layer call (checked arguments, ``placement`` on the device): what a
    CUDA graph captures (``xshare bench gpu`` re-launches them on the CPU; the compile test builds them)."""
    return prepare_fused(router_logits, top_k, None, config, placement=placement, num_tokens=num_tokens, knobs=knobs)


def decide_fused(call: LayerCall, config: SelectorConfig) -> Decision:
    """The decision for a call :func:`~xshare.selection.decide.choose_backend` gave the fused kernels
    (``Decision.backend`` 'triton'): checks, the two launches, and the replicas of a plain layer."""
    layer = call.layer
    if isinstance(layer, RouterSpec):
        layer = plain_layer(layer) or layer
    config = layer_config(config, layer)
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    policy = get_policy(config.policy)
    if isinstance(layer, RouterSpec):
        layer.check(num_experts, call.top_k)
    placement = check_inputs(call, config)
    exact = check_exact(call.exact, num_rows, logits.device)
    res = fused_route(logits, call.top_k, layer, config, engine_ids=call.engine_ids, num_tokens=call.num_tokens,
                      knobs=call.knobs, placement=placement, exact=exact, groups=call.groups_for(policy))
    physical = None
    if res.replaced is None and placement is not None and placement.has_replicas:
        strategy = policy.replica_strategy
        if call.num_tokens is None and call.knobs is None and not config.applies_to(num_rows):
            strategy = get_policy("topk").replica_strategy  # the reference decides on the host here
        physical = assign_replicas(res.topk_ids, res.active, placement, strategy)
    cap_bound = res.cap_bound if "target_mass" in policy.knobs else None
    routing = Routing(topk_ids=res.topk_ids, topk_weights=res.topk_weights, active=res.active,
                      physical_ids=physical, cap_bound=cap_bound)
    return Decision(routing, config, replaced=res.replaced, short_rows=res.short_rows, backend="triton")
