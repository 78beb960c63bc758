"""Argument checks of one layer call (ValueError naming the argument): every backend runs them
before it routes. Shapes, types and devices are always checked; values that need a host sync (NaN /
+inf logits) only when the call asks (``LayerCall.validate``)."""

from __future__ import annotations

import torch
from torch import Tensor

from xshare.selection.call import LayerCall
from xshare.selection.config import SelectorConfig
from xshare.selection.registry import validate as validate_config
from xshare.selection.types import Placement, as_placement, check_router_logits


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


def check_inputs(call: LayerCall, config: SelectorConfig) -> Placement | None:
    """Every check of a layer call's arguments (ValueError naming the argument): the logits, top_k,
    ``config``, and the call's groups, num_tokens, knobs and placement; returns the placement
    normalised to a :class:`Placement` on the logits' device. Value checks that need a host sync
    (NaN / +inf logits) run only with ``call.validate``."""
    router_logits, top_k, num_tokens, knobs = call.router_logits, call.top_k, call.num_tokens, call.knobs
    _check_args(router_logits, top_k, config, call.groups, num_tokens)
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
    placement = as_placement(call.placement, num_experts)
    if placement is not None and placement.slot_gpu.device != device:
        placement = placement.to(device)
    if validate_config(config).needs_placement and placement is None:
        raise ValueError(f"placement is required by policy {config.policy!r}")
    if call.validate and num_rows:
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
