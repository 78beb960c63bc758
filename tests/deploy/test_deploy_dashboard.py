"""The Grafana dashboard (the Helm chart's dashboards/xshare-sglang.json) and its PromQL checks.

promtool (Debian `prometheus`, scripts/ci_system_deps.sh) parses every expression; outside CI a machine
without it skips those tests with the reason, in CI (CI=true) they fail instead (conftest.require_binary). The
metric names the dashboard reads are compared with a real scrape: of a prometheus_client exporter serving the metrics
contract over HTTP here, and of a live SGLang server in tests/deploy/test_deploy_launcher.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DASHBOARD as DASH
from conftest import ROOT, in_ci, require_binary, require_module, wait_targets_up
from xshare.deploy import promql
from xshare.deploy.dashboard import XSHARE_METRICS

DEPLOY_TOOLS = "installed by scripts/install_deploy_tools.sh"
PROMETHEUS = "run scripts/ci_system_deps.sh as root: apt-get install prometheus"

#: SGLang 0.5.23 metrics the dashboard reads, with their types (sglang/srt/observability/metrics_collector.py).
SGLANG_METRICS = {
    "sglang:num_requests_total": "counter",
    "sglang:gen_throughput": "gauge",
    "sglang:num_running_reqs": "gauge",
    "sglang:num_queue_reqs": "gauge",
    "sglang:token_usage": "gauge",
    "sglang:e2e_request_latency_seconds": "histogram",
    "sglang:time_to_first_token_seconds": "histogram",
    "sglang:request_time_per_output_token_seconds": "histogram",
}


def need_promtool() -> str:
    return require_binary("promtool", PROMETHEUS)


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASH.read_text())


def _all_panels(d):
    for p in d["panels"]:
        yield p
        yield from p.get("panels") or []


# -- the file -----------------------------------------------------------------------------------------
def test_committed_json_is_the_generator_output(dash):
    require_module("grafana_foundation_sdk", DEPLOY_TOOLS)
    from xshare.deploy.dashboard import build, render

    assert render(build()) == DASH.read_text(), "run: python -m xshare.deploy.dashboard"
    r = subprocess.run([sys.executable, "-m", "xshare.deploy.dashboard", "--check", "--out", str(DASH)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_one_copy_inside_the_chart():
    """The chart carries the file itself (``helm package`` ships it, tests/deploy/test_deploy_helm.py); the repository's
    dashboards/xshare-sglang.json, the file to import in Grafana, is a link to it; the generator writes it."""
    from xshare.deploy.dashboard import DEFAULT_OUT

    assert DASH.is_file() and not DASH.is_symlink() and not DASH.parent.is_symlink()
    link = ROOT / "dashboards" / "xshare-sglang.json"
    assert link.is_symlink() and link.resolve() == DASH.resolve()
    assert DEFAULT_OUT == DASH


def test_writing_through_the_link_keeps_the_link(tmp_path):
    require_module("grafana_foundation_sdk", DEPLOY_TOOLS)
    from xshare.deploy.dashboard import build, main, render

    real = tmp_path / "chart" / "dashboards" / "xshare-sglang.json"
    real.parent.mkdir(parents=True)
    real.write_text("{}\n")
    link = tmp_path / "dashboards" / "xshare-sglang.json"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "chart" / "dashboards" / "xshare-sglang.json")
    assert main(["--out", str(link)]) == 0
    assert link.is_symlink() and real.read_text() == render(build())


def test_check_mode_detects_a_stale_file(tmp_path):
    require_module("grafana_foundation_sdk", DEPLOY_TOOLS)
    stale = tmp_path / "d.json"
    stale.write_text(DASH.read_text().replace("Peak reduction vs vanilla", "Peak reduction"))
    r = subprocess.run([sys.executable, "-m", "xshare.deploy.dashboard", "--check", "--out", str(stale)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "out of date" in r.stderr


def test_loads_as_a_grafana_dashboard_model(dash):
    require_module("grafana_foundation_sdk", DEPLOY_TOOLS)
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel

    model = Dashboard.from_json(dash)
    assert model.uid == "xshare-sglang" and model.title == dash["title"]
    assert len(model.panels) == len(dash["panels"])
    for m, raw in zip(model.panels, dash["panels"], strict=True):
        assert isinstance(m, RowPanel if raw["type"] == "row" else Panel)
        if raw["type"] != "row":
            assert m.type_val == raw["type"] and len(m.targets) == len(raw["targets"])
    # the model round-trips to the same JSON: nothing in the file is outside Grafana's schema
    again = json.loads(json.dumps(model, cls=JSONEncoder, sort_keys=True))
    assert again == dash


def test_layout_ids_and_variables(dash):
    ids = [p["id"] for p in _all_panels(dash)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in _all_panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
    names = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "model", "layer"} <= set(names)
    for v in ("instance", "model", "layer"):
        assert names[v]["multi"] and names[v]["includeAll"] and names[v]["allValue"] == ".*"
    for p in _all_panels(dash):
        for t in p.get("targets") or []:
            assert t["datasource"]["uid"] == "${datasource}"
            if t["expr"].find("xshare:") >= 0 or t["expr"].find("sglang:") >= 0:
                assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
            if "sglang:" in t["expr"]:
                assert 'model_name=~"$model"' in t["expr"], (p["title"], t["expr"])


def test_panels_the_issue_asks_for(dash):
    by_title = {p["title"]: p for p in _all_panels(dash)}
    peak = by_title["Peak per-GPU activated experts"]
    exprs = " ".join(t["expr"] for t in peak["targets"])
    assert "histogram_quantile(0.95" in exprs and "histogram_quantile(1.0" in exprs
    assert "xshare:vanilla_peak_gpu_active_experts_bucket" in exprs and "xshare:peak_gpu_active_experts_bucket" in exprs
    assert by_title["Activated experts per GPU"]["type"] == "heatmap"
    assert "by (gpu)" in by_title["Activated experts per GPU"]["targets"][0]["expr"]
    assert "by (layer)" in by_title["Activated experts per layer (policy in force)"]["targets"][0]["expr"]
    assert "xshare:mass_kept" in json.dumps(by_title["Gate mass kept"])
    assert "xshare:fallbacks_total" in json.dumps(by_title["Fallbacks and selector calls"])
    assert "xshare:budget" in by_title["Budget per rank"]["targets"][0]["expr"]
    assert "{{rank}}" in by_title["Budget per rank"]["targets"][0]["legendFormat"]
    sglang = " ".join(t["expr"] for p in _all_panels(dash) for t in p.get("targets") or [] if "sglang:" in t["expr"])
    assert "sglang:gen_throughput" in sglang and "sglang:e2e_request_latency_seconds_bucket" in sglang
    # every metric of the contract is on the dashboard
    read = set(promql.dashboard_metrics(dash))
    for name in XSHARE_METRICS:
        assert any(r == name or r.startswith(name + "_") for r in read), f"{name} is on no panel"


# -- PromQL -------------------------------------------------------------------------------------------
def test_every_expression_parses_with_promtool(dash):
    exe = need_promtool()
    queries = promql.dashboard_queries(dash)
    assert len(queries) >= 40
    assert any(q.where.startswith("variable 'layer'") for q in queries)
    ok, out = promql.promtool_check(queries, exe)
    assert ok, out
    assert "SUCCESS" in out


def test_promtool_check_names_the_broken_panel(dash):
    exe = need_promtool()
    broken = copy.deepcopy(dash)
    panel = next(p for p in broken["panels"] if p["title"] == "Gate mass kept")
    panel["targets"][0]["expr"] = 'sum(rate(xshare:mass_kept_sum{instance=~"$instance"}[$__rate_interval])'
    ok, out = promql.promtool_check(promql.dashboard_queries(broken), exe)
    assert not ok
    assert "Gate mass kept" in out and "parse error" in out


def test_substitute_and_metric_names():
    e = 'sum by (gpu) (rate(a:b_bucket{instance=~"$instance",layer=~"${layer:regex}"}[$__rate_interval])) ' \
        '/ on(rank) group_left c:d + {__name__="e_total", job="[[job]]"}'
    s = promql.substitute(e)
    assert "$" not in s and "[[" not in s and "[1m]" in s and 'layer=~"x"' in s
    assert promql.metric_names(e) == {"a:b_bucket", "c:d", "e_total"}
    with pytest.raises(ValueError, match="cannot parse"):
        promql.metric_names("sum(rate(x[1m])")


def test_variable_queries_are_checked():
    d = {"panels": [], "templating": {"list": [
        {"type": "query", "name": "a", "query": "label_values(foo:bar{x=\"1\"}, instance)"},
        {"type": "query", "name": "b", "query": {"query": "label_values(job)", "refId": "B"}},
        {"type": "query", "name": "c", "query": "query_result(max(baz))"},
        {"type": "datasource", "name": "ds", "query": "prometheus"},
    ]}}
    qs = promql.dashboard_queries(d)
    assert [(q.where, q.expr) for q in qs] == [("variable 'a'", 'foo:bar{x="1"}'), ("variable 'c'", "max(baz)")]


# -- metric names against a real scrape ---------------------------------------------------------------
_LABEL_VALUES = {"mode": "decode"}  # the values the panels select; every other label gets "0"


def _exporter(skip: set[str] = frozenset()):
    require_module("prometheus_client", DEPLOY_TOOLS)
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

    reg = CollectorRegistry()
    metrics = {}
    for name, (kind, labels) in XSHARE_METRICS.items():
        if name in skip:
            continue
        cls = {"histogram": Histogram, "gauge": Gauge, "counter": Counter}[kind]
        metrics[name] = cls(name, f"contract metric {name}", list(labels), registry=reg)
    for name, kind in SGLANG_METRICS.items():
        if name in skip:
            continue
        cls = {"histogram": Histogram, "gauge": Gauge, "counter": Counter}[kind]
        metrics[name] = cls(name, name, ["model_name", "tp_rank"], registry=reg)
    # one series each, so every family has samples
    for name, m in metrics.items():
        labels = XSHARE_METRICS[name][1] if name in XSHARE_METRICS else ("model_name", "tp_rank")
        child = m.labels(*[_LABEL_VALUES.get(lab, "0") for lab in labels])
        if hasattr(child, "observe"):
            child.observe(3)
        elif hasattr(child, "set"):
            child.set(1)
        else:
            child.inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


def test_dashboard_contract_is_the_plugins():
    """The names, types and labels the dashboard assumes are the ones the plugin's exporter declares."""
    from xshare.sglang.observe import metrics
    assert {n: (t, ("rank", *labels)) for n, (t, labels, _doc) in metrics.METRICS.items()} == XSHARE_METRICS


