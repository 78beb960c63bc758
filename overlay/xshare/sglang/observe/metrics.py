"""Prometheus metrics of the selector, in SGLang's multiprocess registry (``xshare:*`` names).

SGLang's ``--enable-metrics`` sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the schedulers and
serves every process's series on ``/metrics`` (``MultiProcessCollector``). ``prometheus_client``
must be imported only after that variable is set (its value class is fixed at import), so it is
imported here lazily, from :func:`create` in a scheduler process. Metrics are created with
``registry=None``: in multiprocess mode the values go to the mmap files that SGLang's collector
reads, and no process-local registry is involved (so a second exporter never clashes).

Every series carries ``rank`` (the scheduler's TP rank). Recording never synchronises the device:
the routing hook writes one row of figures per applied call into a device ring buffer, in the same
device launch that adds the layer sums (:meth:`xshare.sglang.observe.stats.SelectorStats.record_call`);
:meth:`Exporter.flush` drains what has reached the host of it every ``XSHARE_METRICS_FLUSH_EVERY``
forwards (default 16), after the first applied forward (without waiting for the device: the figures
of the last snapshot, one flush late on a GPU) and when the scheduler goes idle (exactly).

Series budget (``XSHARE_METRICS_DETAIL``, docs/observability.md): a group of many ranks must not
export ranks x layers x GPUs series. With the default ``group``, the routing distributions
(:data:`DISTRIBUTIONS`) come from scheduler rank 0 only, layers are aggregated (``layer="all"``),
each rank reports the per-GPU gauges of the GPUs it owns (its EP rank) only, and the config version
is a value (``xshare:config_version``), not a label. ``rank`` keeps every rank's distributions,
``layer`` also splits them (and the per-GPU gauges) per MoE layer.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

from xshare.selection.config import DEFAULT_BUDGET
from xshare.sglang.observe.coverage import state_of
from xshare.sglang.observe.stats import WINDOW_FIELDS, SelectorStats
from xshare.sglang.placement import ep_position
from xshare.sglang.state import ProcessState

log = logging.getLogger("xshare.sglang")

COUNT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
RATIO_BUCKETS = (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0)
FRACTION_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)

# name -> (type, labels after 'rank', help); the contract the dashboard (dashboards/) reads
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "xshare:active_experts": ("histogram", ("layer",), "Activated experts per layer per forward (policy in force)"),
    "xshare:vanilla_active_experts": ("histogram", ("layer",), "Experts vanilla top-k would have activated"),
    "xshare:gpu_active_experts": ("gauge", ("layer", "gpu"),
                                  "Activated experts on one GPU (EP rank), mean over the last flush window"),
    "xshare:gpu_tokens": ("gauge", ("layer", "gpu"), "Tokens routed to one GPU, mean over the last flush window"),
    "xshare:peak_gpu_active_experts": ("histogram", (), "Max over GPUs of activated experts, per layer per forward"),
    "xshare:vanilla_peak_gpu_active_experts": ("histogram", (), "Max over GPUs of activated experts, vanilla top-k"),
    "xshare:peak_mean_ratio": ("histogram", (), "Peak / mean activated experts per GPU, per layer per forward"),
    "xshare:mass_kept": ("histogram", (), "Gate mass kept (fraction of the tokens' own top-k mass), per layer call"),
    "xshare:top1_kept": ("histogram", (), "Fraction of tokens keeping their top-1 expert, per layer call"),
    "xshare:selector_calls_total": ("counter", (), "Routing hook calls (MoE layer calls seen)"),
    "xshare:mode_calls_total": ("counter", ("mode",), "Routing hook calls by forward mode (decode, target_verify, "
                                "extend, ...)"),
    "xshare:mode_applied_total": ("counter", ("mode",), "MoE layer calls the policy routed, by forward mode"),
    "xshare:mode_active_experts_total": ("counter", ("mode",), "Activated experts summed over the routed layer "
                                         "calls, by forward mode (divided by mode_applied_total: per layer call)"),
    "xshare:mode_vanilla_active_experts_total": ("counter", ("mode",), "Experts SGLang's own top-k would have "
                                                 "activated on the same calls, by forward mode"),
    "xshare:exact_tokens_total": ("counter", (), "Tokens routed exactly (the model's own top-k) because their "
                                  "request asked (custom_params xshare_exact), per forward"),
    "xshare:fallbacks_total": ("counter", ("reason",), "Selector failures routed by SGLang's top-k, by reason"),
    "xshare:mass_cap_bound_total": ("counter", (), "Applied layer calls whose budget stopped the set before the "
                                    "target mass was reached (a mass target with a budget given)"),
    "xshare:selector_seconds": ("histogram", (), "Host time of one selector call (launch time on a GPU)"),
    "xshare:config_info": ("gauge", ("policy",), "1 for the policy in force (0 for policies used earlier)"),
    "xshare:config_version": ("gauge", (), "Version of the config in force (admin changes count up)"),
    "xshare:budget": ("gauge", (), "Expert budget per layer and batch (resolved to experts when E is known)"),
    "xshare:warmup_k": ("gauge", (), "Warm-up experts every token keeps"),
    "xshare:group_budget": ("gauge", (), "Per-request budget of xshare_spec (0 = unset)"),
    "xshare:gpu_cap": ("gauge", (), "Per-GPU cap of xshare_ep (0 = unset)"),
    "xshare:enabled": ("gauge", (), "1 when the selector is on"),
    "xshare:config_changes_total": ("counter", ("result",), "Admin config changes by result"),
    "xshare:forwards_total": ("counter", ("mode",), "Model forwards, by forward mode (XSHARE_PROFILE=1)"),
    "xshare:forward_seconds_total": ("counter", ("mode",), "Host seconds in model forwards, by forward mode "
                                     "(XSHARE_PROFILE=1)"),
    "xshare:moe_seconds_total": ("counter", ("mode",),
                                 "Host seconds in MoE blocks, by forward mode (XSHARE_PROFILE=1)"),
    "xshare:layers": ("gauge", ("state", "reason"),
                      "MoE layers by coverage: the selector selects there, is ready to, skips them (reason) or the "
                      "runner backend bypasses the routing hook (reason)"),
}
_BUCKETS = {"xshare:active_experts": COUNT_BUCKETS, "xshare:vanilla_active_experts": COUNT_BUCKETS,
            "xshare:peak_gpu_active_experts": COUNT_BUCKETS, "xshare:vanilla_peak_gpu_active_experts": COUNT_BUCKETS,
            "xshare:peak_mean_ratio": RATIO_BUCKETS, "xshare:mass_kept": FRACTION_BUCKETS,
            "xshare:top1_kept": FRACTION_BUCKETS, "xshare:selector_seconds": SECONDS_BUCKETS}


#: Routing distributions: from rank 0 only with XSHARE_METRICS_DETAIL=group (the default), else from every rank.
DISTRIBUTIONS = ("xshare:active_experts", "xshare:vanilla_active_experts", "xshare:peak_gpu_active_experts",
                 "xshare:vanilla_peak_gpu_active_experts", "xshare:peak_mean_ratio", "xshare:mass_kept",
                 "xshare:top1_kept", "xshare:selector_seconds")
ALL_LAYERS = "all"  # the layer label of figures aggregated over layers (detail group / rank)
MAX_COVERAGE_REASONS = 8  # distinct skip / bypass reasons labelled per rank; further ones count as 'other'

INITIAL_FALLBACK_REASONS = ("signature", "forward_state")
MAX_FALLBACK_REASONS = 16  # distinct reason labels per rank (exception type names); further ones count as 'other'


def multiprocess_dir() -> str | None:
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    return d if d and os.path.isdir(d) else None


class Exporter:
    """The selector's metrics for one scheduler rank. ``prometheus`` False: only the per-layer
    summary of the last window is kept (for ``GET /xshare/stats``), nothing is exported. ``ep``:
    (EP size, EP rank, first rank of that EP rank), read from SGLang at the first flush when None
    (:func:`xshare.sglang.placement.ep_position`)."""

    def __init__(self, rank: int, *, prometheus: bool = True, on_flush: Any = None,
                 ep: tuple[int, int, bool] | None = None) -> None:
        self.rank = str(rank)
        self.on_flush = on_flush  # callable(summary dict) after each flush (admin stats file)
        self.ep = ep
        self.m: dict[str, Any] = {}
        self._calls = 0
        self._exact_tokens = 0
        self._cap_bound = 0
        self._fallbacks: dict[str, int] = {}
        self._profile: dict[str, tuple[int, float, float]] = {}  # mode -> (forwards, forward s, MoE s) exported
        self._modes: dict[tuple[str, str], int] = {}  # (per-mode counter, mode) -> value exported
        self._labeled: set[str] = set(INITIAL_FALLBACK_REASONS)
        self._policies: set[str] = set()  # config_info series written so far
        self._coverage: dict[tuple[str, str], int] = {}  # xshare:layers series written so far -> value
        self._coverage_reasons: set[str] = set()
        self.last: dict[str, Any] = {"layers": {}, "rows": 0}
        if prometheus:
            import prometheus_client as pc  # lazily: PROMETHEUS_MULTIPROC_DIR is set by now

            for name, (kind, labels, doc) in METRICS.items():
                names = ("rank", *labels)
                if kind == "histogram":
                    self.m[name] = pc.Histogram(name, doc, names, buckets=_BUCKETS[name], registry=None)
                elif kind == "counter":
                    self.m[name] = pc.Counter(name.removesuffix("_total"), doc, names, registry=None)
                else:
                    self.m[name] = pc.Gauge(name, doc, names, registry=None, multiprocess_mode="mostrecent")
            # Series that exist from the start (at 0), so rate()/increase() and dashboards see them before
            # the first event.
            for reason in INITIAL_FALLBACK_REASONS:
                self._metric("xshare:fallbacks_total", reason).inc(0)
            for result in ("applied", "rejected"):
                self._metric("xshare:config_changes_total", result).inc(0)
            self._metric("xshare:selector_calls_total").inc(0)
            self._metric("xshare:exact_tokens_total").inc(0)
            self._metric("xshare:mass_cap_bound_total").inc(0)

    def _metric(self, name: str, *labels: str) -> Any:
        return self.m[name].labels(self.rank, *labels) if self.m else None

    # -- what this rank exports (XSHARE_METRICS_DETAIL) --------------------------------------------
    @staticmethod
    def detail(state: ProcessState) -> str:
        return str(getattr(state.settings, "metrics_detail", "group"))

    def reports_distributions(self, state: ProcessState) -> bool:
        """The routing distributions (:data:`DISTRIBUTIONS`): every rank, or rank 0 only (``group``)."""
        return self.detail(state) != "group" or self.rank == "0"

    def owned_gpus(self, num_gpus: int) -> list[int]:
        """The placement's GPUs this rank reports: those of its EP rank (GPU j belongs to EP rank
        j mod EP size), by the first of the ranks that share that EP rank (the others see the same)."""
        if self.ep is None:
            self.ep = ep_position()
        size, ep_rank, first = self.ep
        if not first:
            return []
        return [j for j in range(num_gpus) if j % max(size, 1) == ep_rank]

    # -- config ------------------------------------------------------------------------------------
    def config_changed(self, state: ProcessState) -> None:
        if not self.m:
            return
        s = state.settings
        sel = s.selector
        e = state.num_experts_hint
        budget = sel.budget_for(e) if e else sel.scalar_value("budget")  # per-layer: one shown value
        if budget is None:  # not given and E unknown: the default as a fraction of E (1 = uncapped mass target)
            budget = 1.0 if sel.has_target_mass else DEFAULT_BUDGET
        values = {"xshare:budget": budget, "xshare:warmup_k": sel.warmup_k,
                  "xshare:group_budget": sel.group_budget or 0, "xshare:gpu_cap": sel.gpu_cap or 0,
                  "xshare:enabled": 1 if s.enabled else 0, "xshare:config_version": state.version}
        for name, v in values.items():
            self._metric(name).set(float(v))
        for policy in self._policies - {sel.policy}:  # one series per policy ever used, not per version
            self._metric("xshare:config_info", policy).set(0)
        self._metric("xshare:config_info", sel.policy).set(1)
        self._policies.add(sel.policy)

    def config_change(self, result: str) -> None:
        if self.m:
            self._metric("xshare:config_changes_total", result).inc()

    # -- coverage ------------------------------------------------------------------------------------
    def coverage_counts(self, state: ProcessState) -> dict[tuple[str, str], int]:
        """(state, reason) -> MoE layers, from the state's coverage report (:mod:`xshare.sglang.observe.coverage`:
        the start-up survey, then ``selects`` where the policy was applied): state ``selects`` or ``ready``
        (reason empty), ``skipped`` or ``bypassed`` with the status as the reason (at most
        :data:`MAX_COVERAGE_REASONS` reasons, then ``other``)."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        for status in state.stats.coverage.values():
            kind = state_of(status)
            if kind in ("selects", "ready"):
                out[(kind, "")] += 1
                continue
            if status not in self._coverage_reasons and len(self._coverage_reasons) < MAX_COVERAGE_REASONS:
                self._coverage_reasons.add(status)
            out[(kind, status if status in self._coverage_reasons else "other")] += 1
        return dict(out)

    def _export_coverage(self, state: ProcessState) -> None:
        counts = self.coverage_counts(state)
        for key in set(self._coverage) | set(counts):
            v = counts.get(key, 0)
            if self._coverage.get(key) != v:
                self._metric("xshare:layers", *key).set(float(v))
                self._coverage[key] = v

    # -- the window ----------------------------------------------------------------------------------
    def flush(self, state: ProcessState) -> None:
        """The state's metrics window, as far as its figures have reached the host (the caller collects
        them first: :meth:`ProcessState.flush_metrics`), into the Prometheus series and the last window's
        summary (``self.last``, handed to ``on_flush``). Reads host figures only."""
        stats = state.stats
        rows = stats.drain_window(fresh=False)
        seconds = stats.drain_seconds()
        g = (rows.shape[1] - len(WINDOW_FIELDS)) // 2 if rows.numel() else 0
        cap_bound = stats.cap_bound_calls(stats.fold(fresh=False))
        modes = stats.mode_report(fold=False)
        by_layer: dict[int, list[list[float]]] = defaultdict(list)
        all_rows = rows.tolist()
        for r in all_rows:
            by_layer[int(r[0])].append(r)
        if self.m:
            per_layer = self.detail(state) == "layer"
            if self.reports_distributions(state):
                self._observe_distributions(by_layer, seconds, per_layer)
            groups = [(str(layer), lrows) for layer, lrows in by_layer.items()] if per_layer else \
                ([(ALL_LAYERS, all_rows)] if all_rows else [])
            self._set_gpu_gauges(groups, g)
            self._count_totals(stats, modes, cap_bound)
            self._export_coverage(state)
        summary = _window_summary(stats, by_layer, g, modes, cap_bound)
        summary["rows"] = int(rows.shape[0])
        if rows.shape[0]:
            self.last = summary
        else:  # an empty window: keep the last window's figures, with today's coverage and skips
            self.last = {**self.last, "coverage": summary["coverage"], "skipped": summary["skipped"],
                         "mass_cap_bound": cap_bound, "modes": modes}
        if self.on_flush is not None:
            self.on_flush(self.last)

    def _observe_distributions(self, by_layer: dict[int, list[list[float]]], seconds: list[float],
                               per_layer: bool) -> None:
        """The window's rows into the routing histograms (:data:`DISTRIBUTIONS`) and the selector's seconds."""
        peak, vpeak = self._metric("xshare:peak_gpu_active_experts"), \
            self._metric("xshare:vanilla_peak_gpu_active_experts")
        ratio, mass, top1 = self._metric("xshare:peak_mean_ratio"), self._metric("xshare:mass_kept"), \
            self._metric("xshare:top1_kept")
        for layer, lrows in by_layer.items():
            label = str(layer) if per_layer else ALL_LAYERS
            act = self._metric("xshare:active_experts", label)
            van = self._metric("xshare:vanilla_active_experts", label)
            for r in lrows:
                act.observe(r[1])
                van.observe(r[2])
                peak.observe(r[3])
                vpeak.observe(r[4])
                ratio.observe(r[5])
                mass.observe(r[6])
                top1.observe(r[7])
        sec = self._metric("xshare:selector_seconds")
        for s in seconds:
            sec.observe(s)

    def _set_gpu_gauges(self, groups: list[tuple[str, list[list[float]]]], g: int) -> None:
        """Per layer label, the mean activated experts and tokens of each GPU this rank owns."""
        nf = len(WINDOW_FIELDS)
        owned = self.owned_gpus(g) if g else []
        for label, lrows in groups:
            n = len(lrows)
            for gpu in owned:
                self._metric("xshare:gpu_active_experts", label, str(gpu)).set(
                    sum(r[nf + gpu] for r in lrows) / n)
                self._metric("xshare:gpu_tokens", label, str(gpu)).set(
                    sum(r[nf + g + gpu] for r in lrows) / n)

    def _count_totals(self, stats: SelectorStats, modes: dict[str, dict[str, Any]], cap_bound: int) -> None:
        """The counters' growth since the last flush into the ``*_total`` series."""
        for mode, (n, fs, _mc, ms) in list(stats.profile.items()):
            prev_n, prev_fs, prev_ms = self._profile.get(mode, (0, 0.0, 0.0))
            if n > prev_n:
                self._metric("xshare:forwards_total", mode).inc(n - prev_n)
            if fs > prev_fs:
                self._metric("xshare:forward_seconds_total", mode).inc(fs - prev_fs)
            if ms > prev_ms:
                self._metric("xshare:moe_seconds_total", mode).inc(ms - prev_ms)
            self._profile[mode] = (n, fs, ms)
        for mode, fig in modes.items():
            for name, key in (("xshare:mode_calls_total", "calls"), ("xshare:mode_applied_total", "applied"),
                              ("xshare:mode_active_experts_total", "activated"),
                              ("xshare:mode_vanilla_active_experts_total", "vanilla_activated")):
                prev = self._modes.get((name, mode), 0)
                if fig[key] > prev:
                    self._metric(name, mode).inc(fig[key] - prev)
                    self._modes[(name, mode)] = fig[key]
        if stats.exact_tokens > self._exact_tokens:
            self._metric("xshare:exact_tokens_total").inc(stats.exact_tokens - self._exact_tokens)
            self._exact_tokens = stats.exact_tokens
        if cap_bound > self._cap_bound:
            self._metric("xshare:mass_cap_bound_total").inc(cap_bound - self._cap_bound)
            self._cap_bound = cap_bound
        if stats.calls > self._calls:
            self._metric("xshare:selector_calls_total").inc(stats.calls - self._calls)
            self._calls = stats.calls
        for reason, count in dict(stats.fallbacks).items():
            prev = self._fallbacks.get(reason, 0)
            if count > prev:
                if reason not in self._labeled and len(self._labeled) < MAX_FALLBACK_REASONS:
                    self._labeled.add(reason)
                label = reason if reason in self._labeled else "other"
                self._metric("xshare:fallbacks_total", label).inc(count - prev)
                self._fallbacks[reason] = count


