"""End to end: per-request exact routing on a real SGLang 0.5.23 CPU server (one server for the module).

Server: the trained tiny model (32 experts, top-4), ``xshare`` with budget 4 and no warm-up, metrics on, the
admin endpoint on loopback. A request with ``custom_params: {"xshare_exact": true}`` produces the same greedy
tokens as with the selector off, while the concurrent requests in its batches lose experts under the budget;
the exact-routed tokens are counted; a bad flag is refused with SGLang's 400 for a bad parameter. Then per-layer
budgets and target masses through the admin endpoint: bad ones get a 422 naming the setting, good ones apply per
layer.
"""

import concurrent.futures as cf
import json
import re
import urllib.error
import urllib.request

import pytest

from conftest import running
from xshare.models.tasks import heldout
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

BUDGET = 4
TOKENS = 12
EXACT = {"custom_params": {"xshare_exact": True}}


@pytest.fixture(scope="module")
def server(trained_model, workdir):
    with running(ServerProcess(
        trained_model,
        xshare_args=["--xshare-policy", "xshare", "--xshare-budget", str(BUDGET), "--xshare-warmup-k", "0",
                     "--xshare-stats-dir", str(workdir / "stats"), "--xshare-stats-every", "1"],
        sglang_args=["--enable-metrics"],
        env={"XSHARE_ADMIN_ALLOW_UNAUTHENTICATED_LOCAL": "1", "XSHARE_METRICS_FLUSH_EVERY": "1"},
        log_path=workdir / "server.log", startup_timeout=900,  # the CI machine is shared: be patient
    )) as srv:
        yield srv


@pytest.fixture(scope="module")
def prompts():
    return [p.prompt for p in heldout(8, seed=3)]


def _stats(workdir):
    (path,) = sorted((workdir / "stats").glob("xshare-stats-*.json"))
    return json.loads(path.read_text())


def _post(srv, path, body, method="POST"):
    return _call(srv, method, path, body)


def _call(srv, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(srv.base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _batch(srv, prompts, exact_first):
    """All prompts at once; the first one with the exact flag when ``exact_first``."""
    def one(i):
        extra = EXACT if (i == 0 and exact_first) else {}
        return srv.generate(prompts[i], max_new_tokens=TOKENS, ignore_eos=True, **extra)["output_ids"]
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        return list(ex.map(one, range(len(prompts))))


def _scrape_total(srv, name):
    with urllib.request.urlopen(srv.base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def runs(server, workdir, prompts):
    assert _post(server, "/xshare/disable", {})[0] == 200
    off_alone = server.generate(prompts[0], max_new_tokens=TOKENS, ignore_eos=True)["output_ids"]
    off = _batch(server, prompts, exact_first=False)
    assert _post(server, "/xshare/enable", {})[0] == 200
    before = _stats(workdir)
    shared = _batch(server, prompts, exact_first=False)
    mid = _stats(workdir)
    exact = _batch(server, prompts, exact_first=True)
    after = _stats(workdir)
    openai = server.completion(prompts[0], max_tokens=TOKENS, ignore_eos=True, **EXACT)
    return {"off_alone": off_alone, "off": off, "shared": shared, "exact": exact, "before": before, "mid": mid,
            "after": after, "openai": openai, "after_openai": _stats(workdir)}


def _changed_between(a, b):
    return sum(b["layers"][k]["changed_tokens"] - a["layers"].get(k, {}).get("changed_tokens", 0)
               for k in b["layers"])


def test_exact_request_matches_selector_off_while_the_others_lose_experts(runs):
    assert runs["exact"][0] == runs["off"][0] == runs["off_alone"]
    assert len(runs["exact"][0]) == TOKENS
    # the budget really bites: the concurrent requests' experts changed during the exact run
    assert _changed_between(runs["mid"], runs["after"]) > 0
    assert runs["after"]["fallbacks_total"] == 0


def test_the_flag_is_what_protects_the_request(runs):
    # without the flag, the same batch reroutes the first request's tokens too (the comparison means something)
    assert _changed_between(runs["before"], runs["mid"]) > _changed_between(runs["mid"], runs["after"])


def test_exact_tokens_are_counted(runs, server):
    # the exact request's decode tokens (its prefill is not a selector mode), in the stats file and on /metrics
    exact = runs["after"]["exact_tokens"] - runs["mid"]["exact_tokens"]
    assert TOKENS - 1 <= exact <= TOKENS
    assert runs["mid"]["exact_tokens"] == runs["before"]["exact_tokens"] == 0
    assert _scrape_total(server, "xshare:exact_tokens_total") >= runs["after"]["exact_tokens"] > 0


def test_openai_route_carries_the_flag(runs):
    assert runs["openai"]["choices"][0]["text"]
    assert runs["after_openai"]["exact_tokens"] - runs["after"]["exact_tokens"] >= TOKENS - 1


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_flag_is_a_bad_parameter(server, prompts, value):
    status, reply = _post(server, "/generate", {"text": prompts[0], "sampling_params": {
        "max_new_tokens": 2, "custom_params": {"xshare_exact": value}}})
    assert status == 400, reply
    assert "xshare_exact" in json.dumps(reply)
    status, reply = _post(server, "/v1/completions", {"model": server.model_path, "prompt": prompts[0],
                                                      "max_tokens": 2, "custom_params": {"xshare_exact": value}})
    assert status == 400 and "xshare_exact" in json.dumps(reply)


# -- per-layer values through the admin endpoint (last: they change the server's config) --------------------
@pytest.mark.parametrize("body, field", [
    ({"budget": {"default": 4, "7": 8}}, "budget"), ({"budget": [4, 4]}, "budget"),
    ({"target_mass": {"1": 1.5}}, "target_mass"), ({"target_mass": 0}, "target_mass"),
    ({"budget": 32, "target_mass": 0.9, "policy": "oea"}, "target_mass"),
])
def test_bad_per_layer_values_422_and_config_unchanged(server, body, field):
    _, before = _call(server, "GET", "/xshare/config")
    status, reply = _post(server, "/xshare/config", body, method="PATCH")
    assert status == 422, reply
    assert any(field in [str(x) for x in d["loc"]] for d in reply["detail"]), reply
    _, after = _call(server, "GET", "/xshare/config")
    assert after["version"] == before["version"] and after["config"] == before["config"]


def _activated(a, b, layer):
    la, lb = a["layers"].get(layer, {}), b["layers"][layer]
    return (lb["activated"] - la.get("activated", 0)) / max(1, lb["calls"] - la.get("calls", 0))


def test_per_layer_budget_and_target_mass_apply(server, workdir, prompts):
    status, reply = _post(server, "/xshare/config", {"budget": {"default": 4, "2": 32}}, method="PATCH")
    assert status == 200, reply
    assert reply["config"]["budget"] == {"default": 4, "2": 32}
    a = _stats(workdir)
    _batch(server, prompts, exact_first=False)
    b = _stats(workdir)
    assert _activated(a, b, "2") > 4 >= max(_activated(a, b, "0"), _activated(a, b, "1"))
    status, reply = _post(server, "/xshare/config", {"budget": 1.0, "target_mass": [0.3, 0.3, 0.99]},
                          method="PATCH")
    assert status == 200 and reply["config"]["target_mass"] == [0.3, 0.3, 0.99], reply
    _batch(server, prompts, exact_first=False)
    c = _stats(workdir)
    assert _activated(b, c, "2") > _activated(b, c, "0")
