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

import torch
from torch import Tensor

from xshare.selection.api import (
    applies_on_device,
    batch_settings,
    check_exact,
    check_inputs,
    finish_routing,
    prepare_batch,
)
from xshare.selection.common import Batch, active_experts, assign_replicas, preference_rank, valid_rows
from xshare.selection.config import SelectorConfig
from xshare.selection.gates import GateScores, RouterSpec, reference_route, router_scores
from xshare.selection.group_stats import (
    AllReduce,
    finish_global,
    global_policies,
    join_empty,
    local_statistics,
    prepare_global,
    with_group_statistics,
)
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
    layer          the layer's router: a :class:`LayerRouting` (plain softmax / sigmoid top-k), or a
                   :class:`~xshare.selection.gates.RouterSpec` (correction bias, expert groups, routed
                   scaling, shared slot, recognised custom functions: see :func:`decide`).
    layer_id       the MoE layer's index (bookkeeping only).
    engine_ids     int [T, k]: the engine's own picks, whose order breaks exact ties (or None).
    num_tokens     rows >= num_tokens are padding (an int or a 0-d device tensor; None = all valid).
    groups         int [T]: the request of each row (passed to policies that use request groups).
    placement      :class:`Placement` of the layer's experts: required by GPU-aware policies; with
                   replicas, every policy's routing also gets physical slots.
    knobs          :class:`SelectorKnobs` (device tensors read instead of the config's numbers).
    all_reduce     DeepEP global mode: sums a float32 [2E] tensor over the EP group (or None).
    exact          bool [T]: rows that keep the engine's own routing exactly (per-request exact
                   routing; their experts are forced into the policy's set), or None.
    engine_outputs (ids, weights) [T, W]: the engine's whole outputs (routed columns first, then its
                   shared-expert slots), for a backend that writes a router-spec call's replacement in
                   their layout (``Decision.outputs``), or None.
    """

    router_logits: Tensor
    top_k: int
    layer: LayerRouting | RouterSpec = LayerRouting()
    layer_id: int = 0
    engine_ids: Tensor | None = None
    num_tokens: int | Tensor | None = None
    groups: Tensor | None = None
    placement: Placement | None = None
    knobs: SelectorKnobs | None = None
    all_reduce: AllReduce | None = None
    exact: Tensor | None = None
    engine_outputs: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` returns: the routing, and the CPU kernel's by-products when it routed."""

    routing: Routing
    config: SelectorConfig  # the config the layer was routed with (the layer's scoring applied)
    cpu: object | None = None  # xshare.selection.kernels.cpu.CpuRouting when the C fast path routed
    # Router specs only: bool [T], the rows whose routing the policy changed (every other row keeps
    # the engine's own routing verbatim), and int64 0-d, the restricted rows that could not be filled
    # inside their groups from the set and kept the engine's routing (the fallback, counted).
    replaced: Tensor | None = None
    short_rows: Tensor | None = None
    # The engine's outputs (LayerCall.engine_outputs' layout) with the replaced rows' routed columns
    # rewritten, when the backend wrote them itself; else the caller merges routing and replaced.
    outputs: tuple[Tensor, Tensor] | None = None
    # What routed the call ('triton', 'c' or 'torch'), and why torch where the config's backend asked
    # for another (:func:`choose_backend`; None when the wanted backend routed it).
    backend: str = "torch"
    reason: str | None = None


def plain_layer(spec: RouterSpec) -> LayerRouting | None:
    """The :class:`LayerRouting` of a spec the plain path routes (softmax / sigmoid top-k, no bias,
    no groups, no custom function, no scaling inside the weights), else None."""
    if spec.gate != "plain" or spec.correction_bias is not None or spec.scoring not in ("softmax", "sigmoid"):
        return None
    if spec.scaling_in_weights:
        return None
    return LayerRouting(spec.scoring, spec.renormalize)


