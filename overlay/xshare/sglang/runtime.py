"""The plugin's per-process state: one :class:`Runtime` per SGLang scheduler process.

It holds the active settings (swappable at run time through :meth:`Runtime.update_settings`, for a
later admin endpoint), the device knobs the selector reads, the counters, the per-forward state
filled before the model runs (forward mode, request id of every row), cached GPU placements and
the optional trace recorder; and it does the routing decision of one MoE layer call
(:meth:`Runtime.route`). Apart from reading a few attributes of the objects SGLang passes in
(duck typing), nothing here imports sglang: :mod:`xshare.sglang.hooks` adapts SGLang's calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xshare.selection import Placement, SelectorConfig, get_policy
from xshare.selection.common import active_experts
from xshare.selection.kernels.cpu import (
    cpu_figures,
    cpu_kernel_available,
    cpu_kernel_problem,
    cpu_kernel_supports,
    cpu_route,
)
from xshare.selection.knobs import SelectorKnobs
from xshare.sglang import selecting
from xshare.sglang.global_stats import AllReduce, finish_global, prepare_global
from xshare.sglang.settings import PluginSettings
from xshare.sglang.stats import SelectorStats, call_figures, write_json_atomic
from xshare.sglang.trace import TraceRecorder

log = logging.getLogger("xshare.sglang")

MODES_DEFAULT = ("decode", "target_verify")


class InjectedFault(RuntimeError):
    """Raised inside the selector by XSHARE_FAULT_INJECT (tests)."""


@dataclass
class ForwardState:
    """What the routing hook needs to know about the running forward (filled before it runs)."""

    mode: str  # decode | target_verify | extend | idle | other
    is_draft: bool = False
    tokens_per_req: int = 1
    groups: Tensor | None = None  # int64 [rows]: request index of each row (device)
    capturing: bool = False  # inside CUDA-graph capture: host-side decisions are baked in
    global_mode: str | None = None  # forward mode of the whole DP group (DeepEP global mode)
    global_rows: int | None = None  # rows of the whole DP group
    global_applies: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """Per-process holder. Create with :func:`install`; read with :func:`get`."""

    def __init__(self, settings: PluginSettings, *, rank: int = 0) -> None:
        self._lock = threading.Lock()
        self.settings = settings
        self.rank = rank
        self.stats = SelectorStats()
        self._stack: list[ForwardState | None] = []
        self._knobs: dict[tuple, SelectorKnobs] = {}
        self._configs: dict[tuple, SelectorConfig] = {}
        self._placements: dict[int, tuple[Tensor | None, Placement]] = {}
        self._sim_placements: dict[tuple[int, int], Placement] = {}  # contiguous stand-ins, by (E, GPUs)
        self._group_buffers: dict[tuple, Tensor] = {}
        self._logged: set[str] = set()
        self._fault_calls = 0
        self.first_applied_logged = False
        # Set by the hooks once SGLang's runtime is up:
        self.placement_source: Callable[[int, int], Placement | None] | None = None
        self.all_reduce: AllReduce | None = None  # DeepEP global mode only
        self.scattered_input: bool | None = None  # MoE rows are a DP-local shard (a2a backend)
        self.num_experts_hint: int | None = None
        self.trace: TraceRecorder | None = None
        # Observability (xshare.sglang.metrics / xshare.sglang.admin): the config version, the
        # Prometheus exporter (only with SGLang's --enable-metrics) and the admin state directory.
        self.version = 0
        self.metrics: Any = None
        self.observe = False  # record the per-call metric window (set by enable_observability)
        self._flush_pending = False
        self._last_flush = 0
        if settings.trace_dir is not None:
            self.trace = TraceRecorder(settings.trace_dir, max_tokens=settings.trace_max_tokens,
                                       flush_tokens=settings.trace_flush_tokens, rank=rank)

    # -- settings (one holder; an admin endpoint can swap them) ----------------------------------
    def update_settings(self, settings: PluginSettings) -> None:
        """Swap the active settings; device knobs are updated in place (CUDA-graph safe for the
        numeric settings; a policy change takes effect in eager forwards and new captures)."""
        with self._lock:
            self._configs.clear()
            for (_device, _e, _k, scoring, renorm), knobs in self._knobs.items():
                knobs.update(self._layer_config(settings.selector, scoring, renorm), enabled=settings.enabled)
            self.settings = settings

    def _layer_config(self, base: SelectorConfig, scoring: str, renormalize: bool) -> SelectorConfig:
        key = (id(base), scoring, renormalize)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = base.replace(scoring=scoring, renormalize=bool(renormalize))
            self._configs[key] = cfg
        return cfg

    def knobs_for(self, config: SelectorConfig, num_experts: int, top_k: int, device: torch.device) -> SelectorKnobs:
        key = (str(device), num_experts, top_k, config.scoring, config.renormalize)
        knobs = self._knobs.get(key)
        if knobs is None:
            knobs = SelectorKnobs.create(config, num_experts, top_k, device, enabled=self.settings.enabled)
            self._knobs[key] = knobs
        return knobs

    # -- logging ----------------------------------------------------------------------------------
    def log_once(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(level, msg, *args, exc_info=exc_info)

    # -- per-forward state ----------------------------------------------------------------------
    def push(self, state: ForwardState | None) -> None:
        self._stack.append(state)

    def pop(self) -> ForwardState | None:
        return self._stack.pop() if self._stack else None

    @property
    def current(self) -> ForwardState | None:
        return self._stack[-1] if self._stack else None

    def group_ids(self, num_rows: int, tokens_per_req: int, device: torch.device) -> Tensor:
        """int64 [num_rows]: row i belongs to request i // tokens_per_req (a slice of a persistent
        device buffer, refilled only when it must grow)."""
        key = (str(device), max(1, tokens_per_req))
        buf = self._group_buffers.get(key)
        if buf is None or buf.shape[0] < num_rows:
            size = max(num_rows, 256 if buf is None else 2 * buf.shape[0])
            buf = torch.div(torch.arange(size, device=device), key[1], rounding_mode="floor")
            self._group_buffers[key] = buf
        return buf[:num_rows]

    def modes(self) -> tuple[str, ...]:
        return MODES_DEFAULT + (("extend",) if self.settings.apply_prefill else ())

    def forward_ended(self, state: ForwardState | None) -> None:
        self.stats.count_forward()
        if self.trace is not None and state is not None and not state.capturing:
            self.trace.end_forward()
        s = self.settings
        if s.stats_dir is not None and self.stats.forwards % s.stats_every == 0:
            self.write_stats()
        if self.observe and (self._flush_pending or self.stats.forwards - self._last_flush >= s.metrics_flush_every):
            self.flush_metrics()

    def write_stats(self) -> None:
        s = self.settings
        if s.stats_dir is None:
            return
        snap = self.stats.snapshot()
        snap.update({"rank": self.rank, "settings": s.describe(), "enabled": s.enabled,
                     "policy": s.selector.policy, "budget": s.selector.budget})
        write_json_atomic(s.stats_dir / f"xshare-stats-{os.getpid()}.json", snap)

    # -- observability ------------------------------------------------------------------------------
    def enable_observability(self, exporter: Any) -> None:
        """Record the per-call window and flush it to ``exporter`` (:class:`xshare.sglang.metrics.Exporter`)."""
        self.metrics = exporter
        self.observe = True
        exporter.config_changed(self)

    def flush_metrics(self) -> None:
        """Drain the device window into the exporter (the only host synchronisation of the metrics)."""
        if self.metrics is None:
            return
        self._flush_pending = False
        self._last_flush = self.stats.forwards
        try:
            self.metrics.flush(self)
        except Exception as exc:  # noqa: BLE001 - metrics never break serving
            self.log_once("metrics_flush", logging.ERROR, "xshare: metrics flush failed: %s", exc, exc_info=True)

    def set_config(self, settings: PluginSettings, version: int) -> None:
        """Apply a config from the admin endpoint (at a forward-batch boundary) and report it."""
        self.update_settings(settings)
        self.version = version
        if self.metrics is not None:
            self.metrics.config_changed(self)

    def effective_config(self) -> dict[str, Any]:
        s = self.settings
        out = s.selector.to_dict()
        out["enabled"] = s.enabled
        return out

    # -- placement for GPU-aware policies ----------------------------------------------------------
    def placement_for(self, layer_id: int, num_experts: int, device: torch.device) -> Placement:
        placement = self.placement_source(layer_id, num_experts) if self.placement_source else None
        if placement is None:
            key = (num_experts, self.settings.sim_gpus or 1)
            placement = self._sim_placements.get(key)
            if placement is None:
                placement = self._sim_placements[key] = Placement.contiguous(*key)
        if placement.slot_gpu.device != device:
            placement = placement.to(device)
        return placement

    # -- the routing decision ---------------------------------------------------------------------
    def _fault(self) -> None:
        mode = self.settings.fault_inject
        if mode is None:
            return
        self._fault_calls += 1
        if mode == "always" or (mode.startswith("every:") and self._fault_calls % int(mode[6:]) == 0):
            raise InjectedFault(f"XSHARE_FAULT_INJECT={mode} (call {self._fault_calls})")

    def skip(self, reason: str) -> None:
        self.stats.count_skip(reason)

    def route(self, args: dict[str, Any], *, topk_config: Any) -> dict[str, Any] | None:
        """Decide one ``_post_process_topk_ids`` call. Returns replacement arguments, or None to
        leave SGLang's routing unchanged. Never raises: a failure is logged once, counted and
        routed by SGLang's own top-k."""
        self.stats.count_call()
        s = self.settings
        state = self.current
        if not s.enabled:
            self.skip("disabled")
            return None
        if not getattr(topk_config, "allow_routed_experts_capture", True) or (state is not None and state.is_draft):
            self.skip("draft_layer")
            return None
        if state is None:
            self.skip("no_forward_state")
            return None
        global_mode = self.scattered_input and s.deepep_mode == "global" and self.all_reduce is not None
        if global_mode:
            if not state.global_applies:
                self.skip("not_applicable_global")
                return None
        elif state.mode not in self.modes():
            self.skip(f"mode_{state.mode}")
            return None
        unsupported = _unsupported_routing(topk_config)
        if unsupported is not None:
            self.log_once(f"unsupported:{unsupported}", logging.WARNING,
                          "xshare: layer routing uses %s; the selector leaves such layers to SGLang", unsupported)
            self.skip(f"unsupported_{unsupported}")
            if global_mode:  # still join the group's all-reduce
                self._join(args["router_logits"].shape[1], args["router_logits"].device)
            return None
        topk_ids: Tensor = args["topk_ids"]
        num_rows = topk_ids.shape[0]
        logits: Tensor = args["router_logits"]
        if not global_mode:
            if num_rows == 0:
                self.skip("empty")
                return None
            if logits.ndim != 2 or logits.shape[0] != num_rows:
                self.skip("no_router_logits")
                return None
            if not state.capturing and not s.selector.applies_to(num_rows):
                self.skip("batch_size")
                return None
        try:
            t0 = time.perf_counter()
            out = self._route(args, topk_config, state, global_mode)
            if self.observe and out is not None:
                self.stats.record_seconds(time.perf_counter() - t0)
            return out
        except Exception as exc:  # serving never fails because of the selector
            reason = type(exc).__name__
            self.stats.count_fallback(reason)
            self.log_once(f"fallback:{reason}", logging.ERROR,
                          "xshare: selector failed (%s: %s); routing this call with SGLang's top-k "
                          "(logged once per error type, counted in fallbacks)", reason, exc, exc_info=True)
            return None

    def _first_applied(self) -> None:
        if not self.first_applied_logged:
            self.first_applied_logged = True
            self._flush_pending = True
            log.info("xshare: selector active in scheduler pid %d (rank %d): %s", os.getpid(), self.rank,
                     self.settings.describe())
            if self.settings.stats_dir is not None:
                self.write_stats()

    def cpu_kernel_ready(self) -> bool:
        """Whether the C fast path is built and on (builds it on the first call; says once why not)."""
        if not self.settings.cpu_kernel:
            return False
        if cpu_kernel_available():
            return True
        self.log_once("cpu_kernel", logging.WARNING, "xshare: the CPU fast path is unavailable (%s); "
                      "the torch reference routes instead", cpu_kernel_problem())
        return False

    def _use_cpu_kernel(self, config: SelectorConfig, logits: Tensor, state: ForwardState) -> bool:
        """The C fast path serves this call: CPU tensors, a policy it implements, and it builds here."""
        return not state.capturing and cpu_kernel_supports(config, logits) and self.cpu_kernel_ready()

    def _route_cpu(self, args: dict[str, Any], config: SelectorConfig, layer_id: int, top_k: int, shared: int,
                   topk_config: Any) -> dict:
        """The same decision as the torch path below, in one C call (xshare.selection.kernels.cpu);
        the per-call figures are host numbers (the CPU is the host: nothing to keep on a device)."""
        topk_ids: Tensor = args["topk_ids"]
        logits: Tensor = args["router_logits"]
        num_experts = logits.shape[1]
        self._fault()
        res = cpu_route(logits, top_k, config, prefer=topk_ids[:, :top_k] if shared else topk_ids,
                        num_tokens=args.get("num_token_non_padded"))
        routing = res.routing
        self.stats.record_layer_host(layer_id, int(routing.active.sum()), int(res.vanilla_active.sum()),
                                     res.num_valid, res.changed_tokens, res.checksum)
        if self.observe:
            mp = self.placement_for(layer_id, num_experts, logits.device)
            self.stats.record_figures(cpu_figures(res, layer_id, mp.primary_gpu, mp.num_gpus))
        self._first_applied()
        return _merge_routing(topk_ids, args["topk_weights"], top_k, routing.topk_ids, routing.topk_weights,
                              topk_config)

    def _join(self, num_experts: int, device: torch.device) -> None:
        from xshare.sglang.global_stats import join_empty

        join_empty(num_experts, self.all_reduce, device)

    def _route(self, args: dict[str, Any], topk_config: Any, state: ForwardState, global_mode: bool) -> dict | None:
        s = self.settings
        topk_ids: Tensor = args["topk_ids"]
        topk_weights: Tensor = args["topk_weights"]
        logits: Tensor = args["router_logits"]
        layer_id = int(args.get("layer_id") or 0)
        num_token_non_padded = args.get("num_token_non_padded")
        num_rows, width = topk_ids.shape
        shared = int(getattr(topk_config, "num_shared_topk_slots", 0) or 0)
        top_k = width - shared if (shared and width == topk_config.top_k) else width
        num_experts = logits.shape[1]
        scoring = getattr(topk_config, "scoring_func", "softmax")
        config = self._layer_config(s.selector, scoring, bool(getattr(topk_config, "renormalize", True)))
        policy = get_policy(config.policy)
        if self.trace is not None and not state.capturing and num_rows:
            self.trace.add_layer(layer_id, logits, top_k, scoring)
        if not global_mode and self._use_cpu_kernel(config, logits, state):
            return self._route_cpu(args, config, layer_id, top_k, shared, topk_config)
        placement = self.placement_for(layer_id, num_experts, logits.device) if policy.needs_placement else None

        if global_mode:
            # Every rank joins the all-reduce, even if its own part failed: otherwise the group hangs.
            try:
                batch, local = prepare_global(logits, top_k, config, sglang_ids=topk_ids[:, :top_k],
                                              placement=placement, num_tokens=num_token_non_padded)
            except Exception:
                self._join(num_experts, logits.device)
                raise
            group_stats = self.all_reduce(local)
            self._fault()
            routing = finish_global(batch, group_stats, config)
        else:
            knobs = self.knobs_for(config, num_experts, top_k, logits.device)
            groups = None
            if config.policy == "xshare_spec" and num_rows:
                groups = state.groups if state.groups is not None and state.groups.shape[0] == num_rows else \
                    self.group_ids(num_rows, state.tokens_per_req, logits.device)
            self._fault()
            batch = selecting.prepare(logits, top_k, config, sglang_ids=topk_ids[:, :top_k], groups=groups,
                                      placement=placement, num_tokens=num_token_non_padded, knobs=knobs)
            routing = selecting.finish(batch, config, num_tokens=num_token_non_padded, knobs=knobs)

        new_ids = routing.topk_ids if routing.physical_ids is None else routing.physical_ids
        out = _merge_routing(topk_ids, topk_weights, top_k, new_ids, routing.topk_weights, topk_config)

        valid = _valid_rows(num_rows, num_token_non_padded, logits.device)
        old_ids = topk_ids[:, :top_k].to(torch.int64)
        vanilla = active_experts(old_ids.clamp_min(0), valid, num_experts)
        changed = (torch.sort(old_ids, 1).values != torch.sort(routing.topk_ids.to(torch.int64), 1).values).any(1)
        self.stats.record_layer(layer_id, routing.active, vanilla, valid.sum(), (changed & valid).sum(),
                                _checksum(routing.topk_ids, valid))
        if self.observe:
            mp = placement if placement is not None else self.placement_for(layer_id, num_experts, logits.device)
            self.stats.record_figures(call_figures(layer_id, logits, old_ids, routing.topk_ids, routing.active, vanilla,
                                                   valid, mp.primary_gpu, mp.num_gpus, scoring))
        self._first_applied()
        if routing.physical_ids is not None:
            # The policy chose the replicas itself (xshare_ep): SGLang must not remap them again.
            out["expert_location_dispatch_info"] = None
        return out


