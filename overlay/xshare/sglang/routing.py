"""The routing decision of one ``_post_process_topk_ids`` call: whether the selector applies, the
core's decision through the one seam (:func:`xshare.selection.engine.decide`), and the per-call
bookkeeping (counters, the metrics window, the trace). Never raises: a failure is logged once,
counted and left to SGLang's own top-k."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from xshare.selection import get_policy
from xshare.selection.backends.global_mode import join_empty
from xshare.selection.decide import Decision, decide, layer_config
from xshare.selection.routers.spec import RouterSpec
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
    # Off (disabled, or this rank off its group's config): eager calls keep SGLang's routing; a call being
    # captured into a CUDA graph still records the selector, behind the knobs' device on/off switch
    # (off now), so that replays follow a later enable.
    capturing = state is not None and state.capturing
    if not capturing:  # eager: a pending settings change reaches the knobs (the forward hook's job in serving)
        runtime.sync_knobs()
    if not s.enabled and not capturing:
        runtime.skip("disabled")
        _prepare(runtime, args, topk_config)
        return None
    if runtime.diverged and not capturing:  # never route differently from the peers
        runtime.skip("config_diverged")
        runtime.log_once("diverged", logging.ERROR, "xshare: rank %d is not on its group's config: SGLang's "
                         "routing until the next config change", runtime.group_rank)
        _join_owed(runtime, args, state, topk_config)
        return None
    if is_draft_layer(topk_config) or (state is not None and state.is_draft):
        runtime.skip("draft_layer")
        stats.note_layer(int(args.get("layer_id") or 0), "draft_layer")
        return None
    if state is None:
        runtime.skip("no_forward_state")
        return None
    offset = 0
    if runtime.two_batch_overlap:  # the call's first row in the forward (its micro-batch's)
        topk_ids = args.get("topk_ids")
        offset = state.row_offset(int(args.get("layer_id") or 0), int(topk_ids.shape[0]) if topk_ids is not None else 0)
    global_mode = runtime.global_mode()
    if global_mode:
        if not state.global_applies:
            runtime.skip("not_applicable_global")
            return None
    elif runtime.shared_rows:  # TP ranks over the DP group's rows: the group's mode, not this rank's
        mode = state.global_mode or state.mode
        if mode not in runtime.modes():
            runtime.skip(f"mode_{mode}")
            return None
        if state.exact is not None or state.exact_unknown:
            # this rank's flags cover its own rows only, its peers' not at all: every rank ignores them alike
            # (below: no exact-rows refusal, and _route reads no mask)
            runtime.log_once("exact_shared_rows", logging.WARNING, "xshare: exact routing is not honoured with "
                             "attention DP over a TP MoE (each rank knows only its own requests' flags)")
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
    if unsupported is None and not runtime.shared_rows and (state.exact_unknown
                                                          or (global_mode and state.exact is not None)):
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
    joined: list[bool] = []  # DeepEP global mode: this call's one part of the group's all-reduce
    all_reduce = _counted(runtime.all_reduce, joined) if global_mode else None
    try:
        t0 = time.perf_counter()
        out = _route(runtime, call, state, global_mode, offset, all_reduce)
        if runtime.observe and out is not None:
            stats.record_seconds(time.perf_counter() - t0)
        return out
    except Exception as exc:  # serving never fails because of the selector
        reason = type(exc).__name__
        stats.count_fallback(reason)
        runtime.log_once(f"fallback:{reason}", logging.ERROR,
                         "xshare: selector failed (%s: %s); routing this call with SGLang's top-k "
                         "(logged once per error type, counted in fallbacks)", reason, exc, exc_info=True)
        if global_mode and not joined:  # failed before its part: the peers are waiting in the all-reduce
            _join_owed(runtime, args, state, topk_config)
        return None


def route_logits(runtime: Runtime, topk: Any, logits: torch.Tensor, top_k: int,
                 num_tokens: Any = None) -> torch.Tensor | None:
    """For runner backends that route from the logits alone (SGLang's ``triton_kernel`` runner): the
    selector's experts of one call as int16 [T, top_k], each row in ascending expert id (the order
    triton_kernels lists its own top-k in), or None to keep the backend's own top-k. The same decision
    as :func:`route` (``topk`` is the layer's SGLang ``TopK`` module), with the runner's own top-k as
    SGLang's picks: triton_kernels' ``streaming_topk`` keeps the k largest logits, an exact tie to the
    lower expert id, and lists them by expert id; a stable descending sort gives the same experts, so
    exact rows and a budget >= E give the runner's own routing, ties included."""
    cfg = getattr(topk, "topk_config", None)
    if cfg is None or logits.ndim != 2:
        return None
    k = min(top_k, logits.shape[1])
    own = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    weights = torch.softmax(logits.gather(1, own).float(), dim=-1)
    args = {"topk_ids": own.to(torch.int32), "topk_weights": weights, "router_logits": logits,
            "layer_id": getattr(topk, "layer_id", 0), "num_token_non_padded": num_tokens}
    out = route(runtime, args, cfg)
    if out is None:
        return None
    return out["topk_ids"][:, :k].to(torch.int64).sort(dim=-1).values.to(torch.int16)


def _counted(all_reduce: Any, joined: list[bool]) -> Any:
    """``all_reduce`` that notes in ``joined`` that this rank made its part."""
    def part(local: torch.Tensor) -> torch.Tensor:
        joined.append(True)
        return all_reduce(local)
    return part


def stream_capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph now. Under SGLang's capture of one
    shape the forward also runs eagerly first, on dummy inputs (warm-up): in the capturing state but
    not capturing. Off CUDA nothing is captured by torch; the CPU test bed's emulated capture counts as
    capturing."""
    if device.type == "cuda":
        return torch.cuda.is_current_stream_capturing()
    return True


def _join_owed(runtime: Runtime, args: dict[str, Any], state: ForwardState | None, topk_config: Any) -> None:
    """DeepEP global mode: this rank's part of a layer's all-reduce that its peers make (the group
    applies, from replicated facts) when this rank itself will not route (off its group's config, or
    failed before its part): zeros, so the collective completes and the others' set is theirs."""
    if not runtime.global_mode() or state is None or not state.global_applies or state.is_draft \
            or is_draft_layer(topk_config):
        return
    logits = args.get("router_logits")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        return
    try:
        join_empty(int(logits.shape[1]), runtime.all_reduce, logits.device)
    except Exception as exc:  # noqa: BLE001 - the group's failure, not this call's: SGLang's routing still runs
        runtime.log_once("join_owed", logging.ERROR, "xshare: joining the group's all-reduce failed: %s", exc)


def _prepare(runtime: Runtime, args: dict[str, Any], topk_config: Any) -> None:
    """An eager call left to SGLang: the layer's router description and device state are built for a
    capture that may follow."""
    logits = args.get("router_logits")
    if isinstance(logits, torch.Tensor) and logits.ndim == 2:
        try:
            router_spec(topk_config)  # cached per layer config (its checks read the bias on the host)
            runtime.prepare_layer(int(args.get("layer_id") or 0), int(logits.shape[1]), logits.device)
        except Exception as exc:  # noqa: BLE001 - preparing never breaks a forward; a capture then falls back
            runtime.log_once("prepare_layer", logging.WARNING, "xshare: cannot prepare the layer's state: %s", exc)


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


def _route(runtime: Runtime, call: TopkCall, state: ForwardState, global_mode: bool,
           offset: int = 0, all_reduce: Any = None) -> dict[str, Any]:
    s = runtime.settings
    if call.num_token_non_padded is None and state.real_rows is not None and not global_mode:
        # SGLang masks no padding rows here (no EP, no DP gather): the count the plugin keeps for the graph,
        # less the rows of earlier micro-batches of the forward
        real = state.real_rows if offset == 0 else (state.real_rows - offset).clamp_min(0)
        call = dataclasses.replace(call, num_token_non_padded=real)
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
    knobs = None
    if not global_mode:  # the torch path reads the numbers from device knobs (CUDA-graph safe)
        knobs = runtime.knobs_for(layer_config(config, call.layer), num_experts, call.top_k, device, call.layer_id)
    exact = None if global_mode or runtime.shared_rows else _exact_rows(runtime, state, call, device, offset)
    base = call.layer_call(groups=groups, placement=placement, knobs=knobs, all_reduce=all_reduce, exact=exact)
    cpu_ok = (not global_mode and not state.capturing and device.type == "cpu" and runtime.cpu_kernel_ready())
    decision = decide(base, config, cpu_kernel=cpu_ok, checkpoint=lambda: runtime.fault(s.fault_inject))
    if not (state.capturing and not stream_capturing(device)):  # SGLang's warm-up runs before a capture
        _record(runtime, call, decision, placement)  # (dummy batches) are not counted; the capture itself is
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
        if decision.outputs is not None:  # the backend wrote them in SGLang's layout already
            return {"topk_ids": decision.outputs[0], "topk_weights": decision.outputs[1]}
        return call.replace_rows(routing.topk_ids, routing.topk_weights, decision.replaced)
    # The policy chose the replicas itself (xshare_ep): SGLang must not remap them again. Except under
    # SGLang's LP dispatch, whose solver all-reduces over the EP group in every call: dropping its dispatch
    # on a rank that applied (while a rank that fell back keeps it) would leave the group's collective
    # hanging, so there the logical experts go to SGLang, which picks the replicas on every rank.
    physical = routing.physical_ids is not None and call.dispatch_algorithm != "lp"
    new_ids = routing.physical_ids if physical else routing.topk_ids
    out = call.replace(new_ids, routing.topk_weights, physical=physical)
    if exact is not None and not physical:  # exact rows: SGLang's own ids and weights, verbatim
        keep = exact.unsqueeze(1)
        out["topk_ids"] = torch.where(keep, call.topk_ids, out["topk_ids"])
        out["topk_weights"] = torch.where(keep, call.topk_weights, out["topk_weights"])
    return out


def _exact_rows(runtime: Runtime, state: ForwardState, call: TopkCall, device: torch.device,
                offset: int = 0) -> torch.Tensor | None:
    """bool [rows] of exact-routed rows for this call (its rows of the forward start at ``offset``: the
    second micro-batch of two-batch overlap reads its own flags), or None. Under CUDA-graph capture,
    always the persistent buffer (the graph then reads each replay's flags); a mask that does not cover
    the rows raises (the call falls back to SGLang's routing, exact for every row)."""
    from xshare.sglang.runtime import EXACT_BUFFER_ROWS

    end = offset + call.num_rows
    if state.capturing:
        if end > EXACT_BUFFER_ROWS:
            raise ValueError(f"exact routing: {end} rows exceed the graph buffer ({EXACT_BUFFER_ROWS})")
        return runtime.exact_buffer(device)[offset:end]
    exact = state.exact
    if exact is None:
        return None
    if exact.device != device or exact.shape[0] < end:
        raise ValueError(f"exact routing: {exact.shape[0]} flagged rows for rows {offset}..{end} of a call")
    return exact if exact.shape[0] == call.num_rows else exact[offset:end]


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
        active, vanilla = res.active_counts()
        stats.record_call_host(layer_id, active, vanilla, res.num_valid,
                               res.changed_tokens, res.checksum, figures=figures,
                               num_gpus=1 if mp is None else mp.num_gpus,
                               cap_bound=0 if routing.cap_bound is None else int(routing.cap_bound))
        return
    stats.record_call(layer_id, logits=call.router_logits, engine_ids=call.engine_ids, chosen_ids=routing.topk_ids,
                      active=routing.active, num_tokens=call.num_token_non_padded, placement=mp,
                      scoring=decision.config.scoring, cap_bound=routing.cap_bound)
