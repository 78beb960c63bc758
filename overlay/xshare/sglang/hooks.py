"""The functions registered with SGLang's ``HookRegistry`` (SGLang 0.5.23 targets).

* ``sglang.srt.layers.moe.topk._post_process_topk_ids`` (AROUND), the routing hook: rewrites the
  logical ``topk_ids``/``topk_weights`` of one MoE layer before SGLang maps them to physical
  experts, masks padded rows and records the expert distribution;
* ``sglang.srt.model_executor.model_runner.ModelRunner.forward`` (AROUND): fills the per-forward
  state (mode, draft worker, each row's request id) before the model runs; afterwards writes the
  stats file and ends the trace batch;
* ``...runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.capture_one_shape`` (AROUND): the same
  state while a decode / target-verify CUDA graph is captured;
* ``sglang.srt.layers.moe.topk.routing`` and ``TopK.forward_cuda`` (AROUND, only where the
  ``triton_kernels`` package imports): the routing of SGLang's ``triton_kernel`` MoE runner (GPT-OSS
  MXFP4 on Hopper), which never calls ``select_experts``;
* ``sglang.srt.layers.moe.topk.TopK.bind_runner_backend`` (AFTER, with ``XSHARE_ROUTED_TOPK`` on):
  Blackwell's ``flashinfer_trtllm`` runners route through ``select_experts`` instead of inside the
  MoE kernel;
* ``sglang.srt.model_executor.model_runner.ModelRunner.load_model`` (AFTER): the start-up coverage
  report (:mod:`xshare.sglang.coverage`) of the loaded model;
* ``sglang.srt.layers.moe.topk.TopK.empty_topk_output`` (AFTER, DeepEP global mode only): a
  zero-token rank joins the layer's all-reduce.

sglang is imported inside the functions only; this module reads the names of SGLang's forward-level
objects (forward batch, model runner, CUDA-graph runner), :mod:`xshare.sglang.topk_call` those of a
layer's top-k call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Any

import torch

from xshare.selection import get_policy
from xshare.selection.backends.global_mode import join_empty
from xshare.sglang import runtime as rt_mod
from xshare.sglang.model_shape import moe_layer_ids, moe_shape
from xshare.sglang.placement import sglang_placement
from xshare.sglang.runtime import ForwardState
from xshare.sglang.verify_layout import RAGGED_GRAPH, request_index, verify_rows

log = logging.getLogger("xshare.sglang")

TOPK_MODULE = "sglang.srt.layers.moe.topk"
POST_PROCESS_TARGET = f"{TOPK_MODULE}._post_process_topk_ids"
EMPTY_TOPK_TARGET = f"{TOPK_MODULE}.TopK.empty_topk_output"
FORWARD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
MOE_FORWARD_TARGET = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.forward"
TRITON_ROUTING_TARGET = f"{TOPK_MODULE}.routing"
TOPK_FORWARD_CUDA_TARGET = f"{TOPK_MODULE}.TopK.forward_cuda"
BIND_RUNNER_TARGET = f"{TOPK_MODULE}.TopK.bind_runner_backend"
LOAD_MODEL_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
CAPTURE_TARGET = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.capture_one_shape"
EPLB_UPDATE_TARGET = "sglang.srt.eplb.expert_location.ExpertLocationMetadata.update"

_BINDERS: dict[int, tuple[Any, inspect.Signature, tuple[str, ...] | None, dict[str, Any]]] = {}


def bind_arguments(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call of ``fn`` by parameter name, defaults filled in: what
    ``inspect.signature(fn).bind(*args, **kwargs)`` with ``apply_defaults()`` gives, and ``fn(**result)``
    is the same call. For a function whose parameters are all positional-or-keyword (SGLang's hooked
    functions) a dict built from the cached names, without ``inspect`` on the hot path (it costs tens
    of microseconds per MoE layer call); anything else through ``inspect``. Raises TypeError as
    ``bind`` does for arguments that do not fit."""
    hit = _BINDERS.get(id(fn))
    if hit is None or hit[0] is not fn:
        sig = inspect.signature(fn)
        plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())
        defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        hit = (fn, sig, tuple(sig.parameters) if plain else None, defaults)
        _BINDERS[id(fn)] = hit
    _fn, sig, names, defaults = hit
    if names is None:  # keyword-only, positional-only or variadic parameters: inspect's own rules
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)
    if len(args) > len(names):
        raise TypeError(f"{getattr(fn, '__name__', fn)}() takes {len(names)} arguments, {len(args)} given")
    out = dict(zip(names, args, strict=False))  # the leading parameters
    for name, value in kwargs.items():
        if name in out or name not in names:
            raise TypeError(f"{getattr(fn, '__name__', fn)}() got an unexpected or repeated argument {name!r}")
        out[name] = value
    if len(out) < len(names):
        for name in names:
            if name not in out:
                if name not in defaults:
                    raise TypeError(f"{getattr(fn, '__name__', fn)}() missing argument {name!r}")
                out[name] = defaults[name]
    return {name: out[name] for name in names}


