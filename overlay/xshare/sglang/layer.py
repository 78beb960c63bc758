"""The routing decision of one MoE layer call, from SGLang's arguments to SGLang's replacement arguments.

Flow, one trip down and back: the routing hooks (:mod:`xshare.sglang.hooks.routing`) hand
:func:`route` the call's arguments by name; it checks that the selector applies (on, the forward's
mode, a router it routes, a batch it may select for), reads the call (:class:`~xshare.sglang.topk_call.
TopkCall`), adds what the process state holds for it (device knobs, request ids of the rows, the
exact-routing mask, the placement) into one :class:`~xshare.selection.decide.LayerCall`, hands that
to the core's one entry (:func:`xshare.selection.decide.decide`, which picks the backend) and turns
the :class:`~xshare.selection.decide.Decision` into SGLang's ``topk_ids`` / ``topk_weights``. The
per-call bookkeeping goes to :mod:`xshare.sglang.observe`. Reads the process state, never writes its
settings; never raises: a failure is logged once, counted and left to SGLang's own top-k."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from xshare.selection import SelectorConfig, get_policy
from xshare.selection.backends.global_mode import join_empty
from xshare.selection.decide import Decision, LayerCall, decide, gate_deferrable, layer_config
from xshare.selection.routers.spec import RouterSpec
from xshare.sglang.deferred_gate import DeferredGate
from xshare.sglang.observe import report
from xshare.sglang.observe.record import record_call
from xshare.sglang.state import EXACT_BUFFER_ROWS, ForwardState, ProcessState
from xshare.sglang.topk_call import TopkCall, is_draft_layer, router_spec
from xshare.sglang.verify_layout import ROWS_MISMATCH, ROWS_UNKNOWN

log = logging.getLogger("xshare.sglang")


def route(proc: ProcessState, args: dict[str, Any], topk_config: Any,
          deferred: DeferredGate | None = None) -> dict[str, Any] | None:
    """Replacement arguments for one ``_post_process_topk_ids`` call (``args`` by parameter name), or None
    to leave SGLang's routing unchanged. ``deferred``: SGLang skipped the call's gate (``topk_ids`` and
    ``topk_weights`` are its placeholders): the backend computes the gate, or the gate runs here first
    (:func:`_gate_call`); on None the caller runs it. Never raises."""
    proc.stats.count_call()
    state = proc.current
    capturing = state is not None and state.capturing
    if not capturing:  # eager: a pending settings change reaches the knobs (the forward hook's job in serving)
        proc.sync_knobs()
    if not _on(proc, args, state, topk_config, capturing):
        return None
    assert state is not None  # _on refuses a call without forward state
    # DeepEP global mode; a captured forward over an EP group that cannot all-reduce in a graph: per rank
    global_mode = proc.global_mode() and not (capturing and not proc.all_reduce_in_graphs)
    offset = 0
    if proc.two_batch_overlap:  # the call's first row in the forward (its micro-batch's)
        topk_ids = args.get("topk_ids")
        offset = state.row_offset(int(args.get("layer_id") or 0), int(topk_ids.shape[0]) if topk_ids is not None else 0)
    if not _mode_applies(proc, state, global_mode):
        return None
    call, unsupported = _read_call(proc, args, topk_config, state, global_mode)
    if unsupported is not None:
        _leave_layer(proc, args, unsupported, global_mode)
        return None
    assert call is not None  # read whenever its layer is not left to SGLang
    if not global_mode:
        reason = _call_refusal(proc, state, call)
        if reason is not None:
            proc.skip(reason)
            return None
    joined: list[bool] = []  # DeepEP global mode: this call's one part of the group's all-reduce
    all_reduce = _counted(proc.all_reduce, joined) if global_mode else None
    try:
        t0 = time.perf_counter()
        out = _route(proc, call, state, global_mode, offset, all_reduce, deferred)
        if proc.observe and out is not None:
            proc.stats.record_seconds(time.perf_counter() - t0)
        return out
    except Exception as exc:  # serving never fails because of the selector: SGLang's top-k routes the call
        reason = type(exc).__name__
        proc.stats.count_fallback(reason)
        proc.log_once(f"fallback:{reason}", logging.ERROR,
                      "xshare: selector failed (%s: %s); routing this call with SGLang's top-k "
                      "(logged once per error type, counted in fallbacks)", reason, exc, exc_info=True)
        if global_mode and not joined:  # failed before its part: the peers are waiting in the all-reduce
            _join_owed(proc, args, state, topk_config)
        return None


def _on(proc: ProcessState, args: dict[str, Any], state: ForwardState | None, topk_config: Any,
        capturing: bool) -> bool:
    """Whether the selector is on for this call at all; a call it is not on for is counted (and, off its
    group's config in DeepEP global mode, still joins the group's all-reduce). Off (disabled, or this
    rank off its group's config): eager calls keep SGLang's routing; a call being captured into a CUDA
    graph still records the selector, behind the knobs' device on/off switch (off now), so that replays
    follow a later enable."""
    if not proc.settings.enabled and not capturing:
        proc.skip("disabled")
        _prepare(proc, args, topk_config)
        return False
    if proc.diverged and not capturing:  # never route differently from the peers
        proc.skip("config_diverged")
        proc.log_once("diverged", logging.ERROR, "xshare: rank %d is not on its group's config: SGLang's "
                      "routing until the next config change", proc.group_rank)
        _join_owed(proc, args, state, topk_config)
        return False
    if (is_draft_layer(topk_config) or (state is not None and state.is_draft)) and not proc.settings.draft_layers:
        proc.skip("draft_layer")
        proc.stats.note_layer(int(args.get("layer_id") or 0), "draft_layer")
        return False
    if state is None:
        proc.skip("no_forward_state")
        return False
    if state.undecided:  # its own facts unread (the forward hook says why): its peers may still all-reduce
        proc.skip("forward_state_failed")
        _join_owed(proc, args, state, topk_config)
        return False
    return True


def _mode_applies(proc: ProcessState, state: ForwardState, global_mode: bool) -> bool:
    """Whether the selector applies to the forward's mode (counted when not). DeepEP global mode: the
    group's decision, made before the forward; attention DP over a TP MoE: the group's mode, not this
    rank's (the TP ranks route the same rows)."""
    if global_mode:
        if not state.global_applies:
            proc.skip("not_applicable_global")
            return False
        return True
    mode = (state.global_mode or state.mode) if proc.shared_rows else state.mode
    if mode not in proc.modes():
        proc.skip(f"mode_{mode}")
        return False
    if proc.shared_rows and (state.exact is not None or state.exact_unknown):
        # this rank's flags cover its own rows only, its peers' not at all: every rank ignores them alike
        # (no exact-rows refusal, and _route reads no mask)
        proc.log_once("exact_shared_rows", logging.WARNING, "xshare: exact routing is not honoured with "
                      "attention DP over a TP MoE (each rank knows only its own requests' flags)")
    return True


def _read_call(proc: ProcessState, args: dict[str, Any], topk_config: Any, state: ForwardState,
               global_mode: bool) -> tuple[TopkCall | None, str | None]:
    """The call read from SGLang's arguments, and why the selector leaves its layer to SGLang (None
    when it does not): a router it does not route, a router that does not fit the layer, exact rows it
    cannot honour row by row. The call is None only with a reason (a router not routed is not read)."""
    spec, unsupported = router_spec(topk_config)  # once per call: cached per layer
    call = TopkCall.read(args, topk_config) if unsupported is None else None
    if spec is not None and call is not None and call.logits_match():
        try:
            spec.check(call.num_experts, call.top_k)  # host values only
        except ValueError as exc:
            unsupported = "router_config"
            proc.log_once("router_config", logging.WARNING, "xshare: layer router %s does not fit the layer: %s",
                          spec, exc)
    if unsupported is None and not proc.shared_rows and (state.exact_unknown
                                                        or (global_mode and state.exact is not None)):
        # a request asked for exact routing and this call cannot honour it row by row: SGLang routes it all
        unsupported = "exact_rows_unknown" if state.exact_unknown else "exact_routing_global_mode"
    return call, unsupported


def _call_refusal(proc: ProcessState, state: ForwardState, call: TopkCall) -> str | None:
    """Why this rank's call is left to SGLang (the skip reason), or None: no rows, no router logits of
    the layer's shape, a batch outside the size gates (eager only: a graph reads them on the device), a
    verify batch whose rows cannot be mapped to requests (never routed with guessed request groups)."""
    if call.num_rows == 0:
        return "empty"
    if not call.logits_match():
        return "no_router_logits"
    if not state.capturing and not proc.settings.selector.applies_to(call.num_rows):
        return "batch_size"
    return _unmapped_verify_rows(proc, state, call)


def route_logits(proc: ProcessState, topk: Any, logits: torch.Tensor, top_k: int,
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
    out = route(proc, args, cfg)
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


def _join_owed(proc: ProcessState, args: dict[str, Any], state: ForwardState | None, topk_config: Any) -> None:
    """DeepEP global mode: this rank's part of a layer's all-reduce that its peers make (the group
    applies, from replicated facts) when this rank itself will not route (off its group's config, or
    failed before its part): zeros, so the collective completes and the others' set is theirs."""
    if not proc.global_mode() or state is None or not state.global_applies or state.is_draft \
            or is_draft_layer(topk_config):
        return
    logits = args.get("router_logits")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        return
    try:
        join_empty(int(logits.shape[1]), proc.all_reduce, logits.device)
    except Exception as exc:  # noqa: BLE001 - the group's failure, not this call's: SGLang's routing still runs
        proc.log_once("join_owed", logging.ERROR, "xshare: joining the group's all-reduce failed: %s", exc)


def _prepare(proc: ProcessState, args: dict[str, Any], topk_config: Any) -> None:
    """An eager call left to SGLang: the layer's router description and device state are built for a
    capture that may follow."""
    logits = args.get("router_logits")
    if isinstance(logits, torch.Tensor) and logits.ndim == 2:
        try:
            router_spec(topk_config)  # cached per layer config (its checks read the bias on the host)
            proc.prepare_layer(int(args.get("layer_id") or 0), int(logits.shape[1]), logits.device)
        except Exception as exc:  # noqa: BLE001 - preparing never breaks a forward; a capture then falls back
            proc.log_once("prepare_layer", logging.WARNING, "xshare: cannot prepare the layer's state: %s", exc)


def _unmapped_verify_rows(proc: ProcessState, state: ForwardState, call: TopkCall) -> str | None:
    """Why the rows of a verify call cannot be handed to a policy that groups them by request, or None."""
    if state.mode != "target_verify" or not get_policy(proc.settings.selector.policy).uses_groups():
        return None
    if state.unmapped is not None:
        return state.unmapped
    if state.capturing:  # the static layout, baked into the graph (ProcessState.group_ids)
        return None
    if state.groups is None:
        return ROWS_UNKNOWN
    if state.groups.shape[0] != call.num_rows:
        return ROWS_MISMATCH
    return None


def _leave_layer(proc: ProcessState, args: dict[str, Any], reason: str, global_mode: bool) -> None:
    """A layer the selector leaves to SGLang for a reason of its own: said once, counted, noted in the
    coverage; in DeepEP global mode this rank still joins the group's all-reduce."""
    proc.log_once(f"unsupported:{reason}", logging.WARNING,
                  "xshare: layer routing uses %s; the selector leaves such layers to SGLang", reason)
    proc.skip(f"unsupported_{reason}")
    proc.stats.note_layer(int(args.get("layer_id") or 0), f"unsupported_{reason}")
    if global_mode:
        logits = args["router_logits"]
        join_empty(logits.shape[1], proc.all_reduce, logits.device)


def may_defer_gate(proc: ProcessState, logits: torch.Tensor, shared: int, bias: torch.Tensor | None) -> bool:
    """Whether SGLang may skip its grouped gate for this call (:mod:`xshare.sglang.deferred_gate`): the
    selector on and this rank on its group's config, the C kernel on and built, CPU logits, no fused
    shared slot, one bias vector (not per token), an eager forward of a mode the selector applies to
    outside DeepEP global mode, a batch it may select for. Host values only. The routing hook still
    checks the call itself and runs the gate where the backend does not compute it."""
    s = proc.settings
    if not s.enabled or not s.cpu_kernel or s.selector.backend not in ("auto", "c") or proc.diverged:
        return False
    if logits.device.type != "cpu" or logits.ndim != 2 or shared or (bias is not None and bias.ndim != 1):
        return False
    state = proc.current
    if state is None or state.capturing or state.is_draft or state.mode not in proc.modes() or proc.global_mode():
        return False
    return s.selector.applies_to(int(logits.shape[0])) and proc.cpu_kernel_ready()


def _gate_call(call: LayerCall, config: SelectorConfig, cpu_ok: bool, deferred: DeferredGate) -> LayerCall:
    """The layer call without SGLang's picks where the backend computes the gate itself (the C served
    path); else SGLang's gate runs now, into the placeholders the call reads, and the call is unchanged."""
    gate = dataclasses.replace(call, engine_ids=None, engine_outputs=None, engine_gate=True)
    if gate_deferrable(gate, config, cpu_kernel=cpu_ok):
        return gate
    deferred.fill()
    return call


def _route(proc: ProcessState, call: TopkCall, state: ForwardState, global_mode: bool,
           offset: int = 0, all_reduce: Any = None, deferred: DeferredGate | None = None) -> dict[str, Any]:
    s = proc.settings
    if call.num_token_non_padded is None and state.real_rows is not None and not global_mode:
        # SGLang masks no padding rows here (no EP, no DP gather): the count the plugin keeps for the graph,
        # less the rows of earlier micro-batches of the forward
        real = state.real_rows if offset == 0 else (state.real_rows - offset).clamp_min(0)
        call = dataclasses.replace(call, num_token_non_padded=real)
    config = proc.layer_config(s.selector, call.layer_id)  # per-layer budget / target mass
    policy = get_policy(config.policy)
    logits = call.router_logits
    device = logits.device
    num_experts = call.num_experts
    if proc.trace is not None and not state.capturing and call.num_rows:
        spec = call.layer if isinstance(call.layer, RouterSpec) else None
        scoring = "sigmoid" if spec is not None and spec.scoring != "softmax" else \
            getattr(call.topk_config, "scoring_func", "softmax")
        proc.trace.add_layer(call.layer_id, logits, call.top_k, scoring, router=spec)
    placement = proc.placements.for_layer(call.layer_id, num_experts, device) if policy.needs_placement else None
    groups = None
    if policy.uses_groups() and not global_mode:
        groups = state.groups if state.groups is not None and state.groups.shape[0] == call.num_rows else \
            proc.group_ids(call.num_rows, state.tokens_per_req, device)
    knobs = None
    if not global_mode:  # the torch path reads the numbers from device knobs (CUDA-graph safe)
        knobs = proc.knobs_for(layer_config(config, call.layer), num_experts, call.top_k, device, call.layer_id)
    exact = None if global_mode or proc.shared_rows else _exact_rows(proc, state, call, device, offset)
    base = call.layer_call(groups=groups, placement=placement, knobs=knobs, all_reduce=all_reduce, exact=exact)
    cpu_ok = (not global_mode and not state.capturing and device.type == "cpu" and proc.cpu_kernel_ready())
    if deferred is not None:
        base = _gate_call(base, config, cpu_ok, deferred)
    decision = decide(base, config, cpu_kernel=cpu_ok, checkpoint=lambda: proc.fault(s.fault_inject))
    if not (state.capturing and not stream_capturing(device)):  # SGLang's warm-up runs before a capture
        record_call(proc, call, decision, placement)  # (dummy batches) are not counted; the capture itself is
        if groups is not None:
            limit = _request_bound(config, num_experts, call.top_k, state.tokens_per_req) \
                if "group_budget" in policy.knobs else None
            proc.stats.record_requests(groups, decision.routing.topk_ids, num_experts, limit)
    proc.stats.note_layer(call.layer_id, "selects")
    label = proc.stats.note_backend(call.layer_id, decision.backend, decision.reason)
    if decision.reason is not None and not decision.reason.startswith("c_"):
        proc.log_once(f"backend:{label}", logging.WARNING, "xshare: layer %d is routed by the torch reference, "
                      "not the %s kernel (%s): counted per layer in /xshare/stats 'backends'", call.layer_id,
                      "fused Triton" if device.type == "cuda" else "wanted", decision.reason)
    report.first_applied(proc)
    if decision.replaced is not None:
        proc.stats.record_short_rows(decision.short_rows)
    return _replacement(call, decision, exact)


def _request_bound(config: SelectorConfig, num_experts: int, top_k: int, rows: int) -> int:
    """The most experts a request of ``rows`` rows may use under a per-request policy: max(m_r, |W_r|), W_r
    its warm-up (each row's top-k0; a multi-row request's first row its top anchor_k)."""
    warm = config.warmup_k if rows <= 1 else config.anchor_k_for(top_k) + (rows - 1) * config.warmup_k
    return max(config.group_budget_for(num_experts, top_k), min(warm, num_experts))


def _replacement(call: TopkCall, decision: Decision, exact: torch.Tensor | None) -> dict[str, Any]:
    """SGLang's replacement ``topk_ids`` / ``topk_weights`` (and dispatch info) for a decision."""
    routing = decision.routing
    if decision.replaced is not None:  # a router-spec layer: only the rows the policy changed
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


def _exact_rows(proc: ProcessState, state: ForwardState, call: TopkCall, device: torch.device,
                offset: int = 0) -> torch.Tensor | None:
    """bool [rows] of exact-routed rows for this call (its rows of the forward start at ``offset``: the
    second micro-batch of two-batch overlap reads its own flags), or None. Under CUDA-graph capture,
    always the persistent buffer (the graph then reads each replay's flags); a mask that does not cover
    the rows raises (the call falls back to SGLang's routing, exact for every row)."""
    end = offset + call.num_rows
    if state.capturing:
        if end > EXACT_BUFFER_ROWS:
            raise ValueError(f"exact routing: {end} rows exceed the graph buffer ({EXACT_BUFFER_ROWS})")
        return proc.exact_buffer(device)[offset:end]
    exact = state.exact
    if exact is None:
        return None
    if exact.device != device or exact.shape[0] < end:
        raise ValueError(f"exact routing: {exact.shape[0]} flagged rows for rows {offset}..{end} of a call")
    return exact if exact.shape[0] == call.num_rows else exact[offset:end]
