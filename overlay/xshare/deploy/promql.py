"""Checks on a Grafana dashboard's PromQL (``python -m xshare.deploy.promql DASHBOARD [--scrape URL ...]``).

* :func:`dashboard_queries` lists every expression: panel targets (rows' nested panels too) and the
  ``label_values(...)`` queries of template variables;
* :func:`promtool_check` parses them with Prometheus' own parser (``promtool check rules`` on a rules file with
  one recording rule per expression; Grafana's ``$__rate_interval``/``$var`` placeholders substituted first);
* :func:`metric_names` lists the metric names an expression reads (promql-parser's AST);
* :func:`scrape_names` lists the sample names a live ``/metrics`` exposes, and :func:`missing_metrics` reports
  every dashboard metric that the scrape lacks, with the panels that read it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Prometheus metric relabeling that undoes prometheus_client's name escaping. prometheus_client (0.26) answers a
#: scrape whose Accept header asks for OpenMetrics 1.0 without ``escaping=allow-utf-8`` (what Prometheus 2.x sends)
#: with ``escaping=underscores`` and writes ``sglang:gen_throughput`` as ``sglang_gen_throughput``; every SGLang and
#: XShare metric name has exactly one colon, after its prefix, so this restores them. The Helm chart's PodMonitor
#: carries the same rule (as ``metricRelabelings``).
COLON_RESTORE_RELABEL = {
    "source_labels": ["__name__"],
    "regex": "(sglang|xshare)_(.+)",
    "target_label": "__name__",
    "replacement": "${1}:${2}",
}

_GRAFANA_DURATIONS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}
_VAR = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<sel>.+?)\s*,\s*)?(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard."""

    where: str  # "panel 'Title' target A" or "variable 'layer'"
    expr: str  # as written in the dashboard (Grafana placeholders included)


def _panels(panels: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every PromQL expression of the dashboard (panel targets and variable queries)."""
    out: list[Query] = []
    for p in _panels(dashboard.get("panels") or []):
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append(Query(f"panel {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for v in (dashboard.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not q:
            continue
        m = _LABEL_VALUES.match(q)
        if m:
            if m.group("sel"):
                out.append(Query(f"variable {v.get('name')!r}", m.group("sel")))
        elif not q.lstrip().startswith(("label_names(", "metrics(", "query_result(")):
            out.append(Query(f"variable {v.get('name')!r}", q))
        elif q.lstrip().startswith("query_result("):
            out.append(Query(f"variable {v.get('name')!r}", q.strip()[len("query_result("):-1]))
    return out


def substitute(expr: str) -> str:
    """Replace Grafana's placeholders with values Prometheus accepts (durations; ``x`` for variables)."""
    def rep(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return _GRAFANA_DURATIONS.get(name, "x")

    return _VAR.sub(rep, expr)


def promtool_check(queries: list[Query], promtool: str | None = None) -> tuple[bool, str]:
    """Parse every expression with ``promtool check rules``; returns (ok, promtool's output).

    Each expression is its own rule group, named after where it is, so an error names the panel."""
    exe = promtool or shutil.which("promtool")
    if not exe:
        raise FileNotFoundError("promtool not found (Debian package 'prometheus'; scripts/ci_system_deps.sh)")
    import yaml

    groups = [
        {"name": f"{i:03d} {q.where}",
         "rules": [{"record": f"xshare_dashboard:expr_{i:03d}", "expr": substitute(q.expr)}]}
        for i, q in enumerate(queries)
    ]
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "dashboard-rules.yml"
        f.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        r = subprocess.run([exe, "check", "rules", str(f)], capture_output=True, text=True, timeout=120)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: selector names and ``__name__="..."`` matchers."""
    import promql_parser as pp

    try:
        ast = pp.parse(substitute(expr))
    except Exception as e:  # noqa: BLE001 - the parser raises plain exceptions
        raise ValueError(f"cannot parse {expr!r}: {e}") from None
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__" and m.op == pp.MatchOp.Equal:
                    names.add(m.value)
        return True

    pp.walk(ast, visit)
    return names


def dashboard_metrics(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """metric name -> where the dashboard reads it."""
    out: dict[str, list[str]] = {}
    for q in dashboard_queries(dashboard):
        for n in metric_names(q.expr):
            out.setdefault(n, []).append(q.where)
    return out


def scrape_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (``_bucket``/``_sum``/``_count``/``_total`` included)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            names.add(s.name)
    return names


def scrape(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8")


def missing_metrics(
    dashboard: dict[str, Any], exposed: set[str], prefixes: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    """Dashboard metrics (optionally only those starting with one of ``prefixes``) absent from ``exposed``."""
    return {
        n: where
        for n, where in sorted(dashboard_metrics(dashboard).items())
        if n not in exposed and (not prefixes or n.startswith(prefixes))
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xshare.deploy.promql", description="Check a dashboard's PromQL.")
    p.add_argument("dashboard", type=Path)
    p.add_argument("--scrape", action="append", default=[], metavar="URL",
                   help="a /metrics URL; the dashboard may read only metrics these expose (repeatable)")
    p.add_argument("--prefix", action="append", default=[], help="check only metrics with this prefix (repeatable)")
    p.add_argument("--no-promtool", action="store_true", help="skip the promtool parse")
    args = p.parse_args(argv)
    try:
        dash = json.loads(args.dashboard.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"{args.dashboard}: {e}", file=sys.stderr)
        return 2
    queries = dashboard_queries(dash)
    rc = 0
    if not args.no_promtool:
        ok, out = promtool_check(queries)
        print(f"promtool: {len(queries)} expressions, {'ok' if ok else 'FAILED'}")
        if not ok:
            print(out)
            rc = 1
    if args.scrape:
        exposed: set[str] = set()
        for url in args.scrape:
            exposed |= scrape_names(scrape(url))
        missing = missing_metrics(dash, exposed, tuple(args.prefix))
        for n, where in missing.items():
            print(f"missing metric {n}: read by {', '.join(where)}")
        print(f"metrics: {len(dashboard_metrics(dash))} read by the dashboard, {len(missing)} missing from the scrape")
        rc = rc or (1 if missing else 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
