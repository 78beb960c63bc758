"""The torch reference backend for router-spec layers (biased and grouped gates: DeepSeek-V3, GLM-4.5,
Kimi-K2, DeepSeek-V2, Llama-4, sqrtsoftplus): every policy, every device.

The batch the policy sees (docs/selection.md, "Router families"): gate scores = the model's
affinities (the unbiased scores its weights come from), over the experts each token can reach under
its group limit (``reachable``); each token's own order = the router's choice score (the biased
score, then the engine's own picks for ties), so the warm-up keeps each token's top-k0 as the model
routes it. The policy's set (its top tiers) is then handed to the router as the experts that exist
(:func:`~xshare.selection.routers.gate.reference_route`): the bias still chooses, at most
``topk_group`` groups per token, weights renormalised and scaled as the engine does. Rows whose
every expert is allowed (the policy kept them all, padding, or the policy does not apply) keep the
engine's routing verbatim (``Decision.replaced`` False); a row that cannot be filled inside its
groups from the set keeps it too and is counted (``Decision.short_rows``).

In DeepEP global mode (``call.all_reduce``) the policy's set comes from the group's statistics
(:mod:`xshare.selection.backends.global_mode`: the affinity column sums over reachable experts and
the warm-up counts, one all-reduce of [2E] floats), as for plain layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from xshare.selection.backends.global_mode import global_policies, join_empty, local_statistics, with_group_statistics
from xshare.selection.backends.reference import applies_on_device, batch_settings
from xshare.selection.call import Decision, LayerCall, layer_config
from xshare.selection.checks import check_exact, check_inputs
from xshare.selection.common import Batch, active_experts, preference_rank, valid_rows
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import get_policy
from xshare.selection.routers.gate import GateScores, reference_route, router_scores
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import Routing


def router_batch(call: LayerCall, config: SelectorConfig, scores: GateScores | None = None) -> Batch:
    """The :class:`Batch` the policy sees for a router-spec call: scores = the affinities over each
    token's reachable experts (0 elsewhere), usable = reachable (and a finite choice score), each
    token's order = its choice score, then the engine's picks; ``config`` with the layer's scoring
    applied (``batch.config``). ``scores``: :func:`router_scores` of the call, when already computed.
    Raises ValueError for a spec that does not fit."""
    spec = call.layer
    if not isinstance(spec, RouterSpec):
        raise ValueError(f"router_batch needs a RouterSpec layer, got {type(spec).__name__}")
    logits = call.router_logits
    num_rows, num_experts = logits.shape
    device = logits.device
    spec.check(num_experts, call.top_k)
    config = layer_config(config, spec)
    groups = call.groups_for(get_policy(config.policy))
    placement = check_inputs(call, config)
    gs = scores if scores is not None else router_scores(logits, spec, exact=device.type == "cpu")
    usable = gs.reachable & torch.isfinite(gs.choice)
    valid = valid_rows(num_rows, call.num_tokens, device)
    choice = torch.where(usable, gs.choice, torch.full_like(gs.choice, float("-inf")))
    batch = Batch(logits=choice, scores=torch.where(usable, gs.affinity, torch.zeros_like(gs.affinity)),
                  usable=usable, valid=valid, top_k=call.top_k, config=config,
                  groups=None if groups is None else groups.long(), placement=placement,
                  exact=check_exact(call.exact, num_rows, device),
                  **batch_settings(config, call.knobs, num_experts, call.top_k))
    batch._rank = preference_rank(choice, usable, call.engine_ids, floor=float("-inf"))
    return batch


def decide_router(call: LayerCall, config: SelectorConfig, *, checkpoint: Callable[[], None] | None = None,
                  scores: GateScores | None = None) -> Decision:
    """The routing of a layer whose router is a :class:`RouterSpec` (module doc), by the torch
    reference. ``scores``: :func:`router_scores` of the call, when the caller already computed it.

    Returns routing over the routed columns only (ids int32 [T, top_k], the shared slot excluded).
    """
    if call.all_reduce is None:
        return _decide(call, config, checkpoint, scores)
    joined: list[bool] = []

    def all_reduce(local: Tensor) -> Tensor:
        joined.append(True)
        return call.all_reduce(local)

    try:
        return _decide(dataclasses.replace(call, all_reduce=all_reduce), config, checkpoint, scores)
    except Exception:
        if not joined:  # every rank joins the all-reduce, even if its own part failed: else the group hangs
            join_empty(call.router_logits.shape[1], call.all_reduce, call.router_logits.device)
        raise


def _allowed_experts(batch: Batch, apply: Tensor) -> tuple[Tensor, Tensor]:
    """(allowed bool [T, E], empty bool [T]): the experts each row may use (the policy's set on the rows
    it cuts; every expert elsewhere), and the rows the set leaves no reachable expert (they keep the
    engine's routing and count as short)."""
    policy = get_policy(batch.config.policy)
    num_rows, num_experts = batch.logits.shape
    everything = torch.ones(num_rows, num_experts, dtype=torch.bool, device=batch.logits.device)
    if policy.vanilla:
        allowed = everything
    else:
        allowed = policy.tiers(batch) >= 2  # the policy's sets (tier 1: a token's own fallback; 0: unusable)
    applies = apply & batch.valid
    if batch.exact is not None:  # exact rows keep the engine's routing verbatim
        applies = applies & ~batch.exact
    # Only rows the set cuts (it drops an expert the row could use) are routed again; a row the set
    # leaves whole keeps the engine's routing verbatim, its column order included.
    applies = applies & (batch.usable & ~allowed).any(dim=1)
    allowed = torch.where(applies.unsqueeze(1), allowed, everything)
    empty = applies & ~(allowed & batch.usable).any(dim=1)
    return allowed | empty.unsqueeze(1), empty


def _decide(call: LayerCall, config: SelectorConfig, checkpoint: Callable[[], None] | None,
            scores: GateScores | None) -> Decision:
    spec = call.layer
    logits = call.router_logits
    exact = logits.device.type == "cpu"
    gs = scores if scores is not None else router_scores(logits, spec, exact=exact)  # the batch and routing share it
    batch = router_batch(call, config, gs)
    config = batch.config
    if call.all_reduce is not None:  # DeepEP global mode: the set from the group's statistics
        if not get_policy(config.policy).global_stats:
            raise ValueError(f"global mode supports policies {', '.join(global_policies())}; "
                             f"got {config.policy!r}")
        batch = with_group_statistics(batch, call.all_reduce(local_statistics(batch)))
    if checkpoint is not None:
        checkpoint()
    if call.all_reduce is not None:  # the caller decided applicability from group-wide numbers
        apply = torch.ones((), dtype=torch.bool, device=logits.device)
    else:
        apply = applies_on_device(config, call.knobs, batch.valid.sum())
    allowed, empty = _allowed_experts(batch, apply)
    out = reference_route(logits, call.top_k, spec, allowed=allowed, exact=exact, scores=gs)
    replaced = ~allowed.all(dim=1) & ~out.short
    ids = out.topk_ids[:, :call.top_k]
    weights = out.topk_weights[:, :call.top_k]
    if call.engine_ids is not None:  # unreplaced rows: the engine's own ids (its kernel, its order)
        ids = torch.where(replaced.unsqueeze(1), ids, call.engine_ids[:, :call.top_k].to(ids.dtype))
    active = active_experts(ids, batch.valid, logits.shape[1])
    cap_bound = None if batch.cap_bound is None else batch.cap_bound & apply  # noted by a mass-target set
    routing = Routing(topk_ids=ids.to(torch.int32), topk_weights=weights, active=active, physical_ids=None,
                      cap_bound=cap_bound)
    return Decision(routing, config, replaced=replaced, short_rows=((out.short | empty) & batch.valid).sum())
