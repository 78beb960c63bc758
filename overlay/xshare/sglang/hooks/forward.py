"""The hooks on SGLang's forward passes (SGLang 0.5.23 targets): they fill the
:class:`~xshare.sglang.state.ForwardState` the routing decision reads, before the model runs.

* ``sglang.srt.model_executor.model_runner.ModelRunner.forward`` (AROUND): forward mode, draft worker,
  each row's request id, the exact-routing mask and the real-row count, filled before the model runs;
  a settings change reaches the device knobs here; afterwards the forward is reported
  (:func:`xshare.sglang.observe.report.forward_ended`);
* ``...runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.capture_one_shape`` (AROUND): the same
  state while a decode / target-verify CUDA graph is captured;
* ``sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.forward`` (AROUND, ``XSHARE_PROFILE`` only):
  the MoE block's host time.

sglang is imported inside the functions only; this module reads the names of SGLang's forward-level
objects (forward batch, model runner, CUDA-graph runner), :mod:`xshare.sglang.topk_call` those of a
layer's top-k call.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import torch

from xshare.selection import get_policy
from xshare.sglang import state as state_mod
from xshare.sglang.hooks.requests import EXACT_ATTR
from xshare.sglang.model_shape import moe_layer_ids, moe_shape
from xshare.sglang.observe import report
from xshare.sglang.placement import sglang_placement
from xshare.sglang.state import ForwardState, ProcessState
from xshare.sglang.verify_layout import RAGGED_GRAPH, request_index, verify_rows

log = logging.getLogger("xshare.sglang")

FORWARD_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
CAPTURE_TARGET = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.capture_one_shape"
MOE_FORWARD_TARGET = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE.forward"


_DRAFT_MODE_NAMES = {"decode": "draft_decode", "extend": "draft_prefill"}  # a draft worker's own names


def _mode_name(forward_mode: Any, *, draft: bool = False) -> str:
    """The forward's mode as the plugin counts it; a draft worker's forwards are ``draft_decode``,
    ``draft_extend`` (SGLang's DRAFT_EXTEND, after a verify) and ``draft_prefill`` (its own prefill)."""
    name = _target_mode_name(forward_mode)
    return _DRAFT_MODE_NAMES.get(name, name) if draft else name


def _target_mode_name(forward_mode: Any) -> str:
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


def _init_process_facts(runtime: ProcessState, model_runner: Any) -> None:
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
        runtime.all_reduce_in_graphs = graph_capable(group)
        log.info("xshare: DeepEP global mode: one all-reduce of 2E floats per MoE layer over the EP group")
        if not runtime.all_reduce_in_graphs:
            log.warning("xshare: DeepEP global mode: the EP group (--ep-size != --tp-size) has no pynccl or custom "
                        "all-reduce, which a CUDA-graph capture needs: captured forwards select per rank (local), "
                        "eager forwards over the whole group (--ep-size == --tp-size gives graphs global selection)")
    elif runtime.scattered_input:
        log.info("xshare: MoE rows are DP-local (a2a backend): per-rank local selection")


def graph_capable(group: Any) -> bool:
    """Whether SGLang's ``GroupCoordinator`` can all-reduce inside a captured CUDA graph: one rank, or a
    pynccl or custom all-reduce communicator (SGLang builds its ``moe_ep`` group without either when
    ``moe_ep_size != tp_size``; its graph capture uses them, not c10d's collectives)."""
    if int(getattr(group, "world_size", 1) or 1) <= 1:
        return True
    return getattr(group, "pynccl_comm", None) is not None or getattr(group, "ca_comm", None) is not None


def _attention_dp_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(getattr(get_parallel(), "attn_dp_size", 1) or 1)
    except Exception:  # noqa: BLE001 - no runtime context: no attention DP
        return 1


def _group_facts(runtime: ProcessState, model_runner: Any, forward_batch: Any, *, capturing: bool) -> ForwardState:
    """The state with the facts every rank of the group reads alike (replicated fields of the batch: the
    group's forward mode and row counts; the worker's kind): whether the group selects, and so joins each
    layer's all-reduce, in DeepEP global mode. This rank's own facts follow (:func:`_rank_facts`)."""
    state = ForwardState(mode="other", is_draft=bool(getattr(model_runner, "is_draft_worker", False)),
                         capturing=capturing)
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


def _rank_facts(runtime: ProcessState, state: ForwardState, forward_batch: Any) -> None:
    """This rank's own facts of the forward, filled before the model runs: its forward mode, request ids
    of its rows, the exact-routing mask, the real-row count; the trace's batch begun."""
    state.mode = _mode_name(getattr(forward_batch, "forward_mode", None), draft=state.is_draft)
    state.tokens_per_req = _tokens_per_req(forward_batch, state.mode)
    _fill_groups(runtime, state, forward_batch)
    _fill_exact(runtime, state, forward_batch)
    _fill_real_rows(runtime, state, forward_batch)
    if runtime.trace is not None and not state.is_draft and state.mode in runtime.modes():
        runtime.trace.begin_forward(getattr(forward_batch, "rids", None), state.tokens_per_req,
                                    getattr(forward_batch, "positions", None))


def _fill_groups(runtime: ProcessState, state: ForwardState, forward_batch: Any) -> None:
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


def _fill_exact(runtime: ProcessState, state: ForwardState, forward_batch: Any) -> None:
    """The per-forward device mask of exact-routed rows (requests with ``custom_params`` xshare_exact),
    filled before the model runs (:meth:`ProcessState.exact_rows`); also clears the mask a CUDA graph reads."""
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


def _fill_real_rows(runtime: ProcessState, state: ForwardState, forward_batch: Any) -> None:
    """The forward's real rows (requests x tokens per request) into the device count a replayed graph
    reads where SGLang passes none (:meth:`ProcessState.real_rows_buffer`; a fill, no host-to-device copy).
    Eager forwards have no padding rows."""
    if state.mode not in ("decode", "target_verify", "draft_decode") or runtime.shared_rows \
            or (state.is_draft and not runtime.settings.draft_layers):
        return  # (attention DP: the MoE rows are the DP group's, this rank's count is not theirs)
    device = getattr(getattr(forward_batch, "input_ids", None), "device", None)
    bs = getattr(forward_batch, "batch_size", None)
    if device is None or not isinstance(bs, int):
        return
    runtime.fill_real_rows(device, bs * state.tokens_per_req)


def model_runner_forward_hook(original: Any, self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ModelRunner.forward(self, forward_batch, ...)``."""
    runtime = state_mod.get()
    if runtime is None:
        return original(self, forward_batch, *args, **kwargs)
    state = None
    try:
        _init_process_facts(runtime, self)
        state = _group_facts(runtime, self, forward_batch, capturing=False)
    except Exception as exc:  # noqa: BLE001 - the selector must never break a forward
        # The process's and the group's facts come from what every rank of the group holds alike (SGLang's
        # set-up, the batch's replicated fields): if they cannot be read here, they cannot on any rank,
        # so no rank routes this forward and none waits in an all-reduce (each call: no_forward_state).
        _forward_state_failed(runtime, exc)
    if state is not None:
        try:
            _rank_facts(runtime, state, forward_batch)
        except Exception as exc:  # noqa: BLE001 - this rank cannot decide: SGLang's routing for its rows; in
            _forward_state_failed(runtime, exc)  # DeepEP global mode it still joins each layer's all-reduce
            state.undecided = True
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
            report.forward_ended(runtime, state)
        except report.CoverageRefused:
            raise  # XSHARE_REQUIRE_COVERAGE: the operator asked for a scheduler that stops
        except Exception as exc:  # noqa: BLE001 - the forward already ran: its bookkeeping never fails it
            runtime.log_once("forward_end", logging.ERROR, "xshare: end-of-forward bookkeeping failed: %s", exc,
                             exc_info=True)


def _forward_state_failed(runtime: ProcessState, exc: Exception) -> None:
    runtime.stats.count_fallback("forward_state")
    runtime.log_once("forward_state", logging.ERROR, "xshare: cannot read the forward batch: %s", exc, exc_info=True)


def moe_forward_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``FusedMoE.forward`` (registered with XSHARE_PROFILE only): the MoE block's host time,
    per forward mode. On the CPU that is its compute time; on a GPU it is launch time (asynchronous)."""
    runtime = state_mod.get()
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
    runtime = state_mod.get()
    if runtime is None:
        return original(self, *args, **kwargs)
    state = None
    try:
        mr = getattr(self, "model_runner", None)
        _init_process_facts(runtime, mr)
        draft = bool(getattr(mr, "is_draft_worker", False))
        mode = _mode_name(getattr(self, "capture_forward_mode", None), draft=draft)
        state = ForwardState(mode=mode, is_draft=draft,
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
        if runtime.scattered_input and runtime.all_reduce is not None and runtime.all_reduce_in_graphs:
            state.global_mode, state.global_applies = mode, mode in runtime.modes() and not state.is_draft
    except Exception as exc:  # noqa: BLE001 - a capture never fails on the plugin: its calls keep SGLang's top-k
        runtime.log_once("capture_state", logging.ERROR, "xshare: cannot read the capture state: %s", exc)
    runtime.sync_knobs()  # before SGLang captures: a write inside the capture would replay forever
    runtime.push(state)
    runtime.graphs_captured += 1  # from now on a settings change the graphs cannot follow is refused
    try:
        return original(self, *args, **kwargs)
    finally:
        runtime.pop()