def _merge_routing(topk_ids: Tensor, topk_weights: Tensor, top_k: int, new_ids: Tensor, weights: Tensor,
                   topk_config: Any) -> dict[str, Tensor]:
    """SGLang's outputs with the first top_k columns replaced (shared-expert slots kept), out of place."""
    scale = _routed_scaling(topk_config)
    if scale is not None:
        weights = weights * scale
    if topk_ids.shape[1] == top_k:
        return {"topk_ids": new_ids.to(topk_ids.dtype), "topk_weights": weights.to(topk_weights.dtype)}
    ids_out = topk_ids.clone()
    w_out = topk_weights.clone()
    ids_out[:, :top_k] = new_ids.to(ids_out.dtype)
    w_out[:, :top_k] = weights.to(w_out.dtype)
    return {"topk_ids": ids_out, "topk_weights": w_out}


def _checksum(ids: Tensor, valid: Tensor) -> Tensor:
    """int64: sum over valid rows t and columns j of (id + 1) * (t + 1) * (j + 1) (order-sensitive)."""
    rows = torch.arange(1, ids.shape[0] + 1, device=ids.device).unsqueeze(1)
    cols = torch.arange(1, ids.shape[1] + 1, device=ids.device).unsqueeze(0)
    return ((ids.to(torch.int64) + 1) * rows * cols * valid.unsqueeze(1)).sum()


