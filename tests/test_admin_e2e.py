"""End to end: metrics and the admin endpoint on a real SGLang 0.5.23 CPU server (one server for the module).

Server: the tiny Qwen3-MoE (16 experts, top-4, 2 MoE layers), ``--enable-metrics``, ``xshare`` starting at budget 16
(= E: vanilla routing), warm-up 0, 4 simulated GPUs, metrics flushed every 2 forwards, an admin token from a file.
"""

import concurrent.futures as cf
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import require_binary, running, wait_targets_up
from xshare.models.tiny_moe import TinyMoeSpec
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-admin-token"
SPEC = TinyMoeSpec()
PROMPTS = [f"def {n}(a, b):\n    return" for n in ("add", "sub", "mul", "div", "load", "save", "read", "send")]


PROMETHEUS = "the Debian package prometheus: scripts/ci_system_deps.sh"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("xshare-admin")
    (work / "token").write_text(TOKEN + "\n")
    with running(ServerProcess(tiny_model, xshare_args=["--xshare-policy", "xshare", "--xshare-budget", "16",
                                                        "--xshare-warmup-k", "0"],
                               sglang_args=["--enable-metrics"],
                               env={"XSHARE_ADMIN_TOKEN_FILE": str(work / "token"), "XSHARE_SIM_GPUS": "4",
                                    "XSHARE_METRICS_FLUSH_EVERY": "2"},
                               log_path=work / "server.log")) as srv:
        yield srv


