"""``select``: the stable entry point of the selection core."""

from __future__ import annotations

import torch
from torch import Tensor

from xshare.selection.common import (
    Batch,
    active_experts,
    assign_replicas,
    gate_scores,
    preference_rank,
    route,
    valid_rows,
)
from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import get_policy
from xshare.selection.registry import validate as validate_config
from xshare.selection.types import Placement, Routing, as_placement, check_router_logits


def _check_args(
    router_logits: Tensor, top_k: int, config: SelectorConfig, groups: Tensor | None, num_tokens: object
) -> None:
    check_router_logits(router_logits)
    num_experts = router_logits.shape[1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k = {top_k} exceeds the number of experts E = {num_experts}")
    if not isinstance(config, SelectorConfig):
        raise ValueError(f"config must be a SelectorConfig, got {type(config).__name__}")
    if config.warmup_k > top_k:
        raise ValueError(f"warmup_k = {config.warmup_k} exceeds top_k = {top_k}")
    if groups is not None:
        if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError("groups must be an integer tensor [T]")
        if groups.shape != (router_logits.shape[0],):
            raise ValueError(f"groups must have shape [T] = [{router_logits.shape[0]}], got {tuple(groups.shape)}")
        if groups.device != router_logits.device:
            raise ValueError(f"groups is on {groups.device}, router_logits on {router_logits.device}")
    if num_tokens is not None and not isinstance(num_tokens, (int, Tensor)):
        raise ValueError(f"num_tokens must be an int or a 0-d tensor, got {type(num_tokens).__name__}")


def check_inputs(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    validate: bool = True,
) -> Placement | None:
    """Every check of :func:`select`'s arguments (ValueError naming the argument); returns the
    placement normalised to a :class:`Placement` on the logits' device. Value checks that need a
    host sync (NaN / +inf logits) run only with ``validate``."""
    _check_args(router_logits, top_k, config, groups, num_tokens)
    num_rows, num_experts = router_logits.shape
    device = router_logits.device
    if isinstance(num_tokens, Tensor) and (num_tokens.numel() != 1 or num_tokens.dtype.is_floating_point
                                           or num_tokens.dtype == torch.bool):
        raise ValueError("num_tokens must be an int or a 0-d integer tensor")
    if knobs is not None:
        if knobs.num_experts != num_experts or knobs.top_k != top_k:
            raise ValueError(f"knobs were made for E = {knobs.num_experts}, top_k = {knobs.top_k}; "
                             f"got E = {num_experts}, top_k = {top_k}")
        if knobs.budget.device != device:
            raise ValueError(f"knobs are on {knobs.budget.device}, router_logits on {device}")
    # A Placement passes through; a tensor is converted here (host work: build it once for serving).
    placement = as_placement(placement, num_experts)
    if placement is not None and placement.slot_gpu.device != device:
        placement = placement.to(device)
    if validate_config(config).needs_placement and placement is None:
        raise ValueError(f"placement is required by policy {config.policy!r}")
    if validate and num_rows:
        if bool(torch.isnan(router_logits).any()):
            raise ValueError("router_logits contains NaN")
        if bool(torch.isposinf(router_logits).any()):
            raise ValueError("router_logits contains +inf")
    return placement


def check_exact(exact: Tensor | None, num_rows: int, device: torch.device) -> Tensor | None:
    """``exact`` (bool [T] on the logits' device: rows that keep their own routing), checked (shape,
    type, device: no value read)."""
    if exact is None:
        return None
    if not isinstance(exact, Tensor) or exact.dtype != torch.bool or exact.shape != (num_rows,):
        raise ValueError(f"exact must be a bool tensor [T] with T = {num_rows}")
    if exact.device != device:
        raise ValueError(f"exact is on {exact.device}, router_logits on {device}")
    return exact


def batch_settings(config: SelectorConfig, knobs: SelectorKnobs | None, num_experts: int,
                   top_k: int) -> dict[str, int | Tensor]:
    """The numeric settings a :class:`Batch` holds: host values resolved against E from ``config``,
    or the device tensors of ``knobs`` (CUDA-graph safe)."""
    if knobs is None:
        return {"budget": config.budget_for(num_experts), "warmup_k": config.warmup_k,
                "target_mass": 0.0 if config.target_mass is None else float(config.target_mass),
                "group_budget": config.group_budget_for(num_experts, top_k),
                "gpu_cap": 0 if config.gpu_cap is None else config.gpu_cap}
    return {k: getattr(knobs, k) for k in ("budget", "target_mass", "warmup_k", "group_budget", "gpu_cap")}


def applies_on_device(config: SelectorConfig, knobs: SelectorKnobs | None, num_valid: Tensor) -> Tensor:
    """bool 0-d: the policy applies to a batch of ``num_valid`` rows (a device tensor): the batch-size
    range and, with ``knobs``, the on/off switch, all read on the device (no host sync)."""
    if knobs is not None:
        return knobs.enabled & (num_valid >= knobs.min_tokens) & (num_valid <= knobs.max_tokens)
    apply = num_valid >= config.min_tokens
    if config.max_tokens is not None:
        apply = apply & (num_valid <= config.max_tokens)
    return apply


def prepare_batch(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    prefer: Tensor | None = None,
    validate: bool = True,
    exact: Tensor | None = None,
) -> Batch:
    """Validate the arguments of :func:`select` and build the :class:`Batch` the policies see."""
    placement = check_inputs(router_logits, top_k, config, groups=groups, placement=placement,
                             num_tokens=num_tokens, knobs=knobs, validate=validate)
    num_rows, num_experts = router_logits.shape
    device = router_logits.device
    logits = router_logits.float()
    usable = torch.isfinite(logits)
    valid = valid_rows(num_rows, num_tokens, device)
    batch = Batch(
        logits=torch.where(usable, logits, torch.full_like(logits, float("-inf"))),
        scores=gate_scores(logits, usable, config.scoring),
        usable=usable,
        valid=valid,
        top_k=top_k,
        config=config,
        groups=None if groups is None else groups.long(),
        placement=placement,
        exact=check_exact(exact, num_rows, device),
        **batch_settings(config, knobs, num_experts, top_k),
    )
    if prefer is not None:
        if not isinstance(prefer, Tensor) or prefer.ndim != 2 or prefer.shape[0] != num_rows:
            raise ValueError(f"prefer must be an int tensor [T, k] with T = {num_rows}")
        batch._rank = preference_rank(batch.scores, batch.usable, prefer)
    return batch


def select(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    prefer: Tensor | None = None,
    validate: bool = True,
    exact: Tensor | None = None,
) -> Routing:
    """Select the experts of one MoE layer for one forward batch.

    router_logits  float [T, E]; ``-inf`` marks an expert a token cannot use.
    top_k          experts per token (each token keeps exactly top_k distinct experts whenever at
                   least top_k are usable).
    config         a :class:`SelectorConfig`.
    groups         int [T]: the request of each token (speculative verify batches), or None.
    placement      int [E] (GPU of each expert), an int [E, R] replica table of GPUs (-1 padded),
                   or a :class:`Placement`; required by GPU-aware policies.
    num_tokens     rows >= num_tokens are padding (CUDA graphs): they do not count in the batch's
                   statistics and are routed like 'topk'. An int, or a 0-d device tensor.
    knobs          :class:`SelectorKnobs` (device tensors, updated in place): when given, the
                   numeric settings and the on/off switch are read from them instead of ``config``
                   (``config`` still names the policy and the scoring), so a captured CUDA graph
                   follows runtime changes. Implies the device-side batch-size gate.
    prefer         int [T, k] (-1 = none): among experts with exactly equal scores, these come
                   first (in this order) instead of the lower index; the serving adapter passes the
                   engine's own top-k so ties resolve as the engine resolved them.
    validate       check values too (NaN/+inf logits, placement ids); this synchronises with the
                   host, so the serving hot path passes False (shapes and types are always checked,
                   and non-finite logits are then treated as unusable).
    exact          bool [T] or None: rows routed exactly as vanilla top-k (with ``prefer``, the
                   engine's own ids, order and weights); their experts join the warm-up W, so the
                   sets built on W (xshare, xshare_ep, oea) contain them within the budget.

    Raises ValueError naming the bad argument.
    """
    batch = prepare_batch(router_logits, top_k, config, groups=groups, placement=placement,
                          num_tokens=num_tokens, knobs=knobs, prefer=prefer, validate=validate, exact=exact)
    return finish_routing(batch, num_tokens=num_tokens, knobs=knobs)


def finish_routing(
    batch: Batch,
    *,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    decided: bool = False,
) -> Routing:
    """The second half of :func:`select`: apply the policy (or vanilla, per the batch-size gate and
    the on/off knob), route, and assign replicas.

    ``decided``: the caller already decided that the policy applies (e.g. from a group-wide batch
    size); padded rows still route like 'topk'.
    """
    config = batch.config
    policy = get_policy(config.policy)
    vanilla = get_policy("topk")
    valid = batch.valid
    batch.cap_bound = None  # noted by the policy's set, when it has a mass target
    apply = None
    if decided:
        tiers = torch.where(valid.unsqueeze(1), policy.tiers(batch), vanilla.tiers(batch))
        strategy = policy.replica_strategy
    elif num_tokens is None and knobs is None:
        # The batch size is a static shape and the settings are host values: decide on the host.
        chosen = policy if config.applies_to(batch.num_tokens) else vanilla
        tiers = chosen.tiers(batch)
        strategy = chosen.replica_strategy
    else:
        # Padded batch (CUDA graphs) or device knobs: decide on the device, no host sync.
        apply = applies_on_device(config, knobs, valid.sum())
        tiers = torch.where(apply & valid.unsqueeze(1), policy.tiers(batch), vanilla.tiers(batch))
        strategy = policy.replica_strategy
    cap_bound = batch.cap_bound
    if cap_bound is not None and apply is not None:  # counts only where the policy applied
        cap_bound = cap_bound & apply
    if batch.exact is not None:  # per-request exact routing: those rows keep their own top_k
        tiers = torch.where(batch.exact.unsqueeze(1), vanilla.tiers(batch), tiers)
    ids, weights = route(batch, tiers)
    active = active_experts(ids, valid, batch.num_experts)
    physical = None
    if batch.placement is not None and batch.placement.has_replicas:
        physical = assign_replicas(ids, active, batch.placement, strategy)
    return Routing(topk_ids=ids, topk_weights=weights, active=active, physical_ids=physical, cap_bound=cap_bound)
