"""End to end: speculative decoding (NGRAM, 4 draft tokens) on a real SGLang 0.5.23 CPU server, one server for the
module, the trained tiny model (32 experts, top-4), the plugin loaded with the selector off and the admin endpoint on
loopback; the settings are switched at runtime (``PUT /xshare/config``), the NGRAM corpus and prefix cache emptied
before each run (``/flush_cache``), and the selector's figures read from the stats file (per forward mode).

* With the selector off, greedy outputs are the model's; ``xshare_spec`` at budget and per-request budget E gives
  the same tokens (speculation on in both).
* At the shipped speculative setting (``xshare_spec``, the default budget E/2, per-request budget top_k, each
  request anchored on its first row) with 4 concurrent requests: every verify call applies, activated experts per
  verify layer fall below vanilla top-k's, and no request's rows use more experts than its bound max(m_r, |W_r|)
  (the anchor's top_k and the 3 drafts' top-1: 7; 4 requests x 7 > 16 could be cut by the batch budget, which
  only lowers it). Without the anchor (``anchor_k`` 0) no request uses more than m_r = top_k.
"""

import concurrent.futures as cf
import json
import time
import urllib.request

import pytest

from conftest import require_binary, running
from xshare.bench.serve.client import Client
from xshare.bench.serve.grid import Setting
from xshare.models.tasks import MAX_ANSWER_CHARS, heldout
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

CLIENTS = 4
TOP_K = 4
DRAFT = 4  # rows per request in a verify batch
SHIPPED = Setting("xshare_spec", True, "xshare_spec", budget=0.5)  # group_budget and anchor_k: the defaults, top_k
UNANCHORED = Setting("xshare_spec,a=0", True, "xshare_spec", budget=0.5, anchor_k=0)
IDENTITY = Setting("xshare_spec@E", True, "xshare_spec", budget=1.0, group_budget=1.0)


@pytest.fixture(scope="module")
def server(trained_model, workdir):
    require_binary("c++", "a C++ compiler: SGLang compiles NGRAM's corpus on first use")
    with running(ServerProcess(
        trained_model, xshare_args=["--xshare-disable", "--xshare-stats-dir", str(workdir / "stats"),
                                    "--xshare-stats-every", "1"],
        sglang_args=["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4"],
        env={"XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL": "1"},
        log_path=workdir / "server.log", startup_timeout=900,  # the CI machine is shared: be patient
    )) as srv:
        yield srv


def _verify_stats(workdir):
    (path,) = sorted((workdir / "stats").glob("xshare-stats-*.json"))
    return json.loads(path.read_text())["modes"].get("target_verify", {})


def _run(server, workdir, setting):
    client = Client(server.base_url, None)
    client.set_config(setting)
    client.flush_cache()
    before = _verify_stats(workdir)
    prompts = [p.prompt for p in heldout(12, seed=5)]
    with cf.ThreadPoolExecutor(CLIENTS) as ex:
        outs = list(ex.map(lambda p: server.generate(p, max_new_tokens=MAX_ANSWER_CHARS + 1), prompts))
    assert all(o["meta_info"].get("spec_verify_ct", 0) > 0 for o in outs), "speculative decoding did not verify"
    return [o["output_ids"] for o in outs], before, _verify_stats(workdir)


@pytest.fixture(scope="module")
def runs(server, workdir):
    off = _run(server, workdir, Setting("off", False))
    unanchored = _run(server, workdir, UNANCHORED)  # first: the per-request maximum is cumulative
    shipped = _run(server, workdir, SHIPPED)  # before the identity run, for the same reason
    identity = _run(server, workdir, IDENTITY)
    return {"off": off, "unanchored": unanchored, "shipped": shipped, "identity": identity}


def _delta(after, before, *keys):
    for k in keys[:-1]:
        after, before = after.get(k, {}), before.get(k, {})
    return after.get(keys[-1], 0) - before.get(keys[-1], 0)


def test_budget_e_gives_the_selector_off_tokens(runs):
    off, _, _ = runs["off"]
    ids, before, after = runs["identity"]
    assert ids == off
    assert _delta(after, before, "applied") > 0 and _delta(after, before, "applied") == _delta(after, before, "calls")


def test_selector_off_routes_nothing(runs):
    _, before, after = runs["off"]
    calls = _delta(after, before, "calls")
    assert calls > 0 and _delta(after, before, "applied") == 0
    assert _delta(after, before, "skipped", "disabled") == calls


def test_shipped_setting_applies_on_every_verify_call_and_activates_fewer_experts(runs):
    _, before, after = runs["shipped"]
    calls = _delta(after, before, "calls")
    assert calls > 0 and _delta(after, before, "applied") == calls
    assert after["skipped"] == before["skipped"]  # no verify call left to SGLang
    for layer in after["layers"]:
        n = _delta(after, before, "layers", layer, "calls")
        active = _delta(after, before, "layers", layer, "activated") / n
        vanilla = _delta(after, before, "layers", layer, "vanilla_activated") / n
        print(f"verify layer {layer}: activated experts {vanilla:.2f} -> {active:.2f} ({n} calls)")
        assert active < vanilla


def test_per_request_budget_holds_per_request(runs):
    _, before, after = runs["unanchored"]
    req = after["requests"]
    assert req["request_calls"] > 0
    assert req["over_group_budget"] == 0 and req["max_experts"] <= TOP_K, req  # m_r = top_k
    _, before, after = runs["shipped"]
    req = after["requests"]
    assert _delta(after, before, "requests", "request_calls") > 0
    assert _delta(after, before, "requests", "over_group_budget") == 0, req
    assert req["max_experts"] <= TOP_K + (DRAFT - 1) * 1, req  # the anchor's top_k and the drafts' top-1


def test_admin_stats_report_the_verify_forwards(runs, server):
    deadline = time.monotonic() + 30  # the scheduler flushes its window when it goes idle
    while True:
        with urllib.request.urlopen(server.base_url + "/xshare/stats", timeout=10) as r:
            (rank,) = json.loads(r.read())["ranks"]
        verify = rank.get("modes", {}).get("target_verify", {})
        if verify.get("applied", 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert verify["applied"] > 0 and verify["mean_activated"] < verify["mean_vanilla_activated"]
    assert rank["modes"]["extend"]["skipped"].get("mode_extend", 0) > 0  # prefill is left alone