def call(srv, method, path, body=None, token=TOKEN, raw=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(srv.base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def scrape(srv):
    with urllib.request.urlopen(srv.base_url + "/metrics", timeout=30) as r:
        return r.read().decode()


def series(text, name):
    """{labels string: value} of one sample name."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def total(text, name):
    return sum(series(text, name).values())


def traffic(srv, n=8, tokens=10):
    with cf.ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda p: srv.generate(p, max_new_tokens=tokens), PROMPTS[:n]))
    assert all(len(o["output_ids"]) == tokens for o in outs)
    time.sleep(1.0)  # the scheduler goes idle and flushes the last window


def mean_active(before, after):
    d_sum = total(after, "xshare:active_experts_sum") - total(before, "xshare:active_experts_sum")
    d_n = total(after, "xshare:active_experts_count") - total(before, "xshare:active_experts_count")
    return d_sum / d_n, d_n


def test_metrics_appear_and_move_with_traffic(server):
    before = scrape(server)
    traffic(server)
    after = scrape(server)
    for name in ("xshare:selector_calls_total", "xshare:active_experts_count", "xshare:vanilla_active_experts_count",
                 "xshare:peak_gpu_active_experts_count", "xshare:mass_kept_count", "xshare:selector_seconds_count"):
        assert total(after, name) > total(before, name), name
    gpus = {re.search(r'gpu="(\d+)"', k).group(1) for k in series(after, "xshare:gpu_active_experts")}
    assert gpus == {"0", "1", "2", "3"}  # XSHARE_SIM_GPUS=4
    layers = {re.search(r'layer="(\d+)"', k).group(1) for k in series(after, "xshare:active_experts_count")}
    assert layers == {str(i) for i in range(SPEC.num_layers)}
    assert series(after, "xshare:budget") == {'{rank="0"}': 16.0}
    assert series(after, "xshare:enabled") == {'{rank="0"}': 1.0}
    # budget 16 = E: the policy activates what vanilla top-k does
    m, n = mean_active(before, after)
    dv = total(after, "xshare:vanilla_active_experts_sum") - total(before, "xshare:vanilla_active_experts_sum")
    print(f"\nbudget 16: {n:.0f} layer calls, mean activated {m:.2f}, vanilla {dv / n:.2f}")
    assert m == pytest.approx(dv / n) and m > 4


def test_promtool_passes_on_a_live_scrape(server, tmp_path):
    """promtool 2.42 parses the scrape; its only finding on xshare series is the style lint on ':' in names, which
    the metric contract (like SGLang's own sglang:* names) uses on purpose (docs/observability.md)."""
    promtool = require_binary("promtool", PROMETHEUS)
    traffic(server, n=2, tokens=4)
    text = scrape(server)
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    findings = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert not any("error while linting" in f or "parse" in f.lower() for f in findings), findings
    xs = [f for f in findings if f.startswith("xshare")]
    colon = "metric names should not contain ':'"
    print(f"\npromtool check metrics: rc={r.returncode}, {len(findings)} findings, xshare: {len(xs)} "
          f"(all the ':' style lint: {all(f.endswith(colon) for f in xs)})")
    assert xs and all(f.endswith(colon) for f in xs), xs
    assert r.returncode in (0, 3)  # 3 = lint findings only
    # the same series with ':' replaced pass promtool without any finding
    clean = "\n".join(line.replace("xshare:", "xshare_") for line in text.splitlines()
                      if "xshare:" in line) + "\n"
    rc = subprocess.run([promtool, "check", "metrics"], input=clean, capture_output=True, text=True, timeout=60)
    assert rc.returncode == 0, rc.stdout + rc.stderr


def test_auth_401_403(server):
    assert call(server, "GET", "/xshare/config", token=None)[0] == 401
    assert call(server, "GET", "/xshare/config", token="wrong")[0] == 403
    assert call(server, "PATCH", "/xshare/config", {"budget": 8}, token=None)[0] == 401
    assert call(server, "PATCH", "/xshare/config", {"budget": 8}, token="wrong")[0] == 403
    assert call(server, "POST", "/xshare/disable", token="wrong")[0] == 403
    status, cfg = call(server, "GET", "/xshare/config")
    assert status == 200 and cfg["config"]["budget"] == 16 and cfg["consistent"]
    assert [r["rank"] for r in cfg["ranks"]] == [0]


@pytest.mark.parametrize("body, field", [
    ({"budget": 17}, "budget"), ({"budget": 3}, "budget"), ({"budget": "8"}, "budget"),
    ({"policy": "nope"}, "policy"), ({"bogus": 1}, "bogus"), ({"warmup_k": -1}, "warmup_k"),
    ({"enabled": "yes"}, "enabled"),
])
def test_bad_values_422_and_config_unchanged(server, body, field):
    _, before = call(server, "GET", "/xshare/config")
    status, reply = call(server, "PATCH", "/xshare/config", body)
    assert status == 422, reply
    assert any(field in [str(x) for x in d["loc"]] for d in reply["detail"]), reply
    _, after = call(server, "GET", "/xshare/config")
    assert after["version"] == before["version"] and after["config"] == before["config"]
    assert after["ranks"] == before["ranks"]


def test_patch_lowers_activated_experts(server):
    traffic(server, n=8, tokens=6)
    a = scrape(server)
    traffic(server)
    b = scrape(server)
    high, _ = mean_active(a, b)
    status, reply = call(server, "PATCH", "/xshare/config", {"budget": 4})
    assert status == 200, reply
    assert reply["config"]["budget"] == 4 and reply["consistent"]
    assert all(r["version"] == reply["version"] and r["config"]["budget"] == 4 for r in reply["ranks"])
    c = scrape(server)
    assert series(c, "xshare:budget") == {'{rank="0"}': 4.0}
    assert series(c, "xshare:config_info")[f'{{policy="xshare",rank="0",version="{reply["version"]}"}}'] == 1.0
    traffic(server)
    d = scrape(server)
    low, n = mean_active(c, d)
    print(f"\nactivated experts per layer call: budget 16 -> {high:.2f}, after PATCH budget 4 -> {low:.2f} ({n:.0f})")
    assert low <= 4.0 < high
    _, stats = call(server, "GET", "/xshare/stats")
    assert stats["ranks"] and all(v["active"] <= 4.0 for v in stats["ranks"][0]["layers"].values())
    assert total(d, "xshare:config_changes_total") >= 2  # the scheduler's 'applied' and the HTTP side's


def test_disable_enable(server):
    status, reply = call(server, "POST", "/xshare/disable")
    assert status == 200 and reply["config"]["enabled"] is False and reply["ranks"][0]["config"]["enabled"] is False
    assert series(scrape(server), "xshare:enabled") == {'{rank="0"}': 0.0}
    status, reply = call(server, "POST", "/xshare/enable")
    assert status == 200 and reply["config"]["enabled"] is True
    assert series(scrape(server), "xshare:enabled") == {'{rank="0"}': 1.0}


def test_budget_changes_under_16_concurrent_clients(server):
    per_client, tokens = 3, 8
    results = []

    def client(i):
        out = []
        for j in range(per_client):
            # ignore_eos: the budget changes alter the random model's greedy text; completion is what counts
            r = server.generate(f"# request {i}.{j}\ndef f{i}(x):", max_new_tokens=tokens, ignore_eos=True)
            out.append(len(r["output_ids"]) == tokens and r["meta_info"]["finish_reason"]["type"] == "length")
        return out

    with cf.ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(client, i) for i in range(16)]
        versions = []
        for budget in (8, 5, 12, 6):
            time.sleep(0.5)
            status, reply = call(server, "PATCH", "/xshare/config", {"budget": budget})
            assert status == 200, reply
            versions.append(reply["version"])
        for f in futs:
            results.extend(f.result(timeout=300))
    ok = sum(results)
    print(f"\n16 clients x {per_client} requests during 4 budget changes: {ok}/{len(results)} complete")
    assert ok == len(results) == 16 * per_client
    assert versions == sorted(versions) and len(set(versions)) == 4
    _, cfg = call(server, "GET", "/xshare/config")
    assert cfg["config"]["budget"] == 6 and cfg["consistent"]


def test_openapi_shows_the_routes(server):
    with urllib.request.urlopen(server.base_url + "/openapi.json", timeout=30) as r:
        spec = json.loads(r.read())
    assert {"get", "put", "patch"} <= set(spec["paths"]["/xshare/config"])
    for path in ("/xshare/enable", "/xshare/disable", "/xshare/stats"):
        assert path in spec["paths"]
    schema = spec["paths"]["/xshare/config"]["patch"]["requestBody"]["content"]["application/json"]["schema"]
    assert "budget" in schema["properties"] and schema.get("additionalProperties") is False


def test_cli_client(server, tmp_path):
    tok = tmp_path / "tok"
    tok.write_text(TOKEN)
    cli = [sys.executable, "-m", "xshare.cli", "admin"]
    r = subprocess.run([*cli, "set", "--url", server.base_url, "--token-file", str(tok), "--budget", "7"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["budget"] == 7
    r = subprocess.run([*cli, "get", "--url", server.base_url, "--token", TOKEN], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["ranks"][0]["config"]["budget"] == 7
    r = subprocess.run([*cli, "set", "--url", server.base_url, "--token", TOKEN, "--budget", "99"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "422" in r.stderr and "budget" in r.stderr
    r = subprocess.run([*cli, "disable", "--url", server.base_url, "--token", "wrong"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "403" in r.stderr
    r = subprocess.run([*cli, "enable", "--url", server.base_url, "--token", TOKEN], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["enabled"] is True


def test_real_prometheus_scrapes_and_peak_gpu_query_returns_data(server):
    require_binary("prometheus", PROMETHEUS)
    from xshare.deploy import panel_png

    target = server.base_url.split("//", 1)[1]
    with panel_png.LocalPrometheus([target]) as prom:
        up = wait_targets_up(prom, timeout=60)
        assert up and all(t["health"] == "up" for t in up), up
        traffic(server, n=8, tokens=8)
        time.sleep(3)
        end = time.time()
        expr = "max by (rank) (max by (rank, layer) (xshare:gpu_active_experts))"
        res = panel_png.query_range(prom.url, expr, end - 5, end, 1)
        print(f"\nPromQL {expr}: {res[:1]}")
        assert res and all(float(v[1]) >= 1 for r in res for v in r["values"])
        q = "histogram_quantile(0.95, sum by (le) (rate(xshare:peak_gpu_active_experts_bucket[30s])))"
        res2 = panel_png.query_range(prom.url, q, end - 3, end, 1)
        print(f"PromQL {q}: {res2[:1]}")
        assert res2
