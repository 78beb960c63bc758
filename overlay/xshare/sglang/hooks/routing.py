"""The hooks on SGLang's routing of one MoE layer call (SGLang 0.5.23 targets): they read SGLang's
arguments and hand them to the routing decision (:func:`xshare.sglang.layer.route`), then call SGLang's
function with the replacement arguments it returns (or unchanged).

* ``sglang.srt.layers.moe.topk._post_process_topk_ids`` (AROUND), the routing hook: rewrites the
  logical ``topk_ids``/``topk_weights`` of one MoE layer before SGLang maps them to physical
  experts, masks padded rows and records the expert distribution;
* ``sglang.srt.layers.moe.topk.routing`` and ``TopK.forward_cuda`` (AROUND, only where the
  ``triton_kernels`` package imports): the routing of SGLang's ``triton_kernel`` MoE runner (GPT-OSS
  MXFP4 on Hopper), which never calls ``select_experts``;
* ``sglang.srt.layers.moe.topk.TopK.bind_runner_backend`` (AFTER, with ``XSHARE_ROUTED_TOPK`` on):
  Blackwell's ``flashinfer_trtllm`` runners route through ``select_experts`` instead of inside the
  MoE kernel;
* ``sglang.srt.layers.moe.topk.TopK.empty_topk_output`` (AFTER, DeepEP global mode only): a
  zero-token rank joins the layer's all-reduce;
* ``sglang.srt.layers.moe.topk.biased_grouped_topk`` and ``grouped_topk`` (AROUND), SGLang's grouped
  gates as ``select_experts`` calls them: on the CPU, where the C served path computes the gate itself,
  the gate is skipped for a call the selector will route (:mod:`xshare.sglang.deferred_gate`) and run
  after all for a call it then leaves to SGLang.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from xshare.selection.backends.global_mode import join_empty
from xshare.sglang import state as state_mod
from xshare.sglang.deferred_gate import DeferredGate
from xshare.sglang.hooks.binding import bind_arguments
from xshare.sglang.layer import may_defer_gate, route, route_logits

TOPK_MODULE = "sglang.srt.layers.moe.topk"
POST_PROCESS_TARGET = f"{TOPK_MODULE}._post_process_topk_ids"
EMPTY_TOPK_TARGET = f"{TOPK_MODULE}.TopK.empty_topk_output"
TRITON_ROUTING_TARGET = f"{TOPK_MODULE}.routing"
TOPK_FORWARD_CUDA_TARGET = f"{TOPK_MODULE}.TopK.forward_cuda"
BIND_RUNNER_TARGET = f"{TOPK_MODULE}.TopK.bind_runner_backend"
GATE_TARGETS = (f"{TOPK_MODULE}.biased_grouped_topk", f"{TOPK_MODULE}.grouped_topk")


# -- routing -------------------------------------------------------------------------------------
def post_process_topk_ids_hook(original: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``_post_process_topk_ids(topk_ids, topk_weights, topk_config, router_logits, layer_id,
    num_token_non_padded=None, expert_location_dispatch_info=None, padded_rows_masked=False)``."""
    runtime = state_mod.get()
    if runtime is None:
        return original(*args, **kwargs)
    try:
        a = bind_arguments(original, args, kwargs)
    except TypeError as exc:  # a different SGLang signature: never break serving
        runtime.stats.count_fallback("signature")
        runtime.log_once("signature", logging.ERROR, "xshare: cannot bind _post_process_topk_ids arguments: %s", exc)
        return original(*args, **kwargs)
    state = runtime.current
    deferred = None if state is None else state.deferred_gate
    if deferred is not None:
        state.deferred_gate = None
        if not deferred.owns(a.get("topk_ids")):  # not the skipped gate's call: its outputs went elsewhere
            deferred = None
    changes = route(runtime, a, a.get("topk_config"), deferred)
    if not changes:
        if deferred is not None:  # left to SGLang: its gate runs now, into the tensors it handed on
            deferred.fill()
        return original(*args, **kwargs)
    a.update(changes)
    return original(**a)


# -- SGLang's grouped gates on the CPU ------------------------------------------------------------
def gate_hook(original: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``biased_grouped_topk(hidden_states, gating_output, correction_bias, topk, renormalize, ...)``
    and ``grouped_topk(hidden_states, gating_output, topk, renormalize, ...)`` as ``select_experts`` calls
    them: where the selector will route the call through a backend that computes the gate itself
    (:func:`xshare.sglang.layer.may_defer_gate`), SGLang gets placeholder outputs and the routing hook,
    next in the same ``select_experts`` call, either routes from the logits alone or runs this gate after
    all (:class:`~xshare.sglang.deferred_gate.DeferredGate`). Anything else runs the gate as it is."""
    runtime = state_mod.get()
    state = None if runtime is None else runtime.current
    logits = args[1] if len(args) > 1 else kwargs.get("gating_output")  # (hidden_states, gating_output, ...)
    on_cpu = getattr(getattr(logits, "device", None), "type", None) == "cpu"  # GPU calls: nothing more read
    if state is None or not on_cpu or not _called_by_select_experts():
        return original(*args, **kwargs)
    try:
        a = bind_arguments(original, args, kwargs)
        logits = a["gating_output"]
        defer = may_defer_gate(runtime, logits, a.get("num_fused_shared_experts") or 0, a.get("correction_bias"))
    except Exception as exc:  # noqa: BLE001 - a signature of another SGLang: its gate runs as it is
        runtime.log_once("gate_signature", logging.WARNING, "xshare: cannot read SGLang's gate arguments (%s); "
                         "its gate runs before the selector", exc)
        return original(*args, **kwargs)
    if not defer:
        return original(*args, **kwargs)
    gate = DeferredGate(int(logits.shape[0]), int(a["topk"]), logits.device, lambda: original(*args, **kwargs))
    state.deferred_gate = gate
    return gate.outputs()


def _called_by_select_experts() -> bool:
    """Whether the gate runs inside SGLang's ``select_experts`` (which hands its outputs straight to the
    routing hook): the caller of the hook registry's wrapper, or of this hook when called directly."""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_name == "select_experts" and frame.f_globals.get("__name__") == TOPK_MODULE:
            return True
        frame = frame.f_back
    return False