def _valid_rows(num_rows: int, num_token_non_padded: Tensor | int | None, device: torch.device) -> Tensor:
    rows = torch.arange(num_rows, device=device)
    if num_token_non_padded is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    return rows < torch.as_tensor(num_token_non_padded, device=device)


def _unsupported_routing(cfg: Any) -> str | None:
    """Why a layer's routing is outside what the selector reproduces (None = supported)."""
    if getattr(cfg, "custom_routing_function", None) is not None:
        return "custom_routing_function"
    if getattr(cfg, "correction_bias", None) is not None:
        return "correction_bias"
    if getattr(cfg, "scoring_func", "softmax") not in ("softmax", "sigmoid"):
        return f"scoring_{cfg.scoring_func}"
    if getattr(cfg, "use_grouped_topk", False):
        groups = getattr(cfg, "num_expert_group", None) or 1
        kept = getattr(cfg, "topk_group", None) or groups
        if groups > 1 and kept < groups:
            return "grouped_topk"
    return None


def _routed_scaling(cfg: Any) -> float | None:
    """The routed scaling factor SGLang already folded into topk_weights, if any."""
    factor = getattr(cfg, "routed_scaling_factor", None)
    if not factor or factor == 1.0:
        return None
    try:
        from sglang.srt.layers.moe.topk import is_routed_scaling_factor_fused_in_topk
    except ImportError:  # pragma: no cover - outside sglang
        fused = bool(getattr(cfg, "apply_routed_scaling_factor_on_output", False))
    else:
        fused = is_routed_scaling_factor_fused_in_topk(cfg)
    return float(factor) if fused else None


_RUNTIME: Runtime | None = None


def install(settings: PluginSettings, *, rank: int = 0) -> Runtime:
    """Create this process's runtime (replacing any previous one)."""
    global _RUNTIME
    _RUNTIME = Runtime(settings, rank=rank)
    return _RUNTIME


def get() -> Runtime | None:
    return _RUNTIME


def uninstall() -> None:
    global _RUNTIME
    _RUNTIME = None
