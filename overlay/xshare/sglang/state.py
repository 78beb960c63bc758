"""The plugin's per-process state: one :class:`ProcessState` per SGLang scheduler process, and the
:class:`ForwardState` of the forward running in it.

What flows through it: the active :class:`~xshare.sglang.settings.PluginSettings` (swapped at run time
by the admin endpoint through :meth:`ProcessState.set_config`), the per-layer device knobs the selector
reads (:class:`~xshare.selection.knobs.SelectorKnobs`), the device buffers a captured CUDA graph reads
(request id of every row, the exact-routing mask, the real-row count), the facts of the process that
SGLang tells the hooks once (a2a backend, attention DP, two-batch overlap, the MoE layer ids), the
counters (:class:`~xshare.sglang.observe.stats.SelectorStats`), the placement cache and the optional
trace recorder.

Writers: the hooks (:mod:`xshare.sglang.hooks`) fill the process facts and push/pop the forward
state; the admin path (:mod:`xshare.sglang.admin`) swaps the settings and the group view; the routing
decision (:mod:`xshare.sglang.layer`) only reads, and adds to the counters. This module imports
neither of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from xshare.selection import SelectorConfig
from xshare.selection.backends.c.kernel import cpu_kernel_available, cpu_kernel_problem
from xshare.selection.call import AllReduce
from xshare.selection.knobs import SelectorKnobs
from xshare.sglang.deferred_gate import DeferredGate
from xshare.sglang.faults import FaultInjector
from xshare.sglang.observe.stats import SelectorStats
from xshare.sglang.observe.trace import TraceRecorder
from xshare.sglang.placement import PlacementCache
from xshare.sglang.replicas import ReplicaPlanner
from xshare.sglang.settings import PluginSettings
from xshare.sglang.state_config import ConfigChanges, Staged

log = logging.getLogger("xshare.sglang")

MODES_DEFAULT = ("decode", "target_verify")
DRAFT_MODES = ("draft_decode", "draft_extend")  # a draft worker's forwards the selector takes with XSHARE_DRAFT_LAYERS
# Rows of the persistent exact-routing buffer that CUDA graphs read (larger eager batches get their own).
EXACT_BUFFER_ROWS = 8192

__all__ = ["EXACT_BUFFER_ROWS", "ForwardState", "MODES_DEFAULT", "MetricsSink", "ProcessState", "get", "install",
           "uninstall"]


class MetricsSink(Protocol):
    """What the state hands its metrics window to (:class:`xshare.sglang.observe.metrics.Exporter`)."""

    def flush(self, state: ProcessState) -> None: ...

    def config_changed(self, state: ProcessState) -> None: ...

    def config_change(self, result: str) -> None: ...


TBO_MICRO_BATCHES = 2  # SGLang's two-batch overlap splits a forward into two micro-batches

# selector settings that choose the code a CUDA graph captures (everything else is read from device knobs)
FROZEN_BY_CAPTURE = ("policy", "backend")


@dataclass
class ForwardState:
    """What the routing hook needs to know about the running forward (filled before it runs)."""

    mode: str  # decode | target_verify | extend | idle | other
    is_draft: bool = False
    tokens_per_req: int = 1
    groups: Tensor | None = None  # int64 [rows]: request index of each row (device)
    exact: Tensor | None = None  # bool [rows]: rows of requests asking for exact routing (device), or None
    exact_unknown: bool = False  # some request asked for exact routing but its rows could not be told
    unmapped: str | None = None  # verify rows that cannot be mapped to requests: why (xshare.sglang.verify_layout)
    capturing: bool = False  # inside CUDA-graph capture: host-side decisions are baked in
    # int32 [1] on the device: the forward's real rows (rows past them are graph padding), for calls where
    # SGLang passes no num_token_non_padded (no EP, no DP gather); filled before every forward and replay
    real_rows: Tensor | None = None
    # rows of each MoE layer's calls so far in this pass over the layers: under two-batch overlap a layer
    # runs once per micro-batch (contiguous rows, in order), so a call's first row is what came before
    rows_seen: dict[int, int] = field(default_factory=dict)
    calls_seen: dict[int, int] = field(default_factory=dict)
    last_layer: int = -1

    def row_offset(self, layer_id: int, rows: int) -> int:
        """The forward row where this call of ``layer_id`` starts (0 unless the layer already ran on an
        earlier micro-batch of the same pass), and the call's rows counted. A call of an earlier layer than
        the last one starts a new pass over the model (SGLang runs a captured shape a few times under one
        capture), and so does a third call of one layer (two-batch overlap has two micro-batches)."""
        if layer_id < self.last_layer or self.calls_seen.get(layer_id, 0) == TBO_MICRO_BATCHES:
            self.rows_seen.clear()
            self.calls_seen.clear()
        self.last_layer = layer_id
        start = self.rows_seen.get(layer_id, 0)
        self.rows_seen[layer_id] = start + rows
        self.calls_seen[layer_id] = self.calls_seen.get(layer_id, 0) + 1
        return start
    global_mode: str | None = None  # forward mode of the whole DP group (DeepEP global mode)
    global_rows: int | None = None  # rows of the whole DP group
    global_applies: bool = False
    deferred_gate: DeferredGate | None = None  # the gate of the running layer call SGLang skipped (CPU)
    # this rank's own facts of the forward could not be read: it keeps SGLang's routing for its rows (and,
    # in DeepEP global mode, joins each layer's all-reduce with zeros where ``global_applies``)
    undecided: bool = False


class ProcessState(ConfigChanges):
    """The state of one scheduler process. Create with :func:`install`; read with :func:`get`."""

    def __init__(self, settings: PluginSettings, *, rank: int = 0) -> None:
        self._lock = threading.Lock()
        self.settings = settings
        self.rank = rank
        self.stats = SelectorStats()
        self._stack: list[ForwardState | None] = []
        self.current_topk: Any = None  # SGLang's TopK module running (triton_kernel runner routing only)
        self._knobs: dict[tuple, SelectorKnobs] = {}
        self._knobs_dirty = False  # settings changed since the knobs were last written (sync_knobs)
        self._group_buffers: dict[tuple, Tensor] = {}
        self._exact_buffers: dict[str, Tensor] = {}  # device -> bool [EXACT_BUFFER_ROWS] (CUDA graphs read it)
        self._exact_dirty: set[str] = set()  # devices whose buffer holds True rows
        self._prepared: set[tuple[int, int, str]] = set()  # (layer, E, device) with their device state built
        self.graphs_captured = 0  # SGLang's CUDA-graph captures of decode batches in this process
        self.two_batch_overlap = False  # SGLang runs each MoE layer once per micro-batch (--enable-two-batch-overlap)
        # attention DP with the MoE over the gathered rows of every DP rank (no all-to-all backend): the TP
        # ranks route the same rows and must decide alike, from facts they share only
        self.shared_rows = False
        self._real_rows: dict[str, Tensor] = {}  # device -> int32 [1] (real_rows_buffer)
        self._logged: set[str] = set()
        self.fault = FaultInjector()
        self.first_applied_logged = False
        self.applicable_forwards = 0  # forwards of a mode the selector applies to (xshare.sglang.observe.report)
        self.replicas = ReplicaPlanner()  # XSHARE_REPLICA_PLAN=predictive plans (xshare.sglang.hooks.model)
        self.placements = PlacementCache(lambda: self.settings.sim_gpus)
        # Set by the hooks once SGLang's runtime is up:
        self.all_reduce: AllReduce | None = None  # DeepEP global mode only
        # ... and whether it can run inside a captured CUDA graph (else captured forwards select per rank)
        self.all_reduce_in_graphs = True
        self.scattered_input: bool | None = None  # MoE rows are a DP-local shard (a2a backend)
        self.num_experts_hint: int | None = None
        self.moe_layers: tuple[int, ...] = ()  # the model's MoE layer ids (per-layer settings are indexed by them)
        self.trace: TraceRecorder | None = None
        # Observability (xshare.sglang.observe.metrics / xshare.sglang.admin): the config version, the
        # Prometheus exporter (only with SGLang's --enable-metrics) and the admin state directory.
        self.version = 0
        self.config_source = "start-up settings"  # or "persisted", "admin change" (GET /xshare/config)
        # The admin control path (xshare.sglang.admin.scheduler): this rank in the whole group, the
        # key that signs config messages (the message source checks it), every rank's state as of the
        # last change, and whether this rank is off its group's config (then it does not select).
        self.group_rank = rank
        self.channel_key = ""
        self.group_view: list[dict[str, Any]] | None = None
        self._diverged = False
        self.last_summary: dict[str, Any] | None = None
        self.metrics: MetricsSink | None = None
        self.observe = False  # record the per-call metric window (set by enable_observability)
        self.flush_pending = False  # flush at the end of this forward (the first applied call asks)
        self.last_flush = 0  # the forward count at the last flush
        self.staged: Staged | None = None  # set_config(at_forward=): taken, not in force yet
        self.idle_read = 0  # the forward count when the scheduler last went idle (report.scheduler_idle)
        if settings.trace_dir is not None:
            self.trace = TraceRecorder(settings.trace_dir, max_tokens=settings.trace_max_tokens,
                                       flush_tokens=settings.trace_flush_tokens, rank=rank)

    # -- settings (one holder; an admin endpoint can swap them) ----------------------------------
    def update_settings(self, settings: PluginSettings) -> None:
        """Swap the active settings (checked against every layer's device knobs first: a config they cannot
        take raises and changes nothing). The knobs themselves are written at the next forward boundary
        (:meth:`sync_knobs`, called by the forward hook on the forward's own stream before the model runs),
        so a replayed graph never switches budgets between its layers and every rank switches at the same
        step; a policy change takes effect in eager forwards and new captures."""
        with self._lock:
            self.check_settings(settings)
            self.settings = settings
            self._knobs_dirty = True

    def check_settings(self, settings: PluginSettings) -> None:
        """ValueError unless every layer's device knobs can take ``settings`` (nothing changes)."""
        for (_device, _e, _k, scoring, renorm, layer_id), knobs in self._knobs.items():
            knobs.check(self.layer_config(settings.selector, layer_id).replace(scoring=scoring, renormalize=renorm))

    def sync_knobs(self) -> None:
        """Write the settings in force into every layer's device knobs, if they changed since the last
        write: at a forward boundary, outside any capture (a write captured into a graph would undo later
        changes on every replay)."""
        self.promote_staged()
        if not self._knobs_dirty:
            return
        with self._lock:
            self._knobs_dirty = False
            try:
                self._write_knobs(self.settings, self.switch_on())
            except Exception as exc:  # noqa: BLE001 - checked when set; a forward never fails on the knobs
                self.log_once("sync_knobs", logging.ERROR, "xshare: writing the device knobs failed: %s", exc)

    def _write_knobs(self, settings: PluginSettings, switch: bool) -> None:
        for (_device, _e, _k, scoring, renorm, layer_id), knobs in self._knobs.items():
            layer = self.layer_config(settings.selector, layer_id).replace(scoring=scoring, renormalize=renorm)
            knobs.update(layer, enabled=switch)

    @property
    def diverged(self) -> bool:
        """This rank is off its group's config (admin): it keeps SGLang's routing, in eager forwards by
        not routing and in replayed CUDA graphs through the knobs' on/off switch."""
        return self._diverged

    @diverged.setter
    def diverged(self, value: bool) -> None:
        with self._lock:
            self._diverged = bool(value)
            self._knobs_dirty = True  # the switch follows at the next forward boundary (sync_knobs)

    def switch_on(self) -> bool:
        """The device on/off switch every layer's knobs hold: enabled and on the group's config."""
        return bool(self.settings.enabled and not self._diverged)

    def layer_config(self, config: SelectorConfig, layer_id: int) -> SelectorConfig:
        """``config`` with its per-layer settings resolved for MoE layer ``layer_id``."""
        return config.for_layer(layer_id, self.moe_layers)

    def knobs_for(self, config: SelectorConfig, num_experts: int, top_k: int, device: torch.device,
                  layer_id: int = 0) -> SelectorKnobs:
        """The device knobs of one MoE layer (per layer: budgets and target masses may differ by layer,
        and a captured graph keeps reading its layer's tensors as settings change)."""
        key = (str(device), num_experts, top_k, config.scoring, config.renormalize, layer_id)
        knobs = self._knobs.get(key)
        if knobs is None:
            knobs = SelectorKnobs.create(config, num_experts, top_k, device, enabled=self.switch_on())
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
        self.stats.mode = state.mode if state is not None else "other"

    def pop(self) -> ForwardState | None:
        state = self._stack.pop() if self._stack else None
        below = self.current
        self.stats.mode = below.mode if below is not None else "other"
        return state

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

    def exact_buffer(self, device: torch.device) -> Tensor:
        """bool [EXACT_BUFFER_ROWS]: the persistent per-row exact-routing mask of ``device``. Never
        reallocated, so a captured graph that read a slice of it reads each replay's flags."""
        key = str(device)
        buf = self._exact_buffers.get(key)
        if buf is None:
            buf = self._exact_buffers[key] = torch.zeros(EXACT_BUFFER_ROWS, dtype=torch.bool, device=device)
        return buf

    def prepare_layer(self, layer_id: int, num_experts: int, device: torch.device) -> None:
        """Build, once, the per-layer device state a call captured into a CUDA graph reads (the placement's
        device copy, the layer's statistics row, the metrics window): host work that capture forbids. The
        routing hook calls it on eager calls it does not route (the selector off), since SGLang's warm-up
        forwards run before its graphs are captured."""
        key = (layer_id, num_experts, str(device))
        if key in self._prepared:
            return
        self._prepared.add(key)
        placement = self.placements.for_layer(layer_id, num_experts, device)
        self.stats.prepare(layer_id, device, placement.num_gpus if self.observe else None)

    def capture_refusal(self, new: PluginSettings) -> str | None:
        """Why ``new`` cannot be applied while captured CUDA graphs are replayed, or None. A replay follows
        every number and the on/off switch (device knobs), but not which code was captured: the policy,
        the backend that routes a call, DeepEP's selection mode."""
        if not self.graphs_captured:
            return None
        old = self.settings
        changed = [f"{name} {getattr(old.selector, name)!r} -> {getattr(new.selector, name)!r}"
                   for name in FROZEN_BY_CAPTURE if getattr(old.selector, name) != getattr(new.selector, name)]
        if old.deepep_mode != new.deepep_mode:
            changed.append(f"deepep_mode {old.deepep_mode!r} -> {new.deepep_mode!r}")
        if not changed:
            return None
        return (f"{'; '.join(changed)}: this server replays CUDA graphs captured with the old value, which run "
                "its code whatever the settings say; restart with the new value (or serve with "
                "--cuda-graph-backend-decode disabled to change it at run time)")

    def prepare_device(self, device: torch.device) -> None:
        """Build the device-wide buffers a captured graph reads (the exact-routing mask, the real-row
        count) before a capture: made inside one, their fill would be recorded and would overwrite them
        on every replay."""
        self.exact_buffer(device)
        self.real_rows_buffer(device)

    def fill_real_rows(self, device: torch.device, rows: int) -> None:
        """Write one forward's real rows into ``device``'s count, if a capture made one (else nothing reads it)."""
        buf = self._real_rows.get(str(device))
        if buf is not None:
            buf.fill_(rows)

    def real_rows_buffer(self, device: torch.device) -> Tensor:
        """int32 [1]: the persistent real-row count of ``device`` (:attr:`ForwardState.real_rows`), never
        reallocated, so a captured graph reads each replay's count."""
        key = str(device)
        buf = self._real_rows.get(key)
        if buf is None:
            buf = self._real_rows[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return buf

    def exact_rows(self, flags: list[bool] | None, rows_per_req: list[int] | int,
                   device: torch.device) -> Tensor | None:
        """The exact-routing mask of one forward, filled on the device before the model runs: one
        host-to-device copy of the per-row flags into the persistent buffer (expanded from the per-request
        ``flags`` on the host: per request, never per token), or None when no request asks. A buffer
        that held True rows is cleared first, so a replayed graph never reads stale flags."""
        key = str(device)
        buf = self._exact_buffers.get(key)
        if flags is None:
            if buf is not None and key in self._exact_dirty:
                buf.zero_()
                self._exact_dirty.discard(key)
            return None
        counts = torch.as_tensor(rows_per_req if isinstance(rows_per_req, list) else [rows_per_req] * len(flags))
        host = torch.repeat_interleave(torch.tensor(flags, dtype=torch.bool), counts)
        n = int(host.shape[0])
        self.stats.count_exact_tokens(int(host.sum()))
        if n > EXACT_BUFFER_ROWS:  # larger than any captured graph: an eager forward, its own tensor
            return host.to(device)
        buf = self.exact_buffer(device)
        if key in self._exact_dirty:
            buf[n:].zero_()
        buf[:n].copy_(host, non_blocking=True)
        self._exact_dirty.add(key)
        return buf[:n]

    def modes(self) -> tuple[str, ...]:
        s = self.settings
        draft = (DRAFT_MODES + (("draft_prefill",) if s.apply_prefill else ())) if s.draft_layers else ()
        return MODES_DEFAULT + (("extend",) if s.apply_prefill else ()) + draft

    # -- observability ------------------------------------------------------------------------------
    def enable_observability(self, exporter: MetricsSink) -> None:
        """Record the per-call window and flush it to ``exporter``."""
        self.metrics = exporter
        self.observe = True
        exporter.config_changed(self)

    def flush_metrics(self, *, wait: bool = True) -> None:
        """Collect the device figures (:meth:`SelectorStats.collect`) and hand the window to the exporter.
        ``wait=False`` at a forward boundary while serving: nothing waits for the device, the flush
        reports what the last arrived snapshot brought. ``wait=True`` (the default, for callers where no
        forward runs: the scheduler idle, an admin change): exact, waiting for the device."""
        if self.metrics is None:
            return
        self.flush_pending = False
        self.last_flush = self.stats.forwards
        try:
            self.stats.collect(wait=wait)
            self.metrics.flush(self)
        except Exception as exc:  # noqa: BLE001 - metrics never break serving
            self.log_once("metrics_flush", logging.ERROR, "xshare: metrics flush failed: %s", exc, exc_info=True)

    # -- read by the routing decision (xshare.sglang.layer) -----------------------------------------
    def skip(self, reason: str) -> None:
        self.stats.count_skip(reason)

    def global_mode(self) -> bool:
        """DeepEP global mode is on: MoE rows are DP-local and the group shares one set per layer."""
        return bool(self.scattered_input and self.settings.deepep_mode == "global" and self.all_reduce is not None)

    def cpu_kernel_ready(self) -> bool:
        """Whether the C fast path is built and on (builds it on the first call; says once why not)."""
        if not self.settings.cpu_kernel:
            return False
        if cpu_kernel_available():
            return True
        self.log_once("cpu_kernel", logging.WARNING, "xshare: the CPU fast path is unavailable (%s); "
                      "the torch reference routes instead", cpu_kernel_problem())
        return False


_STATE: ProcessState | None = None


def install(settings: PluginSettings, *, rank: int = 0) -> ProcessState:
    """Create this process's state (replacing any previous one)."""
    global _STATE
    _STATE = ProcessState(settings, rank=rank)
    return _STATE


def get() -> ProcessState | None:
    """This process's state, or None where the plugin installed none (not a scheduler, selector off)."""
    return _STATE


def uninstall() -> None:
    global _STATE
    _STATE = None
