"""The Grafana dashboard for XShare on SGLang (``deploy/k8s/xshare-sglang/dashboards/xshare-sglang.json``).

Built with grafana-foundation-sdk's builders (``scripts/install_deploy_tools.sh`` installs it)::

    python -m xshare.deploy.dashboard                # (re)write the chart's dashboards/xshare-sglang.json
    python -m xshare.deploy.dashboard --check        # exit 1 if the committed file differs from a fresh build

The committed JSON lives inside the Helm chart, which ships it as a ConfigMap (so ``helm package`` carries it);
``dashboards/xshare-sglang.json`` at the repository root is a link to it, the file to import in Grafana. Panels
read the plugin's metrics (:data:`XSHARE_METRICS`, the contract of :mod:`xshare.sglang.observe.metrics`: every
series has label ``rank``) and SGLang's own ``sglang:*`` metrics. Variables: ``datasource``, ``model`` (SGLang's
``model_name``), ``instance`` (every scraped pod or process, leader and workers) and ``layer``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from xshare.sglang.observe.metrics import METRICS

UID = "xshare-sglang"
TITLE = "XShare on SGLang: MoE expert activation and peak GPU load"
#: The chart's copy, the only one (the repository's dashboards/xshare-sglang.json links to it).
DEFAULT_OUT = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "xshare-sglang" / "dashboards" / f"{UID}.json"

#: The plugin's metrics as exposed on /metrics (counters with their ``_total`` suffix): name -> (type, labels),
#: derived from the plugin's own definitions (:data:`xshare.sglang.observe.metrics.METRICS`; every series has ``rank``).
XSHARE_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    name: (kind, ("rank", *labels)) for name, (kind, labels, _doc) in METRICS.items()
}

_X = 'instance=~"$instance"'
_XL = 'instance=~"$instance", layer=~"$layer"'
_S = 'instance=~"$instance", model_name=~"$model"'
_RI = "$__rate_interval"


def _q(name: str, sel: str, q: float) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({name}_bucket{{{sel}}}[{_RI}])))"


def _rate_by(by: str, name: str) -> str:
    return f"sum by ({by}) (rate({name}{{{_X}}}[{_RI}]))"


def _mean(name: str, sel: str, by: str = "") -> str:
    agg = f"sum by ({by}) " if by else "sum "
    return f"{agg}(rate({name}_sum{{{sel}}}[{_RI}])) / {agg}(rate({name}_count{{{sel}}}[{_RI}]))"


class _Kit:
    """grafana-foundation-sdk's builders (imported on first use: an optional dependency) and the panel helpers
    every section uses: a Prometheus target and a time-series panel on the ``datasource`` variable."""

    def __init__(self) -> None:
        from grafana_foundation_sdk.builders import common as cb
        from grafana_foundation_sdk.builders import dashboard as db
        from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
        from grafana_foundation_sdk.builders import prometheus as prom
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.models import common
        from grafana_foundation_sdk.models import dashboard as dm

        self.cb, self.db, self.prom, self.common, self.dm = cb, db, prom, common, dm
        self.heatmap, self.stat, self.table, self.timeseries = heatmap, stat, table, timeseries
        self.JSONEncoder = JSONEncoder
        self.ds = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

    def target(self, expr: str, legend: str, ref: str, instant: bool = False, fmt: str | None = None) -> Any:
        t = self.prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(self.ds)
        if instant:
            t = t.instant()
        if fmt:
            t = t.format(fmt)
        return t

    def ts(self, title: str, desc: str, unit: str, targets: list[tuple[str, str]], w: int = 12, h: int = 8,
           stepped: bool = False) -> Any:
        """A time-series panel, one target per ``(expr, legend)`` (refs A, B, ...), legend as a table below."""
        common = self.common
        p = (self.timeseries.Panel().title(title).description(desc).unit(unit).datasource(self.ds).span(w).height(h)
             .legend(self.cb.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True).calcs(["mean", "max", "lastNotNull"])))
        if stepped:
            p = p.line_interpolation(common.LineInterpolation.STEP_AFTER)
        for i, (expr, legend) in enumerate(targets):
            p = p.with_target(self.target(expr, legend, chr(ord("A") + i)))
        return p

    def query_variable(self, name: str, label: str, query: str, sort: Any) -> Any:
        """A multi-select query variable with "All" (``.*``), refreshed when the time range changes."""
        dm = self.dm
        return (self.db.QueryVariable(name).label(label).datasource(self.ds).query(query)
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort)
                .multi(True).include_all(True).all_value(".*"))


def _dashboard(k: _Kit) -> Any:
    """The dashboard's settings and its variables: ``datasource``, ``model``, ``instance``, ``layer``."""
    dm = k.dm
    return (
        k.db.Dashboard(TITLE)
        .uid(UID)
        .description("Batch-aware MoE expert selection (XShare) on SGLang: activated experts per GPU and layer, "
                     "peak GPU load against vanilla top-k routing, gate mass kept, fallbacks, the budget in force, "
                     "and SGLang's throughput and latency.")
        .tags(["xshare", "sglang", "moe"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
        .with_variable(k.db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(k.query_variable("model", "Model", "label_values(sglang:num_requests_total, model_name)",
                                        dm.VariableSort.ALPHABETICAL_ASC))
        .with_variable(k.query_variable("instance", "Instance", "label_values(xshare:config_info, instance)",
                                        dm.VariableSort.ALPHABETICAL_ASC))
        .with_variable(k.query_variable("layer", "Layer",
                                        'label_values(xshare:gpu_active_experts{instance=~"$instance"}, layer)',
                                        dm.VariableSort.NUMERICAL_ASC))
    )


def _peak_load(k: _Kit) -> list[Any]:
    """Row "Peak GPU load": the peak per-GPU activated experts against vanilla top-k, the reduction, peak / mean."""
    peak = "xshare:peak_gpu_active_experts"
    vpeak = "xshare:vanilla_peak_gpu_active_experts"
    return [
        k.db.Row("Peak GPU load: XShare vs vanilla top-k"),
        k.ts(
            "Peak per-GPU activated experts",
            "Per layer and forward, the largest number of activated experts on one GPU (EP rank): the load that "
            "sets the step time. p95 and max (highest histogram bucket) of the policy in force against what "
            "vanilla top-k would have activated on the same batches.",
            "short",
            [(_q(peak, _X, 0.95), "XShare p95"), (_q(vpeak, _X, 0.95), "vanilla p95"),
             (_q(peak, _X, 1.0), "XShare max"), (_q(vpeak, _X, 1.0), "vanilla max"),
             (_mean(peak, _X), "XShare mean"), (_mean(vpeak, _X), "vanilla mean")],
            w=16, h=9),
        k.stat.Panel().title("Peak reduction vs vanilla").datasource(k.ds).span(8).height(9).unit("percentunit")
        .description("1 - mean peak per-GPU activated experts (XShare) / the same for vanilla top-k.")
        .with_target(k.target(f"1 - ({_mean(peak, _X)}) / ({_mean(vpeak, _X)})", "reduction", "A")),
        k.ts(
            "Peak / mean per-GPU activated experts",
            "Imbalance across GPUs: max over GPUs divided by the mean over GPUs, per layer and forward.",
            "short",
            [(_q("xshare:peak_mean_ratio", _X, 0.5), "p50"), (_q("xshare:peak_mean_ratio", _X, 0.95), "p95")],
            w=24, h=7),
    ]


def _per_gpu(k: _Kit) -> list[Any]:
    """Row "Per GPU": the heatmap of activated experts per GPU, max vs mean GPU, tokens routed per GPU."""
    heatmap, common = k.heatmap, k.common
    return [
        k.db.Row("Per GPU"),
        heatmap.Panel().title("Activated experts per GPU").datasource(k.ds).span(16).height(10)
        .description("Mean activated experts on each GPU over the plugin's flush window, averaged over the "
                     "selected layers (or all layers: layer \"all\", the default detail). Rows are GPUs "
                     "(EP ranks); each GPU is reported by the rank that owns it.")
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.UNKNOWN).value("experts"))
        .color(heatmap.HeatmapColorOptions().mode("scheme").scheme("Oranges").fill("dark-orange")
               .scale("exponential").exponent(0.5).steps(64).reverse(False))
        .y_axis(heatmap.YAxisConfig().axis_label("GPU"))
        .cell_values(heatmap.CellValues().decimals(1))
        .with_target(k.target(f"avg by (gpu) (xshare:gpu_active_experts{{{_XL}}})", "GPU {{gpu}}", "A")),
        k.ts(
            "Max vs mean GPU (activated experts)",
            "Max and mean over GPUs of the per-GPU activated experts gauge (selected layers).",
            "short",
            [(f"max(avg by (gpu) (xshare:gpu_active_experts{{{_XL}}}))", "max GPU"),
             (f"avg(avg by (gpu) (xshare:gpu_active_experts{{{_XL}}}))", "mean GPU")],
            w=8, h=10),
        k.ts(
            "Tokens routed per GPU",
            "Tokens routed to each GPU (EP rank), mean over the flush window, summed over the selected layers.",
            "short",
            [(f"sum by (gpu) (xshare:gpu_tokens{{{_XL}}})", "GPU {{gpu}}")],
            w=24, h=8),
    ]


def _per_layer(k: _Kit) -> list[Any]:
    """Row "Per layer": activated experts per layer, of the policy in force and of vanilla top-k."""

    def by_layer(title: str, desc: str, metric: str) -> Any:
        return k.ts(title, desc, "short", [(_mean(metric, _XL, "layer"), "layer {{layer}}")])

    return [
        k.db.Row("Per layer"),
        by_layer("Activated experts per layer (policy in force)",
                 "Distinct experts activated per forward in each MoE layer, mean over forwards. One line per layer "
                 "with XSHARE_METRICS_DETAIL=layer; at the default detail the layers are aggregated (layer \"all\").",
                 "xshare:active_experts"),
        by_layer("Activated experts per layer (vanilla top-k)",
                 "What vanilla top-k routing would have activated on the same batches (per layer with "
                 "XSHARE_METRICS_DETAIL=layer, else all layers).",
                 "xshare:vanilla_active_experts"),
    ]


def _quality(k: _Kit) -> list[Any]:
    """Row "Quality and fallbacks": gate mass kept, fallbacks, selector latency."""
    return [
        k.db.Row("Quality and fallbacks"),
        k.ts(
            "Gate mass kept",
            "Fraction of the router's gate mass kept by the selection (1 = vanilla), and the fraction of tokens "
            "that kept their top-1 expert.",
            "percentunit",
            [(_mean("xshare:mass_kept", _X), "mass kept (mean)"), (_q("xshare:mass_kept", _X, 0.05), "mass kept p05"),
             (_mean("xshare:top1_kept", _X), "top-1 kept (mean)")],
            w=8),
        k.ts(
            "Fallbacks and selector calls",
            "Selector calls per second, fallbacks to vanilla routing per second by reason, tokens routed exactly "
            "because their request asked, and layer calls whose budget stopped a target mass short.",
            "ops",
            [(f"sum by (reason) (rate(xshare:fallbacks_total{{{_X}}}[{_RI}]))", "fallback: {{reason}}"),
             (f"sum(rate(xshare:selector_calls_total{{{_X}}}[{_RI}]))", "selector calls"),
             (f"sum(rate(xshare:exact_tokens_total{{{_X}}}[{_RI}]))", "exact tokens (requests asking xshare_exact)"),
             (f"sum(rate(xshare:mass_cap_bound_total{{{_X}}}[{_RI}]))", "target mass capped by the budget")],
            w=8),
        k.ts(
            "Selector latency",
            "Time spent in the selector per call.",
            "s",
            [(_q("xshare:selector_seconds", _X, 0.5), "p50"), (_q("xshare:selector_seconds", _X, 0.99), "p99")],
            w=8),
    ]


def _decode_time_and_modes(k: _Kit) -> list[Any]:
    """The same row continued: the MoE share of decode time, forward time, layer calls and experts by mode."""
    decode = f'{_X}, mode="decode"'
    return [
        k.ts(
            "MoE share of decode time (XSHARE_PROFILE=1)",
            "Host time in the MoE blocks over host time in decode forwards. Empty unless the plugin runs with "
            "XSHARE_PROFILE=1; host clock, so meaningful on CPU servers (launch time on a GPU).",
            "percentunit",
            [(f"sum(rate(xshare:moe_seconds_total{{{decode}}}[{_RI}])) / "
              f"sum(rate(xshare:forward_seconds_total{{{decode}}}[{_RI}]))", "MoE share of decode")],
            w=12),
        k.ts(
            "Decode forward time (XSHARE_PROFILE=1)",
            "Mean host time of one decode forward (whole model), per instance.",
            "s",
            [(f"sum by (instance) (rate(xshare:forward_seconds_total{{{decode}}}[{_RI}])) / "
              f"sum by (instance) (rate(xshare:forwards_total{{{decode}}}[{_RI}]))", "{{instance}}")],
            w=12),
        k.ts(
            "Layer calls by forward mode",
            "Routing hook calls and the calls the policy routed, per second, by forward mode (decode, "
            "target_verify of speculative decoding, extend, ...).",
            "ops",
            [(_rate_by("mode", "xshare:mode_calls_total"), "calls {{mode}}"),
             (_rate_by("mode", "xshare:mode_applied_total"), "routed {{mode}}")],
            w=12),
        k.ts(
            "Activated experts per routed layer call, by forward mode",
            "Experts the routed calls activated, and those SGLang's own top-k would have, per routed layer call.",
            "short",
            [(f"{_rate_by('mode', 'xshare:mode_active_experts_total')} / "
              f"{_rate_by('mode', 'xshare:mode_applied_total')}", "selected {{mode}}"),
             (f"{_rate_by('mode', 'xshare:mode_vanilla_active_experts_total')} / "
              f"{_rate_by('mode', 'xshare:mode_applied_total')}", "vanilla {{mode}}")],
            w=12),
    ]


def _configuration(k: _Kit) -> list[Any]:
    """Row "Configuration in force": the knobs per rank, policy and version, layers by coverage, changes."""
    per_rank = "{{instance}} rank {{rank}}"
    return [
        k.db.Row("Configuration in force"),
        k.ts(
            "Budget per rank",
            "The expert budget in force on each rank (changed at run time with `xshare admin set`).",
            "short",
            [(f"xshare:budget{{{_X}}}", per_rank)],
            w=12, stepped=True),
        k.ts(
            "Enabled, warm-up k, GPU cap, group budget",
            "The other knobs in force per rank.",
            "short",
            [(f"xshare:{knob}{{{_X}}}", f"{label} {per_rank}")
             for knob, label in (("enabled", "enabled"), ("warmup_k", "warmup k"), ("gpu_cap", "GPU cap"),
                                 ("group_budget", "group budget"))],
            w=12, stepped=True),
        k.table.Panel().title("Policy and version per rank").datasource(k.ds).span(8).height(7)
        .description("The policy in force on each rank and its config version (the value).")
        .with_target(k.target(f"max by (instance, rank) (xshare:config_version{{{_X}}}) * on (instance, rank) "
                              f"group_left (policy) max by (instance, rank, policy) "
                              f"(xshare:config_info{{{_X}}} > 0)", "", "A", instant=True, fmt="table")),
        k.stat.Panel().title("MoE layers by coverage").datasource(k.ds).span(8).height(7).unit("short")
        .description("MoE layers where the selector selects, is ready to, skips (with the reason) or is "
                     "bypassed by the runner backend (with the backend); the least and most over ranks.")
        .with_target(k.target(f"min by (state, reason) (xshare:layers{{{_X}}})", "{{state}} {{reason}} (min)", "A"))
        .with_target(k.target(f"max by (state, reason) (xshare:layers{{{_X}}})", "{{state}} {{reason}} (max)", "B")),
        k.ts("Configuration changes", "Run-time configuration changes (admin endpoint) per interval, by result.",
             "short", [(f"sum by (result) (increase(xshare:config_changes_total{{{_X}}}[{_RI}]))", "{{result}}")],
             w=8, h=7),
    ]


def _sglang(k: _Kit) -> list[Any]:
    """Row "SGLang throughput and latency": SGLang's own metrics (``sglang:*``) of the selected models."""

    def quantiles(name: str) -> list[tuple[str, str]]:
        return [(_q(name, _S, q), f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)]

    return [
        k.db.Row("SGLang throughput and latency"),
        k.ts("Generation throughput", "Decode tokens per second (SGLang scheduler).", "short",
             [(f"sum by (instance) (sglang:gen_throughput{{{_S}}})", "{{instance}}")], w=8),
        k.ts("End-to-end request latency", "", "s", quantiles("sglang:e2e_request_latency_seconds"), w=8),
        k.ts("Time to first token", "", "s", quantiles("sglang:time_to_first_token_seconds"), w=8),
        k.ts("Time per output token", "", "s", quantiles("sglang:request_time_per_output_token_seconds"), w=8),
        k.ts("Running and queued requests", "", "short",
             [(f"sum(sglang:num_running_reqs{{{_S}}})", "running"), (f"sum(sglang:num_queue_reqs{{{_S}}})", "queued")],
             w=8),
        k.ts("KV cache token usage", "", "percentunit",
             [(f"max by (instance) (sglang:token_usage{{{_S}}})", "{{instance}}")], w=8),
    ]


#: The dashboard's sections top to bottom, each a row followed by its panels (or panels continuing a row).
_SECTIONS = (_peak_load, _per_gpu, _per_layer, _quality, _decode_time_and_modes, _configuration, _sglang)


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (deterministic)."""
    k = _Kit()
    b = _dashboard(k)
    for section in _SECTIONS:
        for item in section(k):
            b = b.with_row(item) if isinstance(item, k.db.Row) else b.with_panel(item)
    out = json.loads(json.dumps(b.build(), cls=k.JSONEncoder, sort_keys=True))
    for i, panel in enumerate(out["panels"], start=1):  # the builders leave ids unset; Grafana wants them unique
        panel["id"] = i
    return out


def render(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xshare.deploy.dashboard", description="Build the Grafana dashboard.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    text = render(build())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m xshare.deploy.dashboard", file=sys.stderr)
            return 1
        return 0
    out = args.out.resolve()  # through dashboards/xshare-sglang.json, the link: write the chart's file, keep the link
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