# -- routing -------------------------------------------------------------------------------------
def post_process_topk_ids_hook(original: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``_post_process_topk_ids(topk_ids, topk_weights, topk_config, router_logits, layer_id,
    num_token_non_padded=None, expert_location_dispatch_info=None, padded_rows_masked=False)``."""
    runtime = rt_mod.get()
    if runtime is None:
        return original(*args, **kwargs)
    try:
        a = bind_arguments(original, args, kwargs)
    except TypeError as exc:  # a different SGLang signature: never break serving
        runtime.stats.count_fallback("signature")
        runtime.log_once("signature", logging.ERROR, "xshare: cannot bind _post_process_topk_ids arguments: %s", exc)
        return original(*args, **kwargs)
    changes = runtime.route(a, topk_config=a.get("topk_config"))
    if not changes:
        return original(*args, **kwargs)
    a.update(changes)
    return original(**a)


# -- per-forward state ---------------------------------------------------------------------------
def _mode_name(forward_mode: Any) -> str:
    if forward_mode is None:
        return "other"
    if forward_mode.is_target_verify():
        return "target_verify"
    if forward_mode.is_decode():
        return "decode"
    if forward_mode.is_idle():
        return "idle"
    if str(getattr(forward_mode, "name", "")).startswith("DRAFT_EXTEND"):  # a draft model's extend (EAGLE)
        return "draft_extend"
    if forward_mode.is_extend():  # EXTEND, MIXED (prefill chunks), DLLM_EXTEND, SPLIT_PREFILL
        return "extend"
    return "other"


def _tokens_per_req(forward_batch: Any, mode: str) -> int:
    if mode != "target_verify":
        return 1
    spec = getattr(forward_batch, "spec_info", None)
    for name in ("num_tokens_per_req", "draft_token_num"):
        v = getattr(spec, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1


def _init_process_facts(runtime: rt_mod.Runtime, model_runner: Any) -> None:
    """Once per process, after SGLang's runtime context exists: placement source, a2a, E."""
    if runtime.scattered_input is not None:
        return
    try:
        from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks

        runtime.scattered_input = bool(is_moe_input_scattered_across_dp_ranks())
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        runtime.scattered_input = False
        runtime.log_once("scattered", logging.WARNING, "xshare: cannot tell the MoE a2a backend (%s)", exc)
    hf = getattr(getattr(model_runner, "model_config", None), "hf_text_config", None)
    runtime.num_experts_hint = moe_shape(hf)[1]
    server_args = getattr(model_runner, "server_args", None)
    runtime.two_batch_overlap = bool(getattr(server_args, "enable_two_batch_overlap", False))
    runtime.shared_rows = not runtime.scattered_input and _attention_dp_size() > 1
    if not runtime.moe_layers:
        runtime.moe_layers = moe_layer_ids(hf)
    runtime.placements.source = functools.partial(sglang_placement, runtime.placements)
    # built (or loaded from the cache) now, not in the first decode step
    if str(getattr(model_runner, "device", "")) == "cpu" and runtime.cpu_kernel_ready():
        log.info("xshare: CPU selector kernel ready (set policies route in one C call)")
    if runtime.scattered_input and runtime.settings.deepep_mode == "global":
        from sglang.srt.distributed.parallel_state import get_moe_ep_group

        group = get_moe_ep_group()
        runtime.all_reduce = group.all_reduce
        log.info("xshare: DeepEP global mode: one all-reduce of 2E floats per MoE layer over the EP group")
    elif runtime.scattered_input:
        log.info("xshare: MoE rows are DP-local (a2a backend): per-rank local selection")


def _attention_dp_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(getattr(get_parallel(), "attn_dp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - no runtime context: no attention DP
        return 1


def _forward_state(runtime: rt_mod.Runtime, model_runner: Any, forward_batch: Any, *, capturing: bool) -> ForwardState:
    mode = _mode_name(getattr(forward_batch, "forward_mode", None))
    tpr = _tokens_per_req(forward_batch, mode)
    state = ForwardState(mode=mode, is_draft=bool(getattr(model_runner, "is_draft_worker", False)),
                         tokens_per_req=tpr, capturing=capturing)
    if runtime.shared_rows:  # the MoE runs in the DP group's mode, over every DP rank's rows
        state.global_mode = _mode_name(getattr(forward_batch, "global_forward_mode", None)
                                       or getattr(forward_batch, "forward_mode", None))
    if runtime.scattered_input and runtime.all_reduce is not None:
        gmode = _mode_name(getattr(forward_batch, "global_forward_mode", None) or forward_batch.forward_mode)
        counts = getattr(forward_batch, "global_num_tokens_cpu", None)
        rows = int(sum(counts)) if counts else None
        state.global_mode, state.global_rows = gmode, rows
        applies = gmode in runtime.modes() and not state.is_draft
        if applies and rows is not None and not capturing:
            applies = runtime.settings.selector.applies_to(rows)
        state.global_applies = applies
    return state


def _fill_groups(runtime: rt_mod.Runtime, state: ForwardState, forward_batch: Any) -> None:
    """The per-forward device buffer of request ids (one per row), filled before the model runs; a
    verify layout whose rows cannot be mapped leaves ``state.unmapped`` (the reason) instead."""
    if state.mode not in ("decode", "target_verify") or not get_policy(runtime.settings.selector.policy).uses_groups():
        return
    bs = int(getattr(forward_batch, "batch_size", 0) or 0)
    device = getattr(getattr(forward_batch, "input_ids", None), "device", None) or torch.device("cpu")
    if state.mode == "target_verify":
        rows = verify_rows(forward_batch, state.tokens_per_req)
        if rows.reason is not None:
            state.unmapped = rows.reason
            return
        if rows.counts is not None:
            state.groups = request_index(rows.counts, device)
            return
    state.groups = runtime.group_ids(bs * state.tokens_per_req, state.tokens_per_req, device)


def _fill_exact(runtime: rt_mod.Runtime, state: ForwardState, forward_batch: Any) -> None:
    """The per-forward device mask of exact-routed rows (requests with ``custom_params`` xshare_exact),
    filled before the model runs (:meth:`Runtime.exact_rows`); also clears the mask a CUDA graph reads."""
    from xshare.sglang.requests import EXACT_ATTR

    flags = getattr(forward_batch, EXACT_ATTR, None)
    device = getattr(getattr(forward_batch, "input_ids", None), "device", None) or torch.device("cpu")
    if flags is None or state.is_draft or state.mode not in runtime.modes() or not runtime.settings.enabled:
        runtime.exact_rows(None, 1, device)
        return
    state.exact_unknown = True  # until the mask is filled: the routing hook then leaves every layer alone
    if state.mode == "extend":
        per_req = getattr(forward_batch, "extend_seq_lens_cpu", None)
        if per_req is None or len(per_req) != len(flags):
            raise ValueError("exact routing: the prefill batch has no per-request lengths")
        rows: list[int] | int = [int(n) for n in per_req]
    else:
        rows = state.tokens_per_req
    state.exact = runtime.exact_rows(flags, rows, device)
    state.exact_unknown = False


def _fill_real_rows(runtime: rt_mod.Runtime, state: ForwardState, forward_batch: Any) -> None:
    """The forward's real rows (requests x tokens per request) into the device count a replayed graph
    reads where SGLang passes none (:meth:`Runtime.real_rows_buffer`; a fill, no host-to-device copy).
    Eager forwards have no padding rows."""
    if state.mode not in ("decode", "target_verify") or state.is_draft or runtime.shared_rows:
        return  # (attention DP: the MoE rows are the DP group's, this rank's count is not theirs)
    device = getattr(getattr(forward_batch, "input_ids", None), "device", None)
    bs = getattr(forward_batch, "batch_size", None)
    if device is None or not isinstance(bs, int):
        return
    runtime.fill_real_rows(device, bs * state.tokens_per_req)


def model_runner_forward_hook(original: Any, self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ModelRunner.forward(self, forward_batch, ...)``."""
    runtime = rt_mod.get()
    if runtime is None:
        return original(self, forward_batch, *args, **kwargs)
    state = None
    try:
        _init_process_facts(runtime, self)
        state = _forward_state(runtime, self, forward_batch, capturing=False)
        _fill_groups(runtime, state, forward_batch)
        _fill_exact(runtime, state, forward_batch)
        _fill_real_rows(runtime, state, forward_batch)
        if runtime.trace is not None and not state.is_draft and state.mode in runtime.modes():
            runtime.trace.begin_forward(getattr(forward_batch, "rids", None), state.tokens_per_req,
                                        getattr(forward_batch, "positions", None))
    except Exception as exc:  # noqa: BLE001 - the selector must never break a forward
        runtime.stats.count_fallback("forward_state")
        runtime.log_once("forward_state", logging.ERROR, "xshare: cannot read the forward batch: %s", exc,
                         exc_info=True)
    runtime.sync_knobs()  # a settings change reaches the device here, before this forward's kernels
    runtime.push(state)
    t0 = time.perf_counter()
    try:
        return original(self, forward_batch, *args, **kwargs)
    finally:
        if runtime.settings.profile:
            runtime.stats.record_forward_time(state.mode if state is not None else "unknown",
                                              time.perf_counter() - t0)
        runtime.pop()
        try:
            runtime.forward_ended(state)
        except rt_mod.CoverageRefused:
            raise  # XSHARE_REQUIRE_COVERAGE: the operator asked for a scheduler that stops
        except Exception as exc:  # noqa: BLE001
            runtime.log_once("forward_end", logging.ERROR, "xshare: end-of-forward bookkeeping failed: %s", exc,
                             exc_info=True)


def moe_forward_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``FusedMoE.forward`` (registered with XSHARE_PROFILE only): the MoE block's host time,
    per forward mode. On the CPU that is its compute time; on a GPU it is launch time (asynchronous)."""
    runtime = rt_mod.get()
    if runtime is None:
        return original(self, *args, **kwargs)
    t0 = time.perf_counter()
    try:
        return original(self, *args, **kwargs)
    finally:
        state = runtime.current
        runtime.stats.record_moe_time(state.mode if state is not None else "unknown", time.perf_counter() - t0)


def capture_one_shape_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``DecodeCudaGraphRunner.capture_one_shape``: the routing hook is traced into the graph
    with the captured mode (decode / target verify); batch-size limits are then read on the device."""
    runtime = rt_mod.get()
    if runtime is None:
        return original(self, *args, **kwargs)
    state = None
    try:
        mr = getattr(self, "model_runner", None)
        _init_process_facts(runtime, mr)
        mode = _mode_name(getattr(self, "capture_forward_mode", None))
        state = ForwardState(mode=mode, is_draft=bool(getattr(mr, "is_draft_worker", False)),
                             tokens_per_req=int(getattr(self, "captured_req_width", 1) or 1), capturing=True)
        device = getattr(mr, "device", None)
        if device is not None:  # before SGLang starts capturing: buffers the graph reads are made now
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:  # the tensors' own name ("cuda:N")
                device = torch.device("cuda", torch.cuda.current_device())
            runtime.prepare_device(device)
            if not runtime.shared_rows:
                state.real_rows = runtime.real_rows_buffer(device)
        if mode == "target_verify" and getattr(self, "ragged_verify_mode", None):
            state.unmapped = RAGGED_GRAPH  # per-replay row counts: no fixed row -> request map to capture
        if runtime.scattered_input and runtime.all_reduce is not None:
            state.global_mode, state.global_applies = mode, mode in runtime.modes() and not state.is_draft
    except Exception as exc:  # noqa: BLE001
        runtime.log_once("capture_state", logging.ERROR, "xshare: cannot read the capture state: %s", exc)
    runtime.sync_knobs()  # before SGLang captures: a write inside the capture would replay forever
    runtime.push(state)
    runtime.graphs_captured += 1  # from now on a settings change the graphs cannot follow is refused
    try:
        return original(self, *args, **kwargs)
    finally:
        runtime.pop()


# -- SGLang's triton_kernel MoE runner (GPT-OSS MXFP4 on Hopper) --------------------------------------
def triton_routing_available() -> bool:
    """Whether SGLang's ``triton_kernel`` runner can run here (the ``triton_kernels`` package imports),
    so that its routing function exists and the plugin hooks it."""
    import importlib.util

    try:
        return importlib.util.find_spec("triton_kernels") is not None
    except (ImportError, ValueError):
        return False


def topk_forward_cuda_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``TopK.forward_cuda(self, hidden_states, router_logits, ...)``: remembers the layer whose
    top-k runs, for :func:`triton_routing_hook` (SGLang's ``routing`` is not told the layer)."""
    runtime = rt_mod.get()
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
    runtime = rt_mod.get()
    layer = None if runtime is None else runtime.current_topk
    if layer is None:
        return original(logits, n_expts_act, *args, **kwargs)
    try:
        call = bind_arguments(original, (logits, n_expts_act, *args), kwargs)
    except TypeError:
        return original(logits, n_expts_act, *args, **kwargs)
    if call.get("expt_indx") is not None or call.get("simulated_ep", 1) != 1:
        return original(logits, n_expts_act, *args, **kwargs)
    from xshare.sglang.routing import route_logits

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
    runtime = rt_mod.get()
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


# -- EPLB ------------------------------------------------------------------------------------------
def expert_location_update_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ExpertLocationMetadata.update(self, other, update_layer_ids)``: EPLB rebalanced; the new
    placements of those layers are written into the device tensors the selector reads, in place, so
    the CUDA graphs captured before read them too (:meth:`~xshare.sglang.placement.PlacementCache.refresh`)."""
    runtime = rt_mod.get()
    if runtime is None:
        return None
    layer_ids = kwargs.get("update_layer_ids", args[1] if len(args) > 1 else None)
    try:
        rewritten = runtime.placements.refresh(layer_ids)
    except Exception as exc:  # noqa: BLE001 - a lookup after the rebalance refreshes the layer again
        runtime.log_once("eplb_refresh", logging.ERROR, "xshare: cannot refresh the placements after EPLB: %s", exc,
                         exc_info=True)
        return None
    if rewritten:
        log.info("xshare: EPLB rebalanced: %d layer placements rewritten in place", rewritten)
    return None


# -- the start-up coverage report ------------------------------------------------------------------
def load_model_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ModelRunner.load_model(self)``: the coverage report of the loaded model, before any
    request (a draft model's runner is not reported: its layers are always left to SGLang)."""
    runtime = rt_mod.get()
    if runtime is None or bool(getattr(self, "is_draft_worker", False)):
        return None
    try:
        from xshare.sglang.coverage import survey

        device_type = str(getattr(self, "device", "cpu")).split(":")[0]
        statuses = survey(getattr(self, "model", None), device_type)
    except Exception as exc:  # noqa: BLE001 - diagnostics only: serving goes on
        runtime.log_once("startup_coverage", logging.ERROR, "xshare: cannot survey the model's MoE layers: %s", exc,
                         exc_info=True)
        return None
    runtime.startup_coverage(statuses, device_type)  # raises CoverageRefused with XSHARE_REQUIRE_COVERAGE
    top_k, num_experts = moe_shape(getattr(getattr(self, "model_config", None), "hf_text_config", None))
    moe_layers = tuple(sorted(i for i, st in statuses.items() if st != "draft_layer"))
    runtime.check_model_settings(num_experts, top_k, moe_layers)  # raises SettingsRefused
    return None


# -- DeepEP global mode: zero-token ranks ----------------------------------------------------------
def empty_topk_output_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``TopK.empty_topk_output(self, device, *, layer_id=None)``: join the layer's all-reduce."""
    runtime = rt_mod.get()
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
