"""What a scheduler process reports about its selector, at the moments the hooks hand it: the end of
each forward (the stats file, the metrics flush, the coverage check), the scheduler going idle, the
first applied call, the loaded model (start-up coverage, per-layer settings that must fit it).

Reads the :class:`~xshare.sglang.state.ProcessState` it is given and collects its device figures
(waiting for the device only when the scheduler is idle, never at a forward's end); writes only its
counters, the stats file (``XSHARE_STATS_DIR``) and the log. Raises :class:`CoverageRefused` /
:class:`SettingsRefused` where the operator asked the scheduler to stop rather than serve without
the selector (``XSHARE_REQUIRE_COVERAGE``, a per-layer setting that does not fit the model).
"""

from __future__ import annotations

import logging
import os

from xshare._io import write_json_atomic
from xshare.selection.decide import planned_backend
from xshare.selection.registry import check_for_model
from xshare.selection.types import ModelShape
from xshare.sglang.observe.coverage import reaches_no_layer
from xshare.sglang.observe.coverage import summary as coverage_summary
from xshare.sglang.settings import env_name
from xshare.sglang.state import ForwardState, ProcessState

log = logging.getLogger("xshare.sglang")

# After this many forwards in a mode the selector applies to, an enabled selector that selected on
# no MoE layer says so (WARNING, once), with the reasons.
COVERAGE_CHECK_FORWARDS = 32


class SettingsRefused(RuntimeError):
    """A per-layer setting does not fit the loaded model (list length, unknown layer id): the scheduler stops."""


class CoverageRefused(RuntimeError):
    """XSHARE_REQUIRE_COVERAGE: the selector is enabled but selects on no MoE layer; the scheduler stops."""


def forward_ended(proc: ProcessState, state: ForwardState | None) -> None:
    """After one forward: counted; the coverage check after the first and the 32nd applicable forward;
    the trace's batch ended; the stats file and the metrics window written when due, from the device
    figures collected without waiting (the last arrived snapshot: no forward is stalled)."""
    proc.stats.count_forward()
    if state is not None and state.mode in proc.modes() and not state.is_draft and not state.capturing:
        proc.applicable_forwards += 1
        if proc.applicable_forwards in (1, COVERAGE_CHECK_FORWARDS):
            msg = check_coverage(proc, final=proc.applicable_forwards > 1)
            if msg is not None and proc.settings.require_coverage:
                raise CoverageRefused(f"{msg}; refusing to serve (XSHARE_REQUIRE_COVERAGE=1)")
    if proc.trace is not None and state is not None and not state.capturing:
        proc.trace.end_forward()
    s = proc.settings
    stats_due = s.stats_dir is not None and proc.stats.forwards % s.stats_every == 0
    if proc.observe and (proc.flush_pending or proc.stats.forwards - proc.last_flush >= s.metrics_flush_every):
        proc.flush_metrics(wait=False)  # collects too
    elif stats_due:
        proc.stats.collect(wait=False)
    if stats_due:
        write_stats(proc)


def scheduler_idle(proc: ProcessState) -> None:
    """SGLang's scheduler went idle (``Scheduler.on_idle``: no batch to run, none in flight): when forwards
    ran since it last was, the device figures are collected exactly, and the metrics window and the stats
    file written from them. Waiting for the device is fine here: no forward is running, so it stalls
    nothing (and on_idle is not reached while the overlap scheduler has a batch in flight)."""
    if proc.stats.forwards == proc.idle_read:
        return
    proc.idle_read = proc.stats.forwards
    if proc.observe:
        proc.flush_metrics(wait=True)
    else:
        proc.stats.collect(wait=True)
    if proc.settings.stats_dir is not None:
        write_stats(proc)