def _window_summary(stats: SelectorStats, by_layer: dict[int, list[list[float]]], g: int,
                    modes: dict[str, dict[str, Any]], cap_bound: int) -> dict[str, Any]:
    """The flushed window as the admin view shows it: counters, skips, coverage, per-mode figures and
    each layer's mean figures (per-GPU lists of ``g`` GPUs)."""
    nf = len(WINDOW_FIELDS)
    summary: dict[str, Any] = {"rows": 0, "forwards": stats.forwards, "calls": stats.calls,
                               "fallbacks": dict(stats.fallbacks), "dropped_rows": stats.window_dropped,
                               "mass_cap_bound": cap_bound,
                               "skipped": dict(stats.skipped),
                               "coverage": {str(k): v for k, v in sorted(stats.coverage.items())},
                               "modes": modes, "layers": {}}
    for layer, lrows in sorted(by_layer.items()):
        n = len(lrows)
        fig = {f: sum(r[i] for r in lrows) / n for i, f in enumerate(WINDOW_FIELDS) if i > 0}
        fig["calls"] = n
        fig["gpu_active_experts"] = [sum(r[nf + j] for r in lrows) / n for j in range(g)]
        fig["gpu_tokens"] = [sum(r[nf + g + j] for r in lrows) / n for j in range(g)]
        summary["layers"][str(layer)] = fig
    return summary


def create(rank: int, on_flush: Any = None) -> Exporter:
    """An exporter for this scheduler: Prometheus series when SGLang runs with --enable-metrics."""
    return Exporter(rank, prometheus=multiprocess_dir() is not None, on_flush=on_flush)