_LAYER_CONFIGS: dict[tuple[int, LayerRouting], tuple[SelectorConfig, SelectorConfig]] = {}


def layer_config(config: SelectorConfig, layer: LayerRouting | RouterSpec) -> SelectorConfig:
    """``config`` with the layer's own scoring and renormalisation (cached per config and layer). For
    a :class:`RouterSpec` the config's scoring only says how figures read the logits (softmax for a
    softmax gate, else sigmoid); the spec itself defines the gate."""
    if isinstance(layer, RouterSpec):
        layer = plain_layer(layer) or LayerRouting("softmax" if layer.scoring == "softmax" else "sigmoid",
                                                   layer.renormalize)
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

    if call.all_reduce is not None or call.exact is not None:
        return False
    return cpu_kernel_supports(config, call.router_logits, _groups_for(get_policy(config.policy), call))


def _groups_for(policy: Policy, call: LayerCall) -> Tensor | None:
    return call.groups if policy.uses_groups() else None


def prepare(call: LayerCall, config: SelectorConfig) -> Batch:
    """The :class:`Batch` the policies see for ``call`` (engine tie order, no host sync)."""
    policy = get_policy(config.policy)
    return prepare_batch(call.router_logits, call.top_k, config, groups=_groups_for(policy, call),
                         placement=call.placement, num_tokens=call.num_tokens,
                         knobs=call.knobs, prefer=call.engine_ids, validate=False, exact=call.exact)


def finish(batch: Batch, config: SelectorConfig, *, num_tokens: int | Tensor | None = None,
           knobs: SelectorKnobs | None = None, decided: bool = False) -> Routing:
    """The policy's routing of ``batch`` (:func:`xshare.selection.api.finish_routing`)."""
    if config is not batch.config:
        batch = dataclasses.replace(batch, config=config)
    return finish_routing(batch, num_tokens=num_tokens, knobs=knobs, decided=decided)


BACKENDS = ("auto", "triton", "c", "torch")


def _wanted(backend: str, device_type: str) -> tuple[str, str | None]:
    """(the backend ``backend`` asks for on a ``device_type`` device, None), or ('torch', why) where it
    cannot be had there: 'auto' is the fused kernels on CUDA and the C kernel on the CPU."""
    if backend == "auto":
        backend = {"cuda": "triton", "cpu": "c"}.get(device_type, "torch")
        if backend == "torch":
            return "torch", f"device_{device_type}"
    if backend == "c" and device_type != "cpu":
        return "torch", "c_needs_cpu_tensors"
    return backend, None


def choose_backend(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False) -> tuple[str, str | None]:
    """(backend, reason): what routes ``call`` under ``config.backend``, and why the torch reference
    does where another backend was wanted (None otherwise). The one place a backend is picked.

    'auto' wants the fused Triton kernel for CUDA tensors and the C kernel for CPU tensors; 'triton'
    and 'c' force one (Triton on CPU tensors runs interpreted: tests). A call the wanted backend does
    not implement goes to the torch reference, with the reason (:func:`xshare.selection.kernels.
    fused_router.kernel_problem` for Triton; for C the call is tried and the reason is 'c_unsupported'
    when the kernel declines it). ``cpu_kernel``: the caller's word that the C kernel is built and host
    work is allowed. Host values only: never reads a tensor.
    """
    logits = call.router_logits
    want, reason = _wanted(config.backend, logits.device.type)
    if want == "torch":
        return "torch", reason
    if want == "c":
        return ("c", None) if cpu_kernel else ("torch", "c_unavailable")
    from xshare.selection.kernels.fused_router import kernel_problem

    layer = (plain_layer(call.layer) or call.layer) if isinstance(call.layer, RouterSpec) else call.layer
    policy = get_policy(config.policy)
    problem = kernel_problem(logits, call.top_k, layer, config, engine_ids=call.engine_ids, placement=call.placement,
                             global_mode=call.all_reduce is not None,
                             groups=call.groups if policy.uses_groups() else None)
    return ("triton", None) if problem is None else ("torch", problem)


