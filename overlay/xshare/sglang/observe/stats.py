"""In-process counters of the selector, one :class:`SelectorStats` per scheduler process.

Host counters (calls, skips and fallbacks by reason) are plain ints. The figures of each applied
MoE layer call are added on the device (:meth:`SelectorStats.record_call`, one fused step:
:func:`xshare.sglang.observe.tally.tally`) into buffers allocated once per device and never per call:

* the layer sums (:data:`LAYER_COLUMNS`: calls, activated experts with and without the selector,
  tokens, changed tokens, the checksum, calls whose budget stopped a mass target short): pages of
  int64 [LAYER_PAGE, len(LAYER_COLUMNS)], one row per MoE layer, the calls counted on the device (so
  CUDA-graph replays count);
* the metrics window: one row of per-call figures (:data:`WINDOW_FIELDS`, then activated experts and
  tokens per GPU) written into a persistent ring [WINDOW_CAPACITY, F] at a device-side index.

Every count is also kept per forward mode (``decode``, ``target_verify``, ``extend``, ...: the mode of
the running forward, :attr:`SelectorStats.mode`, set by the forward hook before the model runs): a layer's
sums rows are one per (layer, mode), folded into per-layer totals for ``layers`` and reported per
mode in ``modes`` (:meth:`SelectorStats.mode_report`), with the calls and skips of each mode and, for
policies that group rows by request, the experts each request's rows used (:meth:`record_requests`).

The CPU C kernel's calls (:meth:`SelectorStats.record_call_host`) add their host numbers into the
same CPU buffers through numpy views (no tensor op). The host reads the buffers only through
:meth:`SelectorStats.collect`: drained into a snapshot on the device in stream order, copied to the host
asynchronously (:mod:`.snapshot`), added into :class:`~xshare.sglang.observe.totals.HostTotals`. Serving
(``report.forward_ended``) collects without waiting, so what it reports lags by up to one snapshot; the
readers (:meth:`fold`, :meth:`snapshot`, :meth:`drain_window`, :meth:`mode_report`) wait by default
(``fresh``): exact, for callers where no forward runs (the scheduler idle, an admin change, tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from xshare.sglang.observe.snapshot import Snapshot
from xshare.sglang.observe.tally import LAYER_SUMS, WINDOW_FIELDS, Target, capturing, tally
from xshare.sglang.observe.totals import HostTotals

WINDOW_CAPACITY = 8192  # rows kept between two drains (older rows are dropped and counted)
# Columns of a layer's sums row: tally()'s LAYER_SUMS, then counters added with SelectorStats.count_layer.
LAYER_COLUMNS: tuple[str, ...] = LAYER_SUMS
LAYER_PAGE = 64  # layer rows per sums page (a page is never reallocated; more layers get another page)

__all__ = ["LAYER_COLUMNS", "LAYER_PAGE", "WINDOW_CAPACITY", "WINDOW_FIELDS", "SelectorStats"]


class _Page:
    """One device's sums page: int64 [LAYER_PAGE, len(LAYER_COLUMNS)], the float32 layer id of each row
    (the torch path's window label) and, on the CPU, a numpy view of the sums (the C path adds there)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(LAYER_PAGE, len(LAYER_COLUMNS), dtype=torch.int64, device=device)
        self.labels = torch.zeros(LAYER_PAGE, dtype=torch.float32, device=device)
        self.layers: list[tuple[int, str]] = []  # (layer id, forward mode) of each used row
        self._host: Any = None

    @property
    def host(self) -> Any:
        """The numpy view of a CPU page's sums (made on first use, by the C path: never in a forward that
        could be captured), or None for a device page."""
        if self._host is None and self.sums.device.type == "cpu":
            self._host = self.sums.numpy()
        return self._host


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
        self.mode = "other"  # forward mode of the running forward (ProcessState.push sets it)
        self.mode_calls: Counter[str] = Counter()  # forward mode -> routing hook invocations
        self.mode_skipped: dict[str, Counter[str]] = {}  # forward mode -> reason -> calls left to SGLang
        # (device, mode) -> int64 [4] on the device: requests seen, sum and max of experts per request,
        # requests above the per-request budget
        self._request_sums: dict[tuple[str, str], Tensor] = {}
        self._budgeted_modes: set[str] = set()  # modes with calls of a policy that has a per-request budget
        # layer sums (see the module docstring): device -> pages; (device, layer) -> (page, row, label)
        self._pages: dict[str, list[_Page]] = {}
        self._slots: dict[tuple[str, int], tuple[_Page, int, Tensor]] = {}
        self.totals = HostTotals()  # what the device figures brought to the host so far (collect)
        self.transfers = Snapshot()  # the snapshot of the device figures in flight
        self._flight: list[tuple[str, Any]] = []  # what each tensor of that snapshot is
        self.unrecorded = 0  # applied calls not recorded: their buffers would have been made under capture
        self._short_rows: Tensor | None = None  # router-spec rows that kept the engine's routing (device)
        self._cap_bound: Tensor | None = None  # calls whose budget stopped a mass target short (device)
        # MoE layer -> "selects", "ready" (from the start-up report, not applied yet), or the reason the
        # selector leaves the layer to SGLang (see note_layer; statuses: xshare.sglang.observe.coverage)
        self.coverage: dict[int, str] = {}
        self.startup_coverage: dict[int, str] = {}  # the start-up report, as it was at load time
        # MoE layer -> what routed its last applied (eager or captured) call: 'triton', 'c', 'torch', or
        # 'torch (<why the wanted backend did not>)'; and how many such calls each label routed
        self.backends: dict[int, str] = {}
        self.backend_calls: Counter[str] = Counter()
        # metrics window (see the module docstring)
        self._window: Tensor | None = None
        self._window_idx: Tensor | None = None  # int64 device scalar: rows written so far
        self._window_host: Any = None  # (ring, index) numpy views when the ring is on the CPU
        self._window_read = 0  # rows collected so far (host)
        self._seconds: list[float] = []  # host-measured selector time per applied call
        # XSHARE_PROFILE: forward mode -> [forwards, forward seconds, MoE block calls, MoE seconds]
        self.profile: dict[str, list[float]] = {}

    # -- hot path ---------------------------------------------------------------------------
    def count_call(self) -> None:
        self.calls += 1
        self.mode_calls[self.mode] += 1

    def count_skip(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1
            self.mode_skipped.setdefault(self.mode, Counter())[reason] += 1

    def count_fallback(self, reason: str) -> None:
        with self._lock:
            self.fallbacks[reason] += 1

    def count_exact_tokens(self, n: int) -> None:
        self.exact_tokens += n

    def count_forward(self) -> None:
        self.forwards += 1

    def record_call(self, layer_id: int, *, logits: Tensor, engine_ids: Tensor, chosen_ids: Tensor, active: Tensor,
                    num_tokens: int | Tensor | None = None, placement: Any = None, scoring: str = "softmax",
                    cap_bound: Tensor | None = None, backend: str = "auto") -> None:
        """One applied call, added on the device (:func:`xshare.sglang.observe.tally.tally`: one Triton launch on
        CUDA): the layer sums, and with ``placement`` (observed metrics) the window row. ``logits`` float
        [T, E]; ``engine_ids`` / ``chosen_ids`` int [T, K]: SGLang's own top-k and the policy's;
        ``active`` bool [E]; ``num_tokens``: padding rows start there (int, 0-d device tensor or None);
        ``placement``: a :class:`~xshare.selection.Placement` on the logits' device; ``cap_bound``: the
        routing's mass-target flag (``Routing.cap_bound``, bool 0-d) or None. No host read, no
        host-to-device copy; buffers are made on a device's first call (never under CUDA-graph capture:
        such a call is counted in ``unrecorded`` instead)."""
        self.applied += 1
        device = logits.device
        slot = self._slot(layer_id, device)
        if slot is None:
            self.unrecorded += 1
            return
        window = window_idx = gpu = None
        num_gpus = 1
        if placement is not None and self._window_for(device, len(WINDOW_FIELDS) + 2 * placement.num_gpus):
            window, window_idx = self._window, self._window_idx
            gpu, num_gpus = placement.primary_gpu, placement.num_gpus
        page, row, label = slot
        tally(Target(page.sums, row, layer_id, label, window, window_idx), logits=logits, engine_ids=engine_ids,
              chosen_ids=chosen_ids, active=active, num_tokens=num_tokens, expert_gpu=gpu, num_gpus=num_gpus,
              scoring=scoring, cap_bound=cap_bound, backend=backend)

    def count_layer(self, layer_id: int, name: str, value: Tensor) -> None:
        """Add ``value`` (a 0-d tensor on the layer's device) into the layer's column ``name`` of
        :data:`LAYER_COLUMNS` (a counter beyond :data:`~xshare.sglang.observe.tally.LAYER_SUMS`; one op)."""
        slot = self._slot(layer_id, value.device)
        if slot is None:
            return
        page, row, _ = slot
        page.sums[row, LAYER_COLUMNS.index(name)] += value.to(torch.int64)

    def prepare(self, layer_id: int, device: torch.device, num_gpus: int | None = None) -> None:
        """Make the layer's row (and, with ``num_gpus``, the window ring) before any capture, so that a call
        captured later records into them (an eager call of a layer the selector did not route)."""
        self._slot(layer_id, device)
        if num_gpus is not None:
            self._window_for(device, len(WINDOW_FIELDS) + 2 * num_gpus)

    def record_requests(self, groups: Tensor, chosen_ids: Tensor, num_experts: int, limit: int | None) -> None:
        """One applied call of a policy that groups rows by request: how many experts each request's
        rows were routed to, added on the device (no host read) into the running mode's sums (requests
        seen, sum and max of experts per request, requests above ``limit``, the per-request budget of a
        policy that has one, else None).
        ``groups`` int64 [T]: request index of each row (in [0, T)); ``chosen_ids`` int [T, K]: the
        routing's logical experts."""
        key = (str(groups.device), self.mode)
        acc = self._request_sums.get(key)
        if acc is None:
            if capturing(groups.device):
                return
            acc = self._request_sums[key] = torch.zeros(4, dtype=torch.int64, device=groups.device)
        rows = groups.shape[0]
        used = torch.zeros(rows, num_experts, dtype=torch.bool, device=groups.device)
        ids = chosen_ids.to(torch.int64).clamp(0, num_experts - 1)
        used[groups.to(torch.int64).unsqueeze(1).expand_as(ids), ids] = True
        per_request = used.sum(1)
        acc[0] += (per_request > 0).sum()
        acc[1] += per_request.sum()
        acc[2] = torch.maximum(acc[2], per_request.max())
        if limit is not None:
            self._budgeted_modes.add(self.mode)
            acc[3] += (per_request > limit).sum()

    def _slot(self, layer_id: int, device: torch.device) -> tuple[_Page, int, Tensor] | None:
        """The row of the layer in the running forward mode, in its device's sums page (a new row, or a
        new page, on its first call)."""
        key = (str(device), layer_id, self.mode)
        hit = self._slots.get(key)
        if hit is not None:
            return hit
        if capturing(device):
            return None
        pages = self._pages.setdefault(key[0], [])
        if not pages or len(pages[-1].layers) == LAYER_PAGE:
            pages.append(_Page(device))
        page = pages[-1]
        row = len(page.layers)
        page.layers.append((layer_id, self.mode))
        page.labels[row] = float(layer_id)
        hit = self._slots[key] = (page, row, page.labels[row])
        return hit

    def _window_for(self, device: torch.device, width: int) -> bool:
        """Whether the ring is ready for rows of ``width`` on ``device`` (made, or remade, here; never
        under capture, where a call then writes no row)."""
        win = self._window
        if win is not None and win.shape[1] == width and win.device == device:
            return True
        if capturing(device):
            return False
        self._window = torch.zeros(WINDOW_CAPACITY, width, dtype=torch.float32, device=device)
        self._window_idx = torch.zeros((), dtype=torch.int64, device=device)
        self._window_read = 0
        self._window_host = None  # numpy views of a CPU ring, made by the C path when it first writes a row
        return True

    def note_layer(self, layer_id: int, status: str) -> None:
        """The coverage of one MoE layer: ``"selects"`` once the policy was applied there, else the
        last layer-inherent reason it was left to SGLang (an unsupported router, a draft layer)."""
        if self.coverage.get(layer_id) != "selects":
            self.coverage[layer_id] = status

    def note_backend(self, layer_id: int, backend: str, reason: str | None) -> str:
        """One applied call of ``layer_id`` was routed by ``backend`` (the reference for ``reason`` when
        another was wanted); returns the label noted ('torch (reason)' in that case)."""
        label = backend if reason is None else f"{backend} ({reason})"
        self.backends[layer_id] = label
        self.backend_calls[label] += 1
        return label

    def record_short_rows(self, rows: Tensor) -> None:
        """Router-spec layers: rows the set could not fill inside their groups, which kept SGLang's
        own routing (a 0-d device tensor; summed on the device, read by :meth:`snapshot`)."""
        if self._short_rows is None or self._short_rows.device != rows.device:
            self._short_rows = torch.zeros((), dtype=torch.int64, device=rows.device)
        self._short_rows += rows.to(torch.int64)

    def record_cap_bound(self, bound: Tensor) -> None:
        """One applied call with a mass target, for a caller without a layer: ``bound`` (bool 0-d, on the
        device) is True when the budget stopped the set before the target was reached
        (``Routing.cap_bound``); summed on the device, read by :meth:`snapshot` and :meth:`cap_bound_calls`.
        The routing hook passes the flag to :meth:`record_call` instead (a column of the layer sums,
        added in the same launch). The sum is made on the device's first call outside CUDA-graph capture
        (a captured call before it is not counted)."""
        if self._cap_bound is None or self._cap_bound.device != bound.device:
            if bound.device.type == "cuda" and torch.cuda.is_current_streamcapturing():
                return
            self._cap_bound = torch.zeros((), dtype=torch.int64, device=bound.device)
        self._cap_bound += bound.to(torch.int64)

    def cap_bound_calls(self, sums: dict[int, dict[str, int]] | None = None) -> int:
        """Applied calls whose budget stopped the mass target short: the layer sums' column (``sums``: a
        :meth:`fold` just made, else a fresh one is made here) and :meth:`record_cap_bound`'s count."""
        layers = self.fold() if sums is None else sums
        return self.totals.cap_bound + sum(v["mass_cap_bound"] for v in layers.values())

    def record_call_host(self, layer_id: int, active: int, vanilla_active: int, num_tokens: int,
                         changed_tokens: int = 0, checksum: int = 0, *, figures: Any = None,
                         num_gpus: int = 1, cap_bound: int = 0) -> None:
        """:meth:`record_call` with host numbers (the CPU C kernel: no tensor op per counter), added into
        the same CPU buffers through their numpy views. ``figures``: called with the ring's next row
        (float32 [len(WINDOW_FIELDS) + 2 num_gpus], a view) to write the call's window row in place."""
        self.applied += 1
        page, row, _ = self._slot(layer_id, torch.device("cpu"))  # type: ignore[misc]
        page.host[row, :len(LAYER_SUMS)] += (1, active, vanilla_active, num_tokens, changed_tokens, checksum,
                                             cap_bound)
        if figures is None or not self._window_for(torch.device("cpu"), len(WINDOW_FIELDS) + 2 * num_gpus):
            return
        if self._window_host is None:
            self._window_host = (self._window.numpy(), self._window_idx.numpy())
        _ring, idx = self._window_host
        figures(self._window[int(idx) % WINDOW_CAPACITY])
        idx += 1

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
        if not self._window_for(row.device, row.shape[0]):
            return
        assert self._window is not None and self._window_idx is not None  # made by _window_for
        pos = torch.remainder(self._window_idx, WINDOW_CAPACITY).view(1)
        self._window.index_copy_(0, pos, row.view(1, -1).to(torch.float32))
        self._window_idx += 1

    def record_seconds(self, seconds: float) -> None:
        self._seconds.append(seconds)
        if len(self._seconds) > WINDOW_CAPACITY:
            del self._seconds[: len(self._seconds) - WINDOW_CAPACITY]

    def drain_window(self, *, fresh: bool = True) -> Tensor:
        """Rows recorded since the last drain, oldest first (float32 CPU [n, F]); ``fresh``: as :meth:`fold`."""
        if fresh:
            self.collect(wait=True)
        return self.totals.take_rows(len(WINDOW_FIELDS) if self._window is None else self._window.shape[1])

    @property
    def window_dropped(self) -> int:
        """Window rows dropped: more than :data:`WINDOW_CAPACITY` arrived between two drains."""
        return self.totals.dropped

    def drain_seconds(self) -> list[float]:
        out, self._seconds = self._seconds, []
        return out

    # -- reading ----------------------------------------------------------------------------
    def collect(self, *, wait: bool) -> bool:
        """Bring the device figures into :attr:`totals` (:mod:`.snapshot`). ``wait=False``, at a forward
        boundary while serving: an arrived snapshot is added, and one is started when none is in flight;
        nothing waits, so the totals lag by up to one snapshot (off CUDA none: a snapshot arrives as it
        is made). ``wait=True``, only where no forward runs (the scheduler idle, an admin change, an
        explicit read): waits; the totals then hold every figure so far. Returns whether they do."""
        snap = self.transfers
        if snap.busy:
            if wait:
                snap.wait()
            if not snap.ready():
                return False  # still on its way: what later forwards add stays on the device meanwhile
            self._arrived()
        kinds, sources = self._sources()
        if not snap.start(sources, [not kind.startswith("window") for kind, _ in kinds]):
            return not sources
        self._flight = kinds
        if wait:
            snap.wait()
        if snap.ready():
            self._arrived()
        return not snap.busy

    def _arrived(self) -> None:
        host = self.transfers.take()
        self._window_read = self.totals.add_snapshot(self._flight, host, self._window, self._window_read)

    def _sources(self) -> tuple[list[tuple[str, Any]], list[Tensor]]:
        """What a snapshot copies: every device buffer of the figures."""
        kinds: list[tuple[str, Any]] = []  # (kind, what it belongs to): HostTotals.add_snapshot reads them
        tensors: list[Tensor] = []  # the ring and its index are copied, the others drained
        for pages in self._pages.values():
            for page in pages:
                kinds.append(("sums", page))
                tensors.append(page.sums)
        for (_device, mode), acc in self._request_sums.items():
            kinds.append(("requests", mode))
            tensors.append(acc)
        for kind, t in (("cap_bound", self._cap_bound), ("short_rows", self._short_rows)):
            if t is not None:
                kinds.append((kind, None))
                tensors.append(t)
        if self._window is not None and self._window_idx is not None:
            kinds += [("window", self._window), ("window_idx", None)]
            tensors += [self._window, self._window_idx]
        return kinds, tensors

    def fold(self, *, fresh: bool = True) -> dict[int, dict[str, int]]:
        """The layer sums (layer -> :data:`LAYER_COLUMNS` -> int), summed over forward modes; ``fresh``:
        collected first, waiting (:meth:`collect`), else as the last collect left them."""
        if fresh:
            self.collect(wait=True)
        return self.totals.per_layer(LAYER_COLUMNS)

    def mode_report(self, fold: bool = True) -> dict[str, dict[str, Any]]:
        """Per forward mode (``fold``: collected first, as :meth:`fold`): ``calls`` (routing hook
        invocations), ``applied`` (calls the policy routed), ``skipped`` (reason -> calls left to SGLang),
        ``activated`` / ``vanilla_activated`` (experts per applied layer call, summed), their means per
        applied call, ``tokens``, per-layer means (``layers``) and, for policies that group rows by
        request, ``requests`` (request-calls seen, mean and max experts a request's rows used in one layer
        call, request-calls above the per-request budget)."""
        if fold:
            self.collect(wait=True)
        with self._lock:
            skipped = {m: dict(c) for m, c in self.mode_skipped.items()}
        report: dict[str, dict[str, Any]] = {}
        for mode in sorted(set(self.mode_calls) | self.totals.modes()):
            figures = self.totals.mode_figures(mode, LAYER_COLUMNS, mode in self._budgeted_modes)
            report[mode] = {"calls": self.mode_calls.get(mode, 0), "skipped": skipped.get(mode, {}), **figures}
        return report

    def snapshot(self, *, fresh: bool = True) -> dict[str, Any]:
        """A JSON-ready copy of every counter (``fresh``: collected first, as :meth:`fold`). ``applied``
        is the calls counted on the device (CUDA-graph replays included)."""
        layers = {}
        sums = self.fold(fresh=fresh)
        for layer_id in sorted(sums):
            vals: dict[str, Any] = dict(sums[layer_id])
            n = max(vals["calls"], 1)
            vals["mean_activated"] = vals["activated"] / n
            vals["mean_vanilla_activated"] = vals["vanilla_activated"] / n
            layers[str(layer_id)] = vals
        modes = self.mode_report(fold=False)
        with self._lock:
            return {
                "pid": os.getpid(),
                "time": time.time(),
                "uptime_s": time.time() - self.started,
                "forwards": self.forwards,
                "exact_tokens": self.exact_tokens,
                "calls": self.calls,
                "applied": sum(v["calls"] for v in sums.values()),
                "skipped": dict(self.skipped),
                "fallbacks": dict(self.fallbacks),
                "fallbacks_total": sum(self.fallbacks.values()),
                "short_rows": self.totals.short_rows,
                "mass_cap_bound": self.cap_bound_calls(sums),
                "coverage": {str(k): v for k, v in sorted(self.coverage.items())},
                "backends": {str(k): v for k, v in sorted(self.backends.items())},
                "backend_calls": dict(self.backend_calls),
                "startup_coverage": {str(k): v for k, v in sorted(self.startup_coverage.items())},
                "layers": layers,
                "modes": modes,
                "profile": self.profile_snapshot(),
            }