def check_coverage(proc: ProcessState, *, final: bool = True) -> str | None:
    """If the selector is enabled but has selected on no MoE layer, log it once (WARNING) with the
    reasons; returns the message (None when it selects somewhere, or is off). ``final=False`` (after
    the first decode forward) speaks only when the hook was never called or every layer seen has a
    reason of its own (an unsupported router), not for a batch that was merely too small."""
    st = proc.stats
    if not proc.settings.enabled or st.applied:
        return None
    if not final and st.calls and (not st.coverage or not reaches_no_layer(st.coverage)):
        return None
    if st.calls == 0:
        msg = (f"xshare: the selector is enabled but the routing hook was never called in "
               f"{proc.applicable_forwards} decode forwards: this MoE runner backend computes its routing "
               f"without SGLang's select_experts (docs/routers.md says what to set)")
    else:
        layers = ", ".join(f"{k}: {v}" for k, v in sorted(st.coverage.items())) or "none noted"
        reasons = ", ".join(f"{r} x{n}" for r, n in st.skipped.most_common(4))
        msg = (f"xshare: the selector is enabled but selected on no MoE layer in {proc.applicable_forwards} "
               f"decode forwards; layers: {layers}; skip reasons: {reasons}")
    proc.log_once("coverage", logging.WARNING, "%s", msg)
    return msg


def check_model_settings(proc: ProcessState, num_experts: int | None, top_k: int | None,
                         moe_layers: tuple[int, ...]) -> None:
    """At model load: remember the MoE layer ids (per-layer settings are indexed by them) and refuse a
    per-layer budget / target mass that does not fit them (:class:`SettingsRefused`, naming the variable)."""
    if moe_layers:
        proc.moe_layers = tuple(moe_layers)
    sel = proc.settings.selector
    if not sel.per_layer:
        return
    try:
        check_for_model(sel, ModelShape(num_experts or 0, top_k or 1, proc.moe_layers))
    except ValueError as exc:
        name = str(exc).split(":", 1)[0].split(" ", 1)[0]
        raise SettingsRefused(f"xshare: refusing to start: {env_name(name)}: {exc}") from None


def startup_coverage(proc: ProcessState, statuses: dict[int, str], device_type: str = "cpu") -> str | None:
    """The start-up coverage report of the loaded model (:mod:`xshare.sglang.observe.coverage`): noted per
    layer, logged (INFO; a WARNING when the enabled selector reaches no layer, naming why and what to
    set); with ``require_coverage`` such a start raises :class:`CoverageRefused`. Returns the warning."""
    for layer_id, status in statuses.items():
        proc.stats.coverage.setdefault(layer_id, status)
    proc.stats.startup_coverage = dict(statuses)
    text = coverage_summary(statuses)
    log.info("xshare: coverage at start-up (rank %d): %s; backend %s", proc.rank, text,
             planned_backend(proc.settings.selector, device_type,
                             cpu_kernel=device_type == "cpu" and proc.cpu_kernel_ready()))
    if not proc.settings.enabled or not reaches_no_layer(statuses):
        return None
    msg = f"xshare: the selector is enabled but will select on no MoE layer of this model: {text}"
    proc.log_once("coverage", logging.WARNING, "%s", msg)
    if proc.settings.require_coverage:
        raise CoverageRefused(f"{msg}; refusing to serve (XSHARE_REQUIRE_COVERAGE=1)")
    return msg


def write_stats(proc: ProcessState) -> None:
    """The counters as JSON in ``XSHARE_STATS_DIR/xshare-stats-<pid>.json`` (atomically replaced): the
    device figures as far as the last collect brought them (this reads host figures only)."""
    s = proc.settings
    if s.stats_dir is None:
        return
    snap = proc.stats.snapshot(fresh=False)
    snap.update({"rank": proc.rank, "settings": s.describe(), "enabled": s.enabled,
                 "policy": s.selector.policy, "budget": s.selector.to_dict()["budget"]})
    write_json_atomic(s.stats_dir / f"xshare-stats-{os.getpid()}.json", snap)


def first_applied(proc: ProcessState) -> None:
    """The first call the selector routed in this process: said once (INFO), the stats file written and
    the metrics flushed at the end of the forward."""
    if proc.first_applied_logged:
        return
    proc.first_applied_logged = True
    proc.flush_pending = True
    log.info("xshare: selector active in scheduler pid %d (rank %d): %s", os.getpid(), proc.rank,
             proc.settings.describe())
    if proc.settings.stats_dir is not None:
        write_stats(proc)