def planned_backend(config: SelectorConfig, device_type: str, *, cpu_kernel: bool = True) -> str:
    """The backend calls of a layer are expected to take under ``config`` on a ``device_type`` device
    ('triton', 'c' or 'torch', with the reason in parentheses where torch routes although another
    was wanted): what the start-up report says. A call may still go to the reference for a reason of
    its own (:func:`choose_backend`: a layer shape or dtype the kernel refuses), counted per layer."""
    want, reason = _wanted(config.backend, device_type)
    if want == "triton" and "triton" not in get_policy(config.policy).kernels:
        want, reason = "torch", f"policy_{config.policy}"
    elif want == "c" and not cpu_kernel:
        want, reason = "torch", "c_unavailable"
    return want if reason is None else f"{want} ({reason})"


def decide(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool = False,
           checkpoint: Callable[[], None] | None = None) -> Decision:
    """The routing of one MoE layer call under ``config`` (the layer's scoring is applied here), by the
    backend :func:`choose_backend` picks (``Decision.backend``, ``Decision.reason``).

    cpu_kernel   the C fast path may route the call when it implements it (:func:`uses_cpu_kernel`);
                 the caller says whether the kernel is built and whether host work is allowed (not
                 under CUDA-graph capture).
    checkpoint   called once at the point where a failure leaves nothing half done (after DeepEP
                 global mode's all-reduce, before any routing): fault injection for tests.

    A layer described by a :class:`~xshare.selection.gates.RouterSpec` (biased and grouped routers:
    DeepSeek-V3, GLM-4.5, Kimi-K2, DeepSeek-V2, Llama-4, sqrtsoftplus) is routed by
    :func:`decide_router`.

    Raises ValueError for a config or call the core cannot route; the caller falls back.
    """
    backend, reason = choose_backend(call, config, cpu_kernel=cpu_kernel)
    if backend == "triton":
        if checkpoint is not None:
            checkpoint()
        return decide_fused(call, config)
    out = _decide(call, config, cpu_kernel=backend == "c", checkpoint=checkpoint)
    if out.cpu is not None:
        return dataclasses.replace(out, backend="c")
    if backend == "c":  # the C kernel declined the call
        reason = "c_unsupported"
    return out if reason is None else dataclasses.replace(out, reason=reason)


def decide_fused(call: LayerCall, config: SelectorConfig) -> Decision:
    """:func:`decide` through the fused Triton kernels (:mod:`xshare.selection.kernels.fused_router`),
    for a call :func:`choose_backend` gave them: the same contract as the torch reference (plain
    layers as :func:`xshare.selection.select`, router specs as :func:`decide_router`)."""
    from xshare.selection.kernels.fused_router import fused_route

    layer = call.layer
    if isinstance(layer, RouterSpec):
        layer = plain_layer(layer) or layer
    config = layer_config(config, layer)
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    policy = get_policy(config.policy)
    if isinstance(layer, RouterSpec):
        layer.check(num_experts, call.top_k)
    placement = check_inputs(logits, call.top_k, config, placement=call.placement, num_tokens=call.num_tokens,
                             knobs=call.knobs, validate=False)
    exact = check_exact(call.exact, num_rows, logits.device)
    res = fused_route(logits, call.top_k, layer, config, engine_ids=call.engine_ids, num_tokens=call.num_tokens,
                      knobs=call.knobs, placement=placement, exact=exact, groups=_groups_for(policy, call))
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


def _decide(call: LayerCall, config: SelectorConfig, *, cpu_kernel: bool,
            checkpoint: Callable[[], None] | None) -> Decision:
    if isinstance(call.layer, RouterSpec):
        plain = plain_layer(call.layer)
        if plain is None:
            return decide_router(call, config, checkpoint=checkpoint, cpu_kernel=cpu_kernel)
        call = dataclasses.replace(call, layer=plain)
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


