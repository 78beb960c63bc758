"""In-process counters of the selector, one :class:`SelectorStats` per scheduler process.

Host counters (calls, skips and fallbacks by reason) are plain ints. Per-layer sums that come from
device tensors (activated experts with and without the selector, tokens) accumulate in device
tensors, so the hot path never synchronises with the host; :meth:`SelectorStats.snapshot` reads them.
:meth:`snapshot` reads them.

The metrics window (:meth:`SelectorStats.record_figures` / :meth:`SelectorStats.drain_window`): one
row of per-call figures (:data:`WINDOW_FIELDS`, then activated experts and tokens per GPU) is written
into a persistent device ring buffer at a device-side index (``index_copy_``: no host
synchronisation, and CUDA-graph safe); the exporter drains it every N forwards, the only sync.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import torch
from torch import Tensor

# Columns of one window row; then num_gpus columns of activated experts per GPU, then num_gpus of tokens per GPU.
WINDOW_FIELDS = ("layer", "active", "vanilla_active", "peak_gpu", "vanilla_peak_gpu", "peak_mean_ratio",
                 "mass_kept", "top1_kept", "tokens")
WINDOW_CAPACITY = 8192  # rows kept between two drains (older rows are dropped and counted)
_LAYER_SUMS = ("calls", "activated", "vanilla_activated", "tokens", "changed_tokens", "checksum")


def routing_checksum(ids: Tensor, valid: Tensor) -> Tensor:
    """int64: sum over valid rows t and columns j of (id + 1) * (t + 1) * (j + 1): an order-sensitive
    digest of a layer's routing, compared across tensor-parallel ranks (the CPU kernel computes the
    same number in its routing pass)."""
    rows = torch.arange(1, ids.shape[0] + 1, device=ids.device).unsqueeze(1)
    cols = torch.arange(1, ids.shape[1] + 1, device=ids.device).unsqueeze(0)
    return ((ids.to(torch.int64) + 1) * rows * cols * valid.unsqueeze(1)).sum()


def cpu_call_figures(out: Any, layer_id: int, expert_gpu: Tensor, num_gpus: int) -> Tensor:
    """The window row of :func:`call_figures` for one CPU-kernel routing (``CpuRouting``), computed
    by the C library in one pass (float32 [len(WINDOW_FIELDS) + 2 * num_gpus])."""
    from xshare.selection.kernels.cpu import kernel_error, library

    lib = library()
    num_rows, num_experts = out.scores.shape
    top_k = out.routing.topk_ids.shape[1]
    if out.prefer is None:
        raise ValueError("cpu_call_figures needs the engine's own top-k (prefer)")
    gpu = expert_gpu.to(torch.int64).contiguous()
    row = torch.empty(len(WINDOW_FIELDS) + 2 * num_gpus, dtype=torch.float32)
    ptr = (lambda t: None if t is None else t.data_ptr())  # noqa: E731
    rc = lib.xshare_cpu_figures(num_rows, num_experts, top_k, out.prefer.shape[1], num_gpus, int(layer_id),
                                ptr(out.logits), ptr(out.scores), ptr(out.routing.topk_ids), ptr(out.prefer),
                                ptr(out.routing.active), ptr(out.vanilla_active), out.num_valid, ptr(gpu), ptr(row))
    if rc != 0:
        raise RuntimeError(kernel_error(rc))
    return row


def call_figures(layer_id: int, logits: Tensor, vanilla_ids: Tensor, chosen_ids: Tensor, active: Tensor,
                 vanilla_active: Tensor, valid: Tensor, expert_gpu: Tensor, num_gpus: int,
                 scoring: str = "softmax") -> Tensor:
    """One window row (float32 [len(WINDOW_FIELDS) + 2 * num_gpus], on the logits' device) for one applied call.

    ``vanilla_ids``/``chosen_ids`` int [T, k]: SGLang's own top-k and the policy's; ``active`` /
    ``vanilla_active`` bool [E]; ``valid`` bool [T] (non-padded rows); ``expert_gpu`` int64 [E]: the
    GPU of each logical expert. Mass kept: per token, the gate probability of its chosen experts over
    that of its own top-k, averaged over valid tokens; top-1 kept: the share of valid tokens whose
    highest-scoring expert is among their chosen ones. Pure tensor ops, no host synchronisation.
    """
    dev = logits.device
    lg = logits.float()
    probs = torch.softmax(lg, dim=-1) if scoring == "softmax" else torch.sigmoid(lg)
    chosen = chosen_ids.to(torch.int64).clamp(0, lg.shape[1] - 1)
    vanilla = vanilla_ids.to(torch.int64).clamp(0, lg.shape[1] - 1)
    validf = valid.to(torch.float32)
    n_valid = validf.sum().clamp_min(1.0)
    kept = probs.gather(1, chosen).sum(1) / probs.gather(1, vanilla).sum(1).clamp_min(1e-30)
    mass_kept = (kept.clamp(max=1.0) * validf).sum() / n_valid
    top1 = lg.argmax(1, keepdim=True)
    top1_kept = ((chosen == top1).any(1).to(torch.float32) * validf).sum() / n_valid
    gpu = expert_gpu.to(device=dev, dtype=torch.int64)
    gpu_active = torch.zeros(num_gpus, device=dev).index_add_(0, gpu, active.to(torch.float32))
    gpu_vanilla = torch.zeros(num_gpus, device=dev).index_add_(0, gpu, vanilla_active.to(torch.float32))
    hits = torch.zeros(lg.shape[0], num_gpus, device=dev).scatter_(1, gpu[chosen], 1.0)
    gpu_tokens = (hits * validf.unsqueeze(1)).sum(0)
    n_active = gpu_active.sum()
    peak = gpu_active.max()
    ratio = torch.where(n_active > 0, peak * num_gpus / n_active.clamp_min(1.0), torch.ones((), device=dev))
    head = torch.stack([torch.full((), float(layer_id), device=dev), n_active, vanilla_active.to(torch.float32).sum(),
                        peak, gpu_vanilla.max(), ratio, mass_kept, top1_kept, validf.sum()])
    return torch.cat([head, gpu_active, gpu_tokens])


class SelectorStats:
    """Counters of one process. Thread-safe for the host counters; device sums are updated in the
    forward thread only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0  # routing hook invocations (MoE layer calls seen)
        self.applied = 0  # calls where the policy ran and its result was used
        self.skipped: Counter[str] = Counter()  # reason -> calls routed by SGLang unchanged
        self.fallbacks: Counter[str] = Counter()  # reason -> calls where the selector failed (vanilla used)
        self.forwards = 0  # model forwards seen by the forward hook
        self.exact_tokens = 0  # rows routed exactly at their request's asking (per forward, host count)
        self.started = time.time()
        self._layers: dict[int, dict[str, Tensor]] = {}  # layer -> device sums
        self._short_rows: Tensor | None = None  # router-spec rows that kept the engine's routing (device)
        self._cap_bound: Tensor | None = None  # calls whose budget stopped a mass target short (device)
        # MoE layer -> "selects", "ready" (from the start-up report, not applied yet), or the reason the
        # selector leaves the layer to SGLang (see note_layer; statuses: xshare.sglang.coverage)
        self.coverage: dict[int, str] = {}
        self.startup_coverage: dict[int, str] = {}  # the start-up report, as it was at load time
        self._host_layers: dict[int, dict[str, int]] = {}  # layer -> host sums (CPU fast path)
        # metrics window (see the module docstring)
        self._window: Tensor | None = None
        self._window_idx: Tensor | None = None  # int64 device scalar: rows written so far
        self._window_read = 0  # rows drained so far (host)
        self.window_dropped = 0
        self._seconds: list[float] = []  # host-measured selector time per applied call
        # XSHARE_PROFILE: forward mode -> [forwards, forward seconds, MoE block calls, MoE seconds]
        self.profile: dict[str, list[float]] = {}

    # -- hot path ---------------------------------------------------------------------------
    def count_call(self) -> None:
        self.calls += 1

    def count_skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def count_fallback(self, reason: str) -> None:
        with self._lock:
            self.fallbacks[reason] += 1

    def count_exact_tokens(self, n: int) -> None:
        self.exact_tokens += n

    def count_forward(self) -> None:
        self.forwards += 1

    def record_layer(self, layer_id: int, active: Tensor, vanilla_active: Tensor, num_tokens: Tensor | int,
                     changed_tokens: Tensor | int = 0, checksum: Tensor | int = 0) -> None:
        """One applied call: ``active``/``vanilla_active`` bool [E] (selected / SGLang's own top-k);
        ``changed_tokens``: tokens whose expert set differs from SGLang's own top-k; ``checksum``: a
        position-weighted sum of the chosen ids (equal on every rank that made the same decisions)."""
        self.applied += 1
        sums = self._layers.get(layer_id)
        if sums is None or sums["activated"].device != active.device:
            z = torch.zeros((), dtype=torch.int64, device=active.device)
            sums = {k: z.clone() for k in _LAYER_SUMS}
            self._layers[layer_id] = sums
        sums["calls"] += 1
        sums["activated"] += active.sum()
        sums["vanilla_activated"] += vanilla_active.sum()
        sums["tokens"] += torch.as_tensor(num_tokens, device=active.device).to(torch.int64)
        sums["changed_tokens"] += torch.as_tensor(changed_tokens, device=active.device).to(torch.int64)
        sums["checksum"] += torch.as_tensor(checksum, device=active.device).to(torch.int64)

    def note_layer(self, layer_id: int, status: str) -> None:
        """The coverage of one MoE layer: ``"selects"`` once the policy was applied there, else the
        last layer-inherent reason it was left to SGLang (an unsupported router, a draft layer)."""
        if self.coverage.get(layer_id) != "selects":
            self.coverage[layer_id] = status

    def record_short_rows(self, rows: Tensor) -> None:
        """Router-spec layers: rows the set could not fill inside their groups, which kept SGLang's
        own routing (a 0-d device tensor; summed on the device, read by :meth:`snapshot`)."""
        if self._short_rows is None or self._short_rows.device != rows.device:
            self._short_rows = torch.zeros((), dtype=torch.int64, device=rows.device)
        self._short_rows += rows.to(torch.int64)

    def record_cap_bound(self, bound: Tensor) -> None:
        """One applied call with a mass target: ``bound`` (bool 0-d, on the device) is True when the
        budget stopped the set before the target was reached (``Routing.cap_bound``); summed on the
        device, read by :meth:`snapshot` and :meth:`cap_bound_calls`. The sum is made on the device's
        first call outside CUDA-graph capture (a captured call before it is not counted)."""
        if self._cap_bound is None or self._cap_bound.device != bound.device:
            if bound.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return
            self._cap_bound = torch.zeros((), dtype=torch.int64, device=bound.device)
        self._cap_bound += bound.to(torch.int64)

    def cap_bound_calls(self) -> int:
        """Applied calls so far whose budget stopped the mass target short (synchronises)."""
        return 0 if self._cap_bound is None else int(self._cap_bound.item())

    def record_layer_host(self, layer_id: int, active: int, vanilla_active: int, num_tokens: int,
                          changed_tokens: int = 0, checksum: int = 0) -> None:
        """:meth:`record_layer` with host numbers (the CPU fast path: no tensor op per counter)."""
        self.applied += 1
        sums = self._host_layers.get(layer_id)
        if sums is None:
            sums = self._host_layers[layer_id] = dict.fromkeys(_LAYER_SUMS, 0)
        sums["calls"] += 1
        sums["activated"] += active
        sums["vanilla_activated"] += vanilla_active
        sums["tokens"] += num_tokens
        sums["changed_tokens"] += changed_tokens
        sums["checksum"] += checksum

    def record_forward_time(self, mode: str, seconds: float) -> None:
        """One model forward of ``mode`` took ``seconds`` (host clock; XSHARE_PROFILE)."""
        p = self.profile.setdefault(mode, [0, 0.0, 0, 0.0])
        p[0] += 1
        p[1] += seconds

    def record_moe_time(self, mode: str, seconds: float) -> None:
        """One MoE block call inside a forward of ``mode`` took ``seconds`` (XSHARE_PROFILE)."""
        p = self.profile.setdefault(mode, [0, 0.0, 0, 0.0])
        p[2] += 1
        p[3] += seconds

    def profile_snapshot(self) -> dict[str, dict[str, float]]:
        """Per forward mode: forwards, forward_seconds, moe_calls, moe_seconds, moe_share."""
        out = {}
        for mode, (n, fs, mc, ms) in sorted(self.profile.items()):
            out[mode] = {"forwards": int(n), "forward_seconds": fs, "moe_calls": int(mc), "moe_seconds": ms,
                         "moe_share": ms / fs if fs > 0 else None}
        return out

    def record_figures(self, row: Tensor) -> None:
        """Append one :func:`call_figures` row to the device ring buffer (no host synchronisation)."""
        win = self._window
        if win is None or win.shape[1] != row.shape[0] or win.device != row.device:
            self._window = win = torch.zeros(WINDOW_CAPACITY, row.shape[0], dtype=torch.float32, device=row.device)
            self._window_idx = torch.zeros((), dtype=torch.int64, device=row.device)
            self._window_read = 0
        pos = torch.remainder(self._window_idx, WINDOW_CAPACITY).view(1)
        win.index_copy_(0, pos, row.view(1, -1).to(torch.float32))
        self._window_idx += 1

    def record_seconds(self, seconds: float) -> None:
        self._seconds.append(seconds)
        if len(self._seconds) > WINDOW_CAPACITY:
            del self._seconds[: len(self._seconds) - WINDOW_CAPACITY]

    def drain_window(self) -> Tensor:
        """Rows recorded since the last drain, oldest first (float32 CPU [n, F]); synchronises once."""
        if self._window is None or self._window_idx is None:
            return torch.zeros(0, len(WINDOW_FIELDS))
        written = int(self._window_idx.item())
        start = self._window_read
        if written - start > WINDOW_CAPACITY:
            self.window_dropped += written - start - WINDOW_CAPACITY
            start = written - WINDOW_CAPACITY
        self._window_read = written
        if written == start:
            return torch.zeros(0, self._window.shape[1])
        pos = torch.arange(start, written, device=self._window.device) % WINDOW_CAPACITY
        return self._window.index_select(0, pos).cpu()

    def drain_seconds(self) -> list[float]:
        out, self._seconds = self._seconds, []
        return out

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter (synchronises with the device)."""
        layers = {}
        for layer_id in sorted(set(self._layers) | set(self._host_layers)):
            vals = dict(self._host_layers.get(layer_id) or dict.fromkeys(_LAYER_SUMS, 0))
            for k, v in (self._layers.get(layer_id) or {}).items():
                vals[k] += int(v.item())
            n = max(vals["calls"], 1)
            vals["mean_activated"] = vals["activated"] / n
            vals["mean_vanilla_activated"] = vals["vanilla_activated"] / n
            layers[str(layer_id)] = vals
        with self._lock:
            return {
                "pid": os.getpid(),
                "time": time.time(),
                "uptime_s": time.time() - self.started,
                "forwards": self.forwards,
                "exact_tokens": self.exact_tokens,
                "calls": self.calls,
                "applied": self.applied,
                "skipped": dict(self.skipped),
                "fallbacks": dict(self.fallbacks),
                "fallbacks_total": sum(self.fallbacks.values()),
                "short_rows": 0 if self._short_rows is None else int(self._short_rows.item()),
                "mass_cap_bound": self.cap_bound_calls(),
                "coverage": {str(k): v for k, v in sorted(self.coverage.items())},
                "startup_coverage": {str(k): v for k, v in sorted(self.startup_coverage.items())},
                "layers": layers,
                "profile": self.profile_snapshot(),
            }