# -- SGLang's triton_kernel MoE runner (GPT-OSS MXFP4 on Hopper) --------------------------------------
def topk_forward_cuda_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``TopK.forward_cuda(self, hidden_states, router_logits, ...)``: remembers the layer whose
    top-k runs, for :func:`triton_routing_hook` (SGLang's ``routing`` is not told the layer)."""
    runtime = state_mod.get()
    if runtime is None:
        return original(self, *args, **kwargs)
    previous, runtime.current_topk = runtime.current_topk, self
    try:
        return original(self, *args, **kwargs)
    finally:
        runtime.current_topk = previous


def triton_routing_hook(original: Any, logits: Any, n_expts_act: int, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``sglang.srt.layers.moe.topk.routing(logits, n_expts_act, sm_first=False, expt_indx=None,
    simulated_ep=1, n_rows=None)``, the routing of the ``triton_kernel`` runner, which never calls
    ``select_experts``. The selector's experts go in as ``expt_indx`` (triton_kernels' top-k then takes
    exactly those, softmax over their logits as the layer would): the ragged metadata, gather/scatter
    indices and gate scales are triton_kernels' own for that routing. Any failure routes the call
    unchanged (counted in the fallbacks)."""
    runtime = state_mod.get()
    layer = None if runtime is None else runtime.current_topk
    if layer is None:
        return original(logits, n_expts_act, *args, **kwargs)
    try:
        call = bind_arguments(original, (logits, n_expts_act, *args), kwargs)
    except TypeError:
        return original(logits, n_expts_act, *args, **kwargs)
    if call.get("expt_indx") is not None or call.get("simulated_ep", 1) != 1:
        return original(logits, n_expts_act, *args, **kwargs)
    ids = route_logits(runtime, layer, logits, int(n_expts_act), call.get("n_rows"))
    if ids is None:
        return original(logits, n_expts_act, *args, **kwargs)
    try:
        return original(**{**call, "expt_indx": ids})
    except Exception as exc:  # noqa: BLE001 - serving never fails because of the selector
        runtime.stats.count_fallback("triton_kernel_routing")
        runtime.log_once("triton_kernel_routing", logging.ERROR, "xshare: triton_kernels routing refused the "
                         "selector's experts (%s); routing with its own top-k", exc, exc_info=True)
        return original(logits, n_expts_act, *args, **kwargs)


# -- SGLang's flashinfer_trtllm runners (Blackwell) -------------------------------------------------
def bind_runner_backend_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``TopK.bind_runner_backend(self, runner_backend, *, routing_method_type=None)``: where SGLang
    chose the BYPASSED top-k output for a ``flashinfer_trtllm`` runner (the TRT-LLM MoE kernel routes
    from the raw logits itself, so no plugin sees the routing), switch the layer to the STANDARD
    output: ``select_experts`` then routes (through the routing hook) and the runner uses its routed
    kernels on those ids, as SGLang itself does for LoRA. ``flashinfer_mxfp4`` (GPT-OSS on Blackwell)
    accepts no STANDARD output for its activation and is left alone (the coverage report says what to set)."""
    runtime = state_mod.get()
    if runtime is None or not runtime.settings.enabled or not runtime.settings.routed_topk:
        return None
    cfg = getattr(self, "topk_config", None)
    backend = getattr(cfg, "runner_backend", None)
    fmt = getattr(cfg, "output_format", None)
    if cfg is None or getattr(fmt, "name", None) != "BYPASSED" or backend is None:
        return None
    is_trtllm = getattr(backend, "is_flashinfer_trtllm", None)
    if not callable(is_trtllm) or not is_trtllm():
        return None
    cfg.output_format = type(fmt).STANDARD
    runtime.log_once("routed_topk", logging.INFO, "xshare: %s runner: routing through select_experts and its "
                     "routed kernels so the selector sees it (XSHARE_ROUTED_TOPK=0 keeps SGLang's bypass)",
                     getattr(backend, "value", backend))
    return None


# -- DeepEP global mode: zero-token ranks ----------------------------------------------------------
def empty_topk_output_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``TopK.empty_topk_output(self, device, *, layer_id=None)``: join the layer's all-reduce."""
    runtime = state_mod.get()
    if runtime is None or runtime.all_reduce is None or not runtime.scattered_input:
        return None
    if getattr(self, "is_draft", False) or not runtime.settings.enabled:
        return None
    state = runtime.current
    if state is None or not state.global_applies:
        return None
    device = args[0] if args else kwargs.get("device", "cpu")
    num_experts = runtime.num_experts_hint
    if num_experts is None:
        runtime.log_once("no_e", logging.ERROR, "xshare: global mode cannot join: unknown number of experts")
        return None
    join_empty(num_experts, runtime.all_reduce, device)
    runtime.skip("empty_rank_joined")
    return None