def decide_router(call: LayerCall, config: SelectorConfig, *,
                  checkpoint: Callable[[], None] | None = None, cpu_kernel: bool = False) -> Decision:
    """The routing of a layer whose router is a :class:`~xshare.selection.gates.RouterSpec`.

    The batch the policy sees (docs/selection.md, "Router families"): gate scores = the model's
    affinities (the unbiased scores its weights come from), over the experts each token can reach
    under its group limit (``reachable``); each token's own order = the router's choice score (the
    biased score, then the engine's own picks for ties), so the warm-up keeps each token's top-k0 as
    the model routes it. The policy's set (its top tiers) is then handed to the router as the experts
    that exist (:func:`~xshare.selection.gates.reference_route`): the bias still chooses, at most
    ``topk_group`` groups per token, weights renormalised and scaled as the engine does. Rows whose
    every expert is allowed (the policy kept them all, padding, or the policy does not apply) keep
    the engine's routing verbatim (``Decision.replaced`` False); a row that cannot be filled inside
    its groups from the set keeps it too and is counted (``Decision.short_rows``).

    In DeepEP global mode (``call.all_reduce``) the policy's set comes from the group's statistics
    (:mod:`xshare.selection.group_stats`: the affinity column sums over reachable experts and the
    warm-up counts, one all-reduce of [2E] floats), as for plain layers.

    Returns routing over the routed columns only (ids int32 [T, top_k], the shared slot excluded).
    """
    if call.all_reduce is None:
        return _decide_router(call, config, checkpoint, cpu_kernel)
    joined: list[bool] = []

    def all_reduce(local: Tensor) -> Tensor:
        joined.append(True)
        return call.all_reduce(local)

    try:
        return _decide_router(dataclasses.replace(call, all_reduce=all_reduce), config, checkpoint)
    except Exception:
        if not joined:  # every rank joins the all-reduce, even if its own part failed: else the group hangs
            join_empty(call.router_logits.shape[1], call.all_reduce, call.router_logits.device)
        raise


def router_batch(call: LayerCall, config: SelectorConfig, scores: GateScores | None = None) -> Batch:
    """The :class:`Batch` the policy sees for a router-spec call (:func:`decide_router`): scores = the
    affinities over each token's reachable experts (0 elsewhere), usable = reachable (and a finite
    choice score), each token's order = its choice score, then the engine's picks; ``config`` with
    the layer's scoring applied (``batch.config``). Raises ValueError for a spec that does not fit."""
    spec = call.layer
    if not isinstance(spec, RouterSpec):
        raise ValueError(f"router_batch needs a RouterSpec layer, got {type(spec).__name__}")
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    device = logits.device
    spec.check(num_experts, call.top_k)
    config = layer_config(config, spec)
    policy = get_policy(config.policy)
    placement = check_inputs(logits, call.top_k, config, groups=_groups_for(policy, call), placement=call.placement,
                             num_tokens=call.num_tokens, knobs=call.knobs, validate=False)
    gs = scores if scores is not None else router_scores(logits, spec, exact=device.type == "cpu")
    usable = gs.reachable & torch.isfinite(gs.choice)
    valid = valid_rows(num_rows, call.num_tokens, device)
    choice = torch.where(usable, gs.choice, torch.full_like(gs.choice, float("-inf")))
    batch = Batch(logits=choice, scores=torch.where(usable, gs.affinity, torch.zeros_like(gs.affinity)),
                  usable=usable, valid=valid, top_k=call.top_k, config=config,
                  groups=None if _groups_for(policy, call) is None else call.groups.long(), placement=placement,
                  exact=check_exact(call.exact, num_rows, device), **batch_settings(config, call.knobs, num_experts,
                                                                                    call.top_k))
    batch._rank = preference_rank(choice, usable, call.engine_ids, floor=float("-inf"))
    return batch


