"""The one seam between a serving engine and the selection core: a typed per-layer call, and
:func:`decide`, which makes the routing decision for it.

The SGLang adapter, the routing override used for offline accuracy (``xshare.models``) and
``xshare eval``'s replay each turn their own arguments into a :class:`LayerCall` and call
:func:`decide`; nothing else in them knows how a policy, a kernel or DeepEP's global mode works.

Tie order. An engine's own top-k (``torch.topk`` over float32 gate probabilities in SGLang) breaks
exact ties in an implementation-defined order; the core breaks them by the lower expert index.
Router logits in bf16 tie often. A token whose own top-k contains such a tie would then get a
different (equally scored) expert from the selector even when the policy keeps every expert, and
the model's output would change. With ``engine_ids`` each token's preference order is: usable
first, then gate score, then the engine's own pick (in the engine's column order), then the expert
index. Every policy reads that order (``Batch.rank``), so a token's "own top-k" is exactly the
engine's, and with a budget >= E the routing, its column order and its weights are bitwise the
engine's.

Pure torch (DeepEP global mode reaches torch.distributed only through the ``all_reduce`` callable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from xshare.selection.api import finish_routing, prepare_batch
from xshare.selection.common import Batch
from xshare.selection.config import SelectorConfig
from xshare.selection.group_stats import AllReduce, finish_global, join_empty, prepare_global
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import Policy, get_policy
from xshare.selection.types import Placement, Routing


@dataclass(frozen=True)
class LayerRouting:
    """How a layer's router turns logits into routing (from the engine's layer description).

    scoring      'softmax' | 'sigmoid': gate scores from router logits.
    renormalize  each token's kept weights are renormalised to sum to 1 (norm_topk_prob).
    """

    scoring: str = "softmax"
    renormalize: bool = True


@dataclass(frozen=True)
class LayerCall:
    """One MoE layer call of one forward batch, as the engine hands it to the core.

    router_logits  float [T, E]; -inf marks an expert a token cannot use.
    top_k          routed experts per token (shared-expert slots excluded).
    layer          the layer's :class:`LayerRouting`.
    layer_id       the MoE layer's index (bookkeeping only).
    engine_ids     int [T, k]: the engine's own picks, whose order breaks exact ties (or None).
    num_tokens     rows >= num_tokens are padding (an int or a 0-d device tensor; None = all valid).
    groups         int [T]: the request of each row (passed to policies that use request groups).
    placement      :class:`Placement` of the layer's experts: required by GPU-aware policies; with
                   replicas, every policy's routing also gets physical slots.
    knobs          :class:`SelectorKnobs` (device tensors read instead of the config's numbers).
    all_reduce     DeepEP global mode: sums a float32 [2E] tensor over the EP group (or None).
    """

    router_logits: Tensor
    top_k: int
    layer: LayerRouting = LayerRouting()
    layer_id: int = 0
    engine_ids: Tensor | None = None
    num_tokens: int | Tensor | None = None
    groups: Tensor | None = None
    placement: Placement | None = None
    knobs: SelectorKnobs | None = None
    all_reduce: AllReduce | None = None


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` returns: the routing, and the CPU kernel's by-products when it routed."""

    routing: Routing
    config: SelectorConfig  # the config the layer was routed with (the layer's scoring applied)
    cpu: object | None = None  # xshare.selection.kernels.cpu.CpuRouting when the C fast path routed


_LAYER_CONFIGS: dict[tuple[int, LayerRouting], tuple[SelectorConfig, SelectorConfig]] = {}


def layer_config(config: SelectorConfig, layer: LayerRouting) -> SelectorConfig:
    """``config`` with the layer's own scoring and renormalisation (cached per config and layer)."""
    if config.scoring == layer.scoring and config.renormalize == layer.renormalize:
        return config
    key = (id(config), layer)
    hit = _LAYER_CONFIGS.get(key)
    if hit is not None and hit[0] is config:
        return hit[1]
    if len(_LAYER_CONFIGS) > 256:
        _LAYER_CONFIGS.clear()
    out = config.replace(scoring=layer.scoring, renormalize=bool(layer.renormalize))
    _LAYER_CONFIGS[key] = (config, out)
    return out


def uses_cpu_kernel(call: LayerCall, config: SelectorConfig) -> bool:
    """Whether the C fast path implements this call (CPU tensors, a policy it routes, no groups it
    would need, no placement-driven replicas, no group-wide statistics)."""
    from xshare.selection.kernels.cpu import cpu_kernel_supports

    if call.all_reduce is not None:
        return False
    return cpu_kernel_supports(config, call.router_logits, _groups_for(get_policy(config.policy), call))


def _groups_for(policy: Policy, call: LayerCall) -> Tensor | None:
    return call.groups if policy.uses_groups() else None


def prepare(call: LayerCall, config: SelectorConfig) -> Batch:
    """The :class:`Batch` the policies see for ``call`` (engine tie order, no host sync)."""
    policy = get_policy(config.policy)
    return prepare_batch(call.router_logits, call.top_k, config, groups=_groups_for(policy, call),
                         placement=call.placement, num_tokens=call.num_tokens,
                         knobs=call.knobs, prefer=call.engine_ids, validate=False)


def finish(batch: Batch, config: SelectorConfig, *, num_tokens: int | Tensor | None = None,
           knobs: SelectorKnobs | None = None, decided: bool = False) -> Routing:
    """The policy's routing of ``batch`` (:func:`xshare.selection.api.finish_routing`)."""
    if config is not batch.config:
        batch = dataclasses.replace(batch, config=config)
    return finish_routing(batch, num_tokens=num_tokens, knobs=knobs, decided=decided)


def decide(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False,
           checkpoint: Callable[[], None] | None = None) -> Decision:
    """The routing of one MoE layer call under ``config`` (the layer's scoring is applied here).

    cpu_kernel   let the C fast path route the call when it implements it (:func:`uses_cpu_kernel`);
                 the caller says whether the kernel is built and whether host work is allowed (not
                 under CUDA-graph capture).
    checkpoint   called once at the point where a failure leaves nothing half done (after DeepEP
                 global mode's all-reduce, before any routing): fault injection for tests.

    Raises ValueError for a config or call the core cannot route; the caller falls back.
    """
    config = layer_config(config, call.layer)
    if call.all_reduce is not None:
        try:
            batch, local = prepare_global(call.router_logits, call.top_k, config, sglang_ids=call.engine_ids,
                                          placement=call.placement, num_tokens=call.num_tokens)
        except Exception:
            # Every rank joins the all-reduce, even if its own part failed: otherwise the group hangs.
            join_empty(call.router_logits.shape[1], call.all_reduce, call.router_logits.device)
            raise
        group_stats = call.all_reduce(local)
        if checkpoint is not None:
            checkpoint()
        return Decision(finish_global(batch, group_stats, config), config)
    if cpu_kernel and uses_cpu_kernel(call, config):
        from xshare.selection.kernels.cpu import cpu_route

        if checkpoint is not None:
            checkpoint()
        res = cpu_route(call.router_logits, call.top_k, config, prefer=call.engine_ids, num_tokens=call.num_tokens)
        return Decision(res.routing, config, cpu=res)
    batch = prepare(call, config)
    if checkpoint is not None:
        checkpoint()
    return Decision(finish(batch, config, num_tokens=call.num_tokens, knobs=call.knobs), config)
