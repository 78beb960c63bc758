"""The routing decision of one ``_post_process_topk_ids`` call: whether the selector applies, the
core's decision through the one seam (:func:`xshare.selection.engine.decide`), and the per-call
bookkeeping (counters, the metrics window, the trace). Never raises: a failure is logged once,
counted and left to SGLang's own top-k."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from xshare.selection import get_policy
from xshare.selection.engine import Decision, decide, layer_config
from xshare.selection.gates import RouterSpec
from xshare.selection.group_stats import join_empty
from xshare.sglang.stats import cpu_call_figures
from xshare.sglang.topk_call import TopkCall, is_draft_layer, router_spec
from xshare.sglang.verify_layout import ROWS_MISMATCH, ROWS_UNKNOWN

if TYPE_CHECKING:
    from xshare.sglang.runtime import ForwardState, Runtime

log = logging.getLogger("xshare.sglang")


def route(runtime: Runtime, args: dict[str, Any], topk_config: Any) -> dict[str, Any] | None:
    """Replacement arguments for one call, or None to leave SGLang's routing unchanged."""
    stats = runtime.stats
    stats.count_call()
    s = runtime.settings
    state = runtime.current
    if not s.enabled:
        runtime.skip("disabled")
        return None
    if runtime.diverged:  # off the group's config (admin): never route differently from the peers
        runtime.skip("config_diverged")
        runtime.log_once("diverged", logging.ERROR, "xshare: rank %d is not on its group's config: SGLang's "
                         "routing until the next config change", runtime.group_rank)
        return None
    if is_draft_layer(topk_config) or (state is not None and state.is_draft):
        runtime.skip("draft_layer")
        stats.note_layer(int(args.get("layer_id") or 0), "draft_layer")
        return None
    if state is None:
        runtime.skip("no_forward_state")
        return None
    global_mode = runtime.global_mode()
    if global_mode:
        if not state.global_applies:
            runtime.skip("not_applicable_global")
            return None
    elif state.mode not in runtime.modes():
        runtime.skip(f"mode_{state.mode}")
        return None
    spec, unsupported = router_spec(topk_config)  # once per call: cached per layer
    call = None if unsupported is not None else TopkCall.read(args, topk_config)
    if spec is not None and call is not None and call.logits_match():
        try:
            spec.check(call.num_experts, call.top_k)  # host values only
        except ValueError as exc:
            unsupported = "router_config"
            runtime.log_once("router_config", logging.WARNING, "xshare: layer router %s does not fit the layer: %s",
                             spec, exc)
    if unsupported is None and (state.exact_unknown or (global_mode and state.exact is not None)):
        # a request asked for exact routing and this call cannot honour it row by row: SGLang routes it all
        unsupported = "exact_rows_unknown" if state.exact_unknown else "exact_routing_global_mode"
    if unsupported is not None:
        _leave_layer(runtime, args, unsupported, global_mode)
        return None
    if not global_mode:
        if call.num_rows == 0:
            runtime.skip("empty")
            return None
        if not call.logits_match():
            runtime.skip("no_router_logits")
            return None
        if not state.capturing and not s.selector.applies_to(call.num_rows):
            runtime.skip("batch_size")
            return None
        unmapped = _unmapped_verify_rows(runtime, state, call)
        if unmapped is not None:  # never route a verify batch with guessed request groups
            runtime.skip(unmapped)
            return None
    try:
        t0 = time.perf_counter()
        out = _route(runtime, call, state, global_mode)
        if runtime.observe and out is not None:
            stats.record_seconds(time.perf_counter() - t0)
        return out
    except Exception as exc:  # serving never fails because of the selector
        reason = type(exc).__name__
        stats.count_fallback(reason)
        runtime.log_once(f"fallback:{reason}", logging.ERROR,
                         "xshare: selector failed (%s: %s); routing this call with SGLang's top-k "
                         "(logged once per error type, counted in fallbacks)", reason, exc, exc_info=True)
        return None


