"""End to end, one real SGLang 0.5.23 CPU server for the module, at the default metrics detail (group): promtool on a
live scrape, the coverage metric, the aggregated series, and a short soak (``xshare bench soak``: 8 clients for
30 s while the config changes every 2 s).

Server: the tiny Qwen3-MoE (16 experts, top-4, 2 MoE layers), ``--enable-metrics``, ``xshare`` at budget 8, 4
simulated GPUs, metrics flushed every 2 forwards, an admin token.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import time

import pytest

from conftest import require_binary, running
from xshare._http import request
from xshare.models.tiny_moe import TinyMoeSpec
from xshare.sglang.server import ServerProcess, group_processes

pytestmark = pytest.mark.e2e

TOKEN = "metrics-e2e-admin-token"
SPEC = TinyMoeSpec()
PROMETHEUS = "the Debian package prometheus: scripts/ci_system_deps.sh"
#: The one promtool finding the metric contract accepts: ``xshare:*`` (like SGLang's own ``sglang:*``) uses the
#: colon on purpose (docs/observability.md, "promtool").
COLON_LINT = "metric names should not contain ':'"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("xshare-metrics")
    with running(ServerProcess(tiny_model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget", "8"],
                               sglang_args=["--enable-metrics"],
                               env={"XSHARE_ADMIN_TOKEN": TOKEN, "XSHARE_SIM_GPUS": "4",
                                    "XSHARE_METRICS_FLUSH_EVERY": "2", "OMP_NUM_THREADS": "1"},
                               log_path=work / "server.log", startup_timeout=600)) as srv:
        with cf.ThreadPoolExecutor(4) as pool:  # decode batches of 4: the selector applies on every MoE layer
            outs = list(pool.map(lambda i: srv.generate(f"def f{i}(x):", max_new_tokens=8), range(4)))
        assert all(len(o["output_ids"]) == 8 for o in outs)
        time.sleep(1.5)  # the scheduler goes idle and flushes
        yield srv


def scrape(srv) -> str:
    status, text = request(srv.base_url + "/metrics", "GET", text=True)
    assert status == 200
    return text


def samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def xshare_families(text: str) -> str:
    """The ``xshare:`` families of an exposition (their HELP/TYPE lines and samples)."""
    return "\n".join(line for line in text.splitlines()
                     if line.startswith("xshare:") or line.startswith(("# HELP xshare:", "# TYPE xshare:"))) + "\n"


def test_promtool_is_clean_on_a_live_scrape(server):
    """``promtool check metrics`` on the live scrape: no parse error, and the plugin's series have no finding but
    the colon lint (filtered by exactly that text). SGLang's own series have findings of their own (its naming:
    ``*_histogram`` names, gauges ending in ``_count``, ``le`` on non-histograms), printed, not the plugin's."""
    promtool = require_binary("promtool", PROMETHEUS)
    text = scrape(server)
    assert "xshare:selector_calls_total" in text and "sglang:" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    findings = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    colon = [f for f in findings if f == f"{f.split(' ', 1)[0]} {COLON_LINT}"]
    other = [f for f in findings if f not in colon]
    print(f"\npromtool check metrics (whole scrape): rc={r.returncode}, {len(findings)} findings, {len(colon)} the "
          f"':' lint; SGLang's own: {other}")
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 3: lint findings only, no parse error
    assert not [f for f in other if not f.startswith("sglang:")], other
    assert any(f.startswith("xshare:") for f in colon)
    # the plugin's families alone: the colon lint on each, nothing else; with '_' for ':' not even that
    mine = xshare_families(text)
    r = subprocess.run([promtool, "check", "metrics"], input=mine, capture_output=True, text=True, timeout=60)
    findings = [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    print(f"promtool check metrics (xshare families): {len(findings)} findings")
    assert findings and all(f == f"{f.split(' ', 1)[0]} {COLON_LINT}" for f in findings), findings
    r = subprocess.run([promtool, "check", "metrics"], input=mine.replace("xshare:", "xshare_"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_coverage_metric_counts_the_layers(server):
    text = scrape(server)
    layers = samples(text, "xshare:layers")
    # every MoE layer selects; the start-up report's 'ready' went to 0 when they did (a series is never deleted)
    assert {k: v for k, v in layers.items() if v} == {'{rank="0",reason="",state="selects"}':
                                                      float(len(SPEC.moe_layers))}, layers
    assert set(layers) <= {'{rank="0",reason="",state="selects"}', '{rank="0",reason="",state="ready"}'}, layers
    status, stats = request(server.base_url + "/xshare/stats", "GET", token=TOKEN)
    assert status == 200, stats
    coverage = stats["ranks"][0]["coverage"]
    assert sorted(coverage.values()) == ["selects"] * len(SPEC.moe_layers)


def test_default_detail_aggregates_layers_and_versions(server):
    text = scrape(server)
    layer_labels = set(re.findall(r'^xshare:[a-z_]+\{[^}]*layer="([^"]+)"', text, re.M))
    assert layer_labels == {"all"}
    assert set(re.findall(r'^xshare:gpu_active_experts\{gpu="(\d)"', text, re.M)) == {"0", "1", "2", "3"}
    assert "version=" not in text
    status, reply = request(server.base_url + "/xshare/config", "PATCH", token=TOKEN, body={"budget": 6})
    assert status == 200, reply
    status, reply = request(server.base_url + "/xshare/config", "PATCH", token=TOKEN, body={"budget": 8})
    assert status == 200, reply
    after = scrape(server)
    assert samples(after, "xshare:config_version") == {'{rank="0"}': float(reply["version"])}
    assert samples(after, "xshare:config_info") == {'{policy="xshare",rank="0"}': 1.0}  # one series, any version
    xs = {line.split(" ")[0] for line in after.splitlines() if line.startswith("xshare:")}
    print(f"\n{len(xs)} xshare series on this one-rank server")
    assert len(xs) < 250


def test_short_soak_keeps_its_invariants(server):
    """8 clients for 30 s, a config change every 2 s (random valid configs of the registry's policies,
    enable/disable, invalid ones): every request completes with all its tokens, no fallback, the last acknowledged
    config in force on the rank, the server's processes' memory within the margin."""
    from xshare.bench.soak import report, soak

    r = soak(server.base_url, TOKEN, clients=8, duration=30, change_every=2, max_requests=5000,
             max_new_tokens=8, pids=group_processes(server.proc.pid), seed=1)
    print("\n" + report(r))
    assert r["requests"] > 0 and r["failed"] == 0 and r["truncated"] == 0
    assert r["warmup"]["failed"] == 0 and r["warmup"]["truncated"] == 0
    assert r["fallbacks_unexpected"] == {}
    assert r["changes"]["acknowledged"] >= 5 and r["changes"]["invalid_refused"] >= 1
    assert r["changes"]["admin_errors"] == 0 and r["changes"]["valid_refused"] == 0
    assert r["changes"]["invalid_accepted"] == 0, r["change_problems"]
    assert r["every_rank_on_last_ack"] and [x["rank"] for x in r["ranks"]] == [0]
    assert r["memory"] and all(m["ok"] for m in r["memory"]), r["memory"]
    assert r["ok"]
