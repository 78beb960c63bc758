"""The torch reference backend for plain layers (softmax / sigmoid top-k): every policy, every device.

:func:`prepare_batch` turns a layer call's tensors into the :class:`~xshare.selection.common.Batch`
the policies read (logits float32 [T, E], gate scores, valid rows [T], the numeric settings as host
values or device knobs, each token's preference order); :func:`finish_routing` applies the policy (or
vanilla top-k where it does not apply), routes every row by its tiers and assigns replicas, giving a
:class:`~xshare.selection.types.Routing` (ids int32 [T, k], weights float32 [T, k], active bool [E]).
:func:`decide_plain` is both halves for one :class:`~xshare.selection.call.LayerCall`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from xshare.selection.call import Decision, LayerCall
from xshare.selection.checks import check_exact, check_inputs
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
from xshare.selection.types import Routing


def batch_settings(config: SelectorConfig, knobs: SelectorKnobs | None, num_experts: int,
                   top_k: int) -> dict[str, int | Tensor]:
    """The numeric settings a :class:`Batch` holds: host values resolved against E from ``config``,
    or the device tensors of ``knobs`` (CUDA-graph safe)."""
    if knobs is None:
        return {"budget": config.budget_for(num_experts), "warmup_k": config.warmup_k,
                "target_mass": 0.0 if config.target_mass is None else float(config.target_mass),
                "group_budget": config.group_budget_for(num_experts, top_k),
                "anchor_k": config.anchor_k_for(top_k),
                "gpu_cap": 0 if config.gpu_cap is None else config.gpu_cap}
    return {k: getattr(knobs, k) for k in ("budget", "target_mass", "warmup_k", "group_budget", "anchor_k",
                                           "gpu_cap")}


def applies_on_device(config: SelectorConfig, knobs: SelectorKnobs | None, num_valid: Tensor) -> Tensor:
    """bool 0-d: the policy applies to a batch of ``num_valid`` rows (a device tensor): the batch-size
    range and, with ``knobs``, the on/off switch, all read on the device (no host sync)."""
    if knobs is not None:
        return knobs.enabled & (num_valid >= knobs.min_tokens) & (num_valid <= knobs.max_tokens)
    apply = num_valid >= config.min_tokens
    if config.max_tokens is not None:
        apply = apply & (num_valid <= config.max_tokens)
    return apply


def prepare_batch(call: LayerCall, config: SelectorConfig) -> Batch:
    """Check the call (:func:`~xshare.selection.checks.check_inputs`) and build the :class:`Batch`
    the policies see: float32 logits with -inf where unusable, gate scores under ``config.scoring``,
    valid rows, the settings (``call.knobs`` or the config's), the call's groups, placement and exact
    rows, and each token's preference order (``call.engine_ids`` int [T, k] breaks exact ties, see
    :mod:`xshare.selection.call`). ``call.layer`` is not read: ``config`` carries the layer's scoring."""
    placement = check_inputs(call, config)
    router_logits, top_k, groups, engine_ids = call.router_logits, call.top_k, call.groups, call.engine_ids
    num_rows, num_experts = router_logits.shape
    device = router_logits.device
    logits = router_logits.float()
    usable = torch.isfinite(logits)
    valid = valid_rows(num_rows, call.num_tokens, device)
    batch = Batch(
        logits=torch.where(usable, logits, torch.full_like(logits, float("-inf"))),
        scores=gate_scores(logits, usable, config.scoring),
        usable=usable,
        valid=valid,
        top_k=top_k,
        config=config,
        groups=None if groups is None else groups.long(),
        placement=placement,
        exact=check_exact(call.exact, num_rows, device),
        **batch_settings(config, call.knobs, num_experts, top_k),
    )
    if engine_ids is not None:
        if not isinstance(engine_ids, Tensor) or engine_ids.ndim != 2 or engine_ids.shape[0] != num_rows:
            raise ValueError(f"engine_ids must be an int tensor [T, k] with T = {num_rows}")
        batch._rank = preference_rank(batch.scores, batch.usable, engine_ids)
    return batch


def finish_routing(
    batch: Batch,
    *,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    decided: bool = False,
) -> Routing:
    """The second half of the torch reference: apply the policy (or vanilla, per the batch-size gate and
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


def decide_plain(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None = None) -> Decision:
    """The torch reference's decision for a plain layer call (``config`` with the layer's scoring
    applied): the batch in the engine's tie order, then the policy's routing (no host sync unless
    ``call.validate``)."""
    batch = prepare_batch(call, config)
    if checkpoint is not None:
        checkpoint()
    return Decision(finish_routing(batch, num_tokens=call.num_tokens, knobs=call.knobs), config)