def route_logits(runtime: Runtime, topk: Any, logits: torch.Tensor, top_k: int,
                 num_tokens: Any = None) -> torch.Tensor | None:
    """For runner backends that route from the logits alone (SGLang's ``triton_kernel`` runner): the
    selector's experts of one call as int16 [T, top_k], each row by descending logit, or None to keep
    the backend's own top-k. The same decision as :func:`route` (``topk`` is the layer's SGLang
    ``TopK`` module), with the layer's own top-k (of the logits) as SGLang's picks."""
    cfg = getattr(topk, "topk_config", None)
    if cfg is None or logits.ndim != 2:
        return None
    k = min(top_k, logits.shape[1])
    order = torch.topk(logits, k, dim=-1)
    weights = torch.softmax(order.values.float(), dim=-1)
    args = {"topk_ids": order.indices.to(torch.int32), "topk_weights": weights, "router_logits": logits,
            "layer_id": getattr(topk, "layer_id", 0), "num_token_non_padded": num_tokens}
    out = route(runtime, args, cfg)
    if out is None:
        return None
    ids = out["topk_ids"][:, :k].to(torch.int64)
    rank = torch.argsort(logits.gather(1, ids), dim=-1, descending=True, stable=True)
    return ids.gather(1, rank).to(torch.int16)


def _unmapped_verify_rows(runtime: Runtime, state: ForwardState, call: TopkCall) -> str | None:
    """Why the rows of a verify call cannot be handed to a policy that groups them by request, or None."""
    if state.mode != "target_verify" or not get_policy(runtime.settings.selector.policy).uses_groups():
        return None
    if state.unmapped is not None:
        return state.unmapped
    if state.capturing:  # the static layout, baked into the graph (runtime.group_ids)
        return None
    if state.groups is None:
        return ROWS_UNKNOWN
    if state.groups.shape[0] != call.num_rows:
        return ROWS_MISMATCH
    return None


def _leave_layer(runtime: Runtime, args: dict[str, Any], reason: str, global_mode: bool) -> None:
    """A layer the selector leaves to SGLang for a reason of its own: said once, counted, noted in the
    coverage; in DeepEP global mode this rank still joins the group's all-reduce."""
    runtime.log_once(f"unsupported:{reason}", logging.WARNING,
                     "xshare: layer routing uses %s; the selector leaves such layers to SGLang", reason)
    runtime.skip(f"unsupported_{reason}")
    runtime.stats.note_layer(int(args.get("layer_id") or 0), f"unsupported_{reason}")
    if global_mode:
        logits = args["router_logits"]
        join_empty(logits.shape[1], runtime.all_reduce, logits.device)


def _route(runtime: Runtime, call: TopkCall, state: ForwardState, global_mode: bool) -> dict[str, Any]:
    s = runtime.settings
    config = runtime.layer_config(s.selector, call.layer_id)  # per-layer budget / target mass
    policy = get_policy(config.policy)
    logits = call.router_logits
    device = logits.device
    num_experts = call.num_experts
    if runtime.trace is not None and not state.capturing and call.num_rows:
        spec = call.layer if isinstance(call.layer, RouterSpec) else None
        scoring = "sigmoid" if spec is not None and spec.scoring != "softmax" else \
            getattr(call.topk_config, "scoring_func", "softmax")
        runtime.trace.add_layer(call.layer_id, logits, call.top_k, scoring, router=spec)
    placement = runtime.placements.for_layer(call.layer_id, num_experts, device) if policy.needs_placement else None
    groups = None
    if policy.uses_groups() and not global_mode:
        groups = state.groups if state.groups is not None and state.groups.shape[0] == call.num_rows else \
            runtime.group_ids(call.num_rows, state.tokens_per_req, device)
    all_reduce = runtime.all_reduce if global_mode else None
    knobs = None
    if not global_mode:  # the torch path reads the numbers from device knobs (CUDA-graph safe)
        knobs = runtime.knobs_for(layer_config(config, call.layer), num_experts, call.top_k, device, call.layer_id)
    exact = _exact_rows(runtime, state, call, device) if not global_mode else None
    base = call.layer_call(groups=groups, placement=placement, knobs=knobs, all_reduce=all_reduce, exact=exact)
    cpu_ok = (not global_mode and not state.capturing and device.type == "cpu" and runtime.cpu_kernel_ready())
    decision = decide(base, config, cpu_kernel=cpu_ok, checkpoint=lambda: runtime.fault(s.fault_inject))
    _record(runtime, call, decision, placement)
    if groups is not None:
        limit = config.group_budget_for(num_experts, call.top_k) if "group_budget" in policy.knobs else None
        runtime.stats.record_requests(groups, decision.routing.topk_ids, num_experts, limit)
    runtime.stats.note_layer(call.layer_id, "selects")
    label = runtime.stats.note_backend(call.layer_id, decision.backend, decision.reason)
    if decision.reason is not None and not decision.reason.startswith("c_"):
        runtime.log_once(f"backend:{label}", logging.WARNING, "xshare: layer %d is routed by the torch reference, "
                         "not the %s kernel (%s): counted per layer in /xshare/stats 'backends'", call.layer_id,
                         "fused Triton" if device.type == "cuda" else "wanted", decision.reason)
    runtime.first_applied()
    routing = decision.routing
    if decision.replaced is not None:  # a router-spec layer: only the rows the policy changed
        runtime.stats.record_short_rows(decision.short_rows)
        return call.replace_rows(routing.topk_ids, routing.topk_weights, decision.replaced)
    new_ids = routing.topk_ids if routing.physical_ids is None else routing.physical_ids
    # The policy chose the replicas itself (xshare_ep): SGLang must not remap them again.
    out = call.replace(new_ids, routing.topk_weights, physical=routing.physical_ids is not None)
    if exact is not None and routing.physical_ids is None:  # exact rows: SGLang's own ids and weights, verbatim
        keep = exact.unsqueeze(1)
        out["topk_ids"] = torch.where(keep, call.topk_ids, out["topk_ids"])
        out["topk_weights"] = torch.where(keep, call.topk_weights, out["topk_weights"])
    return out