def test_names_match_a_scrape_of_the_metrics_contract(dash):
    server, url = _exporter()
    try:
        text = promql.scrape(url)
    finally:
        server.shutdown()
        server.server_close()
    exposed = promql.scrape_names(text)
    assert "xshare:selector_calls_total" in exposed and "xshare:peak_gpu_active_experts_bucket" in exposed
    assert promql.missing_metrics(dash, exposed) == {}
    # promtool parses the exposition; its only lint is the colon in the names, a convention SGLang's own
    # `sglang:*` metrics share (Prometheus reserves colons for recording rules)
    if shutil.which("promtool") or in_ci():
        r = subprocess.run([need_promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
        problems = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert problems and all(line.endswith("metric names should not contain ':'") for line in problems), problems


@pytest.mark.parametrize("detail", ["group", "layer"])
def test_every_panel_reads_what_the_exporter_writes_at_both_detail_levels(dash, tmp_path, detail):
    """The real exporter (tests/sglang/test_metrics_budget.py's harness: 2 ranks, EP 2, 3 MoE layers) at the default
    detail and at per-layer detail: every xshare metric a panel reads is in the exposition, and the layer variable
    finds its values (``all`` at the default detail, the layer ids at ``layer``)."""
    require_module("prometheus_client", DEPLOY_TOOLS)
    from test_metrics_budget import count_series

    out = tmp_path / "metrics.txt"
    count_series(tmp_path, detail, layers=(1, 2, 3), experts=16, gpus=2, ep_size=2, ranks=2, changes=2,
                 exposition=out, profile=True)
    text = out.read_text()
    assert promql.missing_metrics(dash, promql.scrape_names(text), ("xshare:",)) == {}
    layers = set(re.findall(r'^xshare:gpu_active_experts\{[^}]*layer="([^"]+)"', text, re.M))
    assert layers == ({"all"} if detail == "group" else {"1", "2", "3"})
    gpus = set(re.findall(r'^xshare:gpu_active_experts\{gpu="(\d+)"[^}]*rank="(\d+)"', text, re.M))
    assert gpus == {("0", "0"), ("1", "1")}  # each GPU from the rank that owns it


def test_checker_reports_a_metric_the_scrape_lacks(dash, tmp_path):
    server, url = _exporter(skip={"xshare:gpu_tokens", "sglang:gen_throughput"})
    try:
        missing = promql.missing_metrics(dash, promql.scrape_names(promql.scrape(url)))
        assert set(missing) == {"xshare:gpu_tokens", "sglang:gen_throughput"}
        assert missing["xshare:gpu_tokens"] == ["panel 'Tokens routed per GPU' target A"]
        # the command-line form, as CI or a user runs it against a live server
        r = subprocess.run([sys.executable, "-m", "xshare.deploy.promql", str(DASH), "--scrape", url, "--no-promtool"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "missing metric xshare:gpu_tokens" in r.stdout
        r = subprocess.run([sys.executable, "-m", "xshare.deploy.promql", str(DASH), "--scrape", url, "--no-promtool",
                            "--prefix", "sglang:"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "xshare:gpu_tokens" not in r.stdout and "sglang:gen_throughput" in r.stdout
    finally:
        server.shutdown()
        server.server_close()


# -- every panel evaluated by a real Prometheus over real scrapes; the key panel drawn -------------------------
@pytest.mark.e2e
def test_panels_evaluate_on_a_real_prometheus_and_the_key_panel_draws(dash, tmp_path):
    import random
    import threading
    import time

    require_binary("prometheus", PROMETHEUS)
    require_module("prometheus_client", DEPLOY_TOOLS)
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

    from xshare.deploy import panel_png

    reg = CollectorRegistry()
    m = {}
    for name, (kind, labels) in {**XSHARE_METRICS, **{n: (k, ("model_name", "tp_rank")) for n, k in
                                                      SGLANG_METRICS.items()}}.items():
        cls = {"histogram": Histogram, "gauge": Gauge, "counter": Counter}[kind]
        kw = {"buckets": [i + 0.5 for i in range(16)]} if "experts" in name and kind == "histogram" else {}
        m[name] = (cls(name, name, list(labels), registry=reg, **kw), labels)
    stop = threading.Event()

    def feed():  # a plugin-like series: XShare peaks of 3-5 experts per GPU vs vanilla 6-8, two GPUs, two layers
        rnd = random.Random(0)
        while not stop.is_set():
            for name, (metric, labels) in m.items():
                for gpu in ("0", "1"):
                    values = {"rank": "0", "layer": str(int(gpu)), "gpu": gpu, "reason": "empty_batch",
                              "result": "ok", "policy": "xshare", "state": "selects", "model_name": "tiny",
                              "tp_rank": "0", "mode": "decode"}
                    child = metric.labels(*[values[k] for k in labels])
                    if "vanilla" in name and "peak" in name:
                        child.observe(rnd.randint(6, 8))
                    elif "peak_gpu" in name:
                        child.observe(rnd.randint(3, 5))
                    elif hasattr(child, "observe"):
                        child.observe(rnd.random())
                    elif hasattr(child, "set"):
                        child.set(rnd.randint(1, 8))
                    else:
                        child.inc()
            stop.wait(0.05)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    server, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
    try:
        with panel_png.LocalPrometheus([f"127.0.0.1:{server.server_address[1]}"], raw_job=True) as prom:
            start = time.time()
            up = wait_targets_up(prom, 2, timeout=30, settle=8)
            assert len(up) == 2 and all(t["health"] == "up" for t in up), up
            end = time.time()
            # Prometheus 2.x negotiates OpenMetrics and prometheus_client escapes ':' to '_': without the chart's
            # relabeling the stored names are not the ones the dashboard (and SGLang's own dashboards) read
            raw = panel_png.query_range(prom.url, '{job="raw", __name__=~"xshare.budget"}', end - 3, end, 1.0)
            assert {s["metric"]["__name__"] for s in raw} == {"xshare_budget"}
            fixed = panel_png.query_range(prom.url, '{job="xshare", __name__=~"xshare.budget"}', end - 3, end, 1.0)
            assert {s["metric"]["__name__"] for s in fixed} == {"xshare:budget"}
            empty = []
            for q in promql.dashboard_queries(dash):
                if q.where.startswith("variable"):
                    continue
                expr = panel_png.substitute(q.expr, {}, "5s")
                res = panel_png.query_range(prom.url, expr, end - 6, end, 1.0)
                if not res:
                    empty.append(q.where)
            assert empty == [], f"panels with no data from a scrape of every metric they read: {empty}"
            panel = panel_png.find_panel(dash, "Peak per-GPU activated experts")
            series = dict((name, vs) for name, _, vs in
                          panel_png.panel_series(prom.url, panel, {}, "5s", end - 6, end, 1.0))
            assert max(series["XShare p95"]) < min(series["vanilla p95"])  # what was fed: 3-5 vs 6-8
            assert 3 <= min(series["XShare mean"]) and max(series["vanilla mean"]) <= 8
            out = tmp_path / "peak.png"
            panel_png.plot(list(panel_png.panel_series(prom.url, panel, {}, "5s", start, end, 1.0)),
                           panel["title"], "experts", out)
            assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_panel_png_bad_input(tmp_path):
    from xshare.deploy import panel_png

    with pytest.raises(KeyError, match="no panel titled 'Nope'"):
        panel_png.find_panel(json.loads(DASH.read_text()), "Nope")
    r = subprocess.run([sys.executable, "-m", "xshare.deploy.panel_png", "--panel", "Nope", "--out",
                        str(tmp_path / "x.png"), "--prometheus", "http://127.0.0.1:9"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no panel titled" in r.stderr and not (tmp_path / "x.png").exists()
    assert panel_png.substitute('rate(a{i=~"$instance"}[$__rate_interval])', {"instance": "n1"}, "7s") == \
        'rate(a{i=~"n1"}[7s])'
    assert panel_png.legend("GPU {{gpu}}", {"gpu": "3"}, "e") == "GPU 3"