def _decide_router(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None,
                   cpu_kernel: bool = False) -> Decision:
    spec = call.layer
    assert isinstance(spec, RouterSpec)
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    device = logits.device
    exact = device.type == "cpu"
    if cpu_kernel:  # the C fast paths (xshare.selection.kernels.cpu_router): the same decision
        from xshare.selection.kernels.cpu_router import cpu_router_served, served_supports

        layer_cfg = layer_config(config, spec)
        if served_supports(call, layer_cfg):  # the gate's rest, the decision and the outputs in one C call
            if checkpoint is not None:
                checkpoint()
            res = cpu_router_served(call, layer_cfg)
            return Decision(res.routing, layer_cfg, cpu=res, replaced=res.replaced, short_rows=res.short_rows,
                            outputs=res.outputs)
    gs = router_scores(logits, spec, exact=exact)  # the gate once: the batch and the routing share it
    if cpu_kernel:
        from xshare.selection.kernels.cpu_router import cpu_router_route, cpu_router_supports

        if cpu_router_supports(call, layer_cfg, gs):
            if checkpoint is not None:
                checkpoint()
            res = cpu_router_route(call, layer_cfg, gs)
            return Decision(res.routing, layer_cfg, cpu=res, replaced=res.replaced, short_rows=res.short_rows)
    batch = router_batch(call, config, gs)
    config = batch.config
    policy = get_policy(config.policy)
    valid = batch.valid
    usable = batch.usable
    if call.all_reduce is not None:  # DeepEP global mode: the set from the group's statistics
        if not policy.global_stats:
            raise ValueError(f"global mode supports policies {', '.join(global_policies())}; "
                             f"got {config.policy!r}")
        batch = with_group_statistics(batch, call.all_reduce(local_statistics(batch)))
    if checkpoint is not None:
        checkpoint()
    if call.all_reduce is not None:  # the caller decided applicability from group-wide numbers
        apply = torch.ones((), dtype=torch.bool, device=device)
    else:
        apply = applies_on_device(config, call.knobs, valid.sum())
    everything = torch.ones(num_rows, num_experts, dtype=torch.bool, device=device)
    if policy.vanilla:
        allowed = everything
    else:
        allowed = policy.tiers(batch) >= 2  # the policy's sets (tier 1: a token's own fallback; 0: unusable)
    applies = apply & valid
    if batch.exact is not None:  # exact rows keep the engine's routing verbatim
        applies = applies & ~batch.exact
    # Only rows the set cuts (it drops an expert the row could use) are routed again; a row the set
    # leaves whole keeps the engine's routing verbatim, its column order included.
    applies = applies & (usable & ~allowed).any(dim=1)
    allowed = torch.where(applies.unsqueeze(1), allowed, everything)
    # A token with no reachable expert in the set keeps the engine's routing (counted with the short rows).
    empty = applies & ~(allowed & usable).any(dim=1)
    allowed = allowed | empty.unsqueeze(1)
    out = reference_route(logits, call.top_k, spec, allowed=allowed, exact=exact, scores=gs)
    restricted = ~allowed.all(dim=1)
    replaced = restricted & ~out.short
    ids = out.topk_ids[:, :call.top_k]
    weights = out.topk_weights[:, :call.top_k]
    if call.engine_ids is not None:  # unreplaced rows: the engine's own ids (its kernel, its order)
        ids = torch.where(replaced.unsqueeze(1), ids, call.engine_ids[:, :call.top_k].to(ids.dtype))
    active = active_experts(ids, valid, num_experts)
    cap_bound = None if batch.cap_bound is None else batch.cap_bound & apply  # noted by a mass-target set
    routing = Routing(topk_ids=ids.to(torch.int32), topk_weights=weights, active=active, physical_ids=None,
                      cap_bound=cap_bound)
    return Decision(routing, config, replaced=replaced, short_rows=((out.short | empty) & valid).sum())