def _exact_rows(runtime: Runtime, state: ForwardState, call: TopkCall, device: torch.device) -> torch.Tensor | None:
    """bool [rows] of exact-routed rows for this call, or None. Under CUDA-graph capture, always the
    persistent buffer (the graph then reads each replay's flags); a mask that does not match the rows
    raises (the call falls back to SGLang's routing, exact for every row)."""
    from xshare.sglang.runtime import EXACT_BUFFER_ROWS

    if state.capturing:
        if call.num_rows > EXACT_BUFFER_ROWS:
            raise ValueError(f"exact routing: {call.num_rows} rows exceed the graph buffer ({EXACT_BUFFER_ROWS})")
        return runtime.exact_buffer(device)[:call.num_rows]
    exact = state.exact
    if exact is not None and (exact.shape[0] != call.num_rows or exact.device != device):
        raise ValueError(f"exact routing: {exact.shape[0]} flagged rows for a call of {call.num_rows} rows")
    return exact


def _record(runtime: Runtime, call: TopkCall, decision: Decision, placement: Any) -> None:
    """The bookkeeping of one applied call, added on the device into preallocated accumulators
    (:meth:`~xshare.sglang.stats.SelectorStats.record_call`: one Triton launch on CUDA, a short torch
    sequence elsewhere; no host read, CUDA-graph safe): the layer sums and, while the metrics are
    observed, the call's window row. The C kernel's calls add their host numbers into the same
    buffers. The host reads them at the flushes, after the forward (xshare.sglang.stats)."""
    stats = runtime.stats
    routing = decision.routing
    layer_id = call.layer_id
    mp = None  # the placement of the per-GPU figures, while observed
    if runtime.observe:
        mp = placement if placement is not None else \
            runtime.placements.for_layer(layer_id, call.num_experts, call.router_logits.device)
    res: Any = decision.cpu
    if res is not None:
        figures = None if mp is None else \
            (lambda row: cpu_call_figures(res, layer_id, mp.primary_gpu, mp.num_gpus, row=row))
        stats.record_call_host(layer_id, int(routing.active.sum()), int(res.vanilla_active.sum()), res.num_valid,
                               res.changed_tokens, res.checksum, figures=figures,
                               num_gpus=1 if mp is None else mp.num_gpus,
                               cap_bound=0 if routing.cap_bound is None else int(routing.cap_bound))
        return
    stats.record_call(layer_id, logits=call.router_logits, engine_ids=call.engine_ids, chosen_ids=routing.topk_ids,
                      active=routing.active, num_tokens=call.num_token_non_padded, placement=mp,
                      scoring=decision.config.scoring, cap_bound=routing.cap_bound)
