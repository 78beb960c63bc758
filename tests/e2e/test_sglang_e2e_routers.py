"""End to end: the tiny models of the other router families, each served by a real SGLang 0.5.23 CPU server
with the plugin (one server per preset, one after the other).

Presets (``xshare.models.tiny_moe.PRESETS``, docs/model.md): ``glm45`` (``Glm4MoeForCausalLM``: sigmoid router
with a correction bias, one expert group, a shared expert, x2.5, layer 0 dense), ``deepseek_v3_router`` (the same
architecture with DeepSeek-V3's grouped router: 32 experts in 8 groups, 4 kept) and ``mixtral`` (softmax top-2 of
8). Each server: ``xshare`` at budget E (vanilla routing where the selector applies), the stats file written every
forward, ``XSHARE_PROFILE=1`` (forwards and MoE-block calls per forward mode), an admin token, no radix cache (so
the second round recomputes its prompts as the first did). Scenario: greedy requests (two alone, then six in one
batched ``/generate``) with the selector on, ``POST /xshare/disable``, the same requests again.

Checked: every request gets its requested length (``ignore_eos``); the routing hook is reached once per MoE layer
per forward (hook calls = MoE-block calls = forwards x MoE layers); each skip reason covers every MoE layer of the
forwards of one mode, as :data:`EXPECTED_SKIPS` says, and the other decode calls are applied on every MoE layer
with no expert changed; after the disable every call is skipped as ``disabled``; the tokens are the same in both
rounds. Then a third round at budget E/4 (``PATCH /xshare/config``): activated experts fall on every MoE layer.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import running
from xshare._http import request
from xshare.models.architecture import MODEL_CLASSES
from xshare.models.tiny_moe import PRESETS, build_tiny_moe
from xshare.sglang.server import ServerProcess

pytestmark = pytest.mark.e2e

TOKEN = "router-families-token"
NEW_TOKENS = 10
PROMPTS = ["def hello(name):", "import os\nimport sys\n", "class Buffer:\n    def __init__(self", "for i in range(",
           "# load the config", "return self.value +", "print(\"batch", "while not done:"]

#: Per preset, the skip reasons of the selector-on round, each with the forward mode whose MoE-layer calls it
#: accounts for, all of them: ``skipped[reason] == MoE layers x forwards of that mode``; decode calls not listed
#: here are applied, on every MoE layer (biased and grouped routers included).
EXPECTED_SKIPS: dict[str, dict[str, str]] = {
    "glm45": {"mode_extend": "extend"},
    "deepseek_v3_router": {"mode_extend": "extend"},
    "mixtral": {"mode_extend": "extend"},
}


def admin(srv: ServerProcess, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    return request(srv.base_url + path, method, TOKEN, body, timeout=120)


def stats(stats_dir) -> dict:
    """The scheduler's stats file (one scheduler: TP 1), after the last forward has written it."""
    time.sleep(0.5)
    files = sorted(stats_dir.glob("xshare-stats-*.json"))
    assert len(files) <= 1, files
    return json.loads(files[0].read_text()) if files else {}


def delta(before: dict, after: dict) -> dict:
    """Counters of ``after`` minus ``before``: calls, applied, forwards, fallbacks_total, skips by reason,
    forwards and MoE-block calls by forward mode, and per layer calls / tokens / changed tokens / activated."""
    def sub(a: dict, b: dict) -> dict:
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}

    out = {k: after.get(k, 0) - before.get(k, 0) for k in ("calls", "applied", "forwards", "fallbacks_total")}
    out["skipped"] = sub(after.get("skipped", {}), before.get("skipped", {}))
    for key in ("forwards", "moe_calls"):
        out[f"mode_{key}"] = sub({m: p[key] for m, p in after.get("profile", {}).items()},
                                 {m: p[key] for m, p in before.get("profile", {}).items()})
    out["layers"] = {}
    for layer, now in after.get("layers", {}).items():
        prev = before.get("layers", {}).get(layer, {})
        d = {k: now[k] - prev.get(k, 0) for k in ("calls", "tokens", "changed_tokens", "activated",
                                                   "vanilla_activated")}
        if d["calls"]:
            out["layers"][layer] = d
    return out


def one_round(srv: ServerProcess) -> list[dict]:
    """Two requests alone, then six in one batched /generate (one scheduler batch: the same both rounds)."""
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    outs = [srv.generate(p, **params) for p in PROMPTS[:2]]
    outs += srv.post("/generate", {"text": PROMPTS[2:], "sampling_params": params}, timeout=300)
    return outs


@pytest.fixture(scope="module", params=list(EXPECTED_SKIPS))
def served(request, tmp_path_factory):
    """One preset: build the model, start its server, run both rounds, stop it; what was seen."""
    name = request.param
    spec = PRESETS[name]
    work = tmp_path_factory.mktemp(f"routers-{name}")
    model = build_tiny_moe(tmp_path_factory.getbasetemp() / f"tiny-{name}", spec)
    stats_dir = work / "stats"
    srv = ServerProcess(model,
                        xshare_args=["--xshare-policy", "xshare", "--xshare-budget", str(spec.num_experts),
                                     "--xshare-stats-dir", str(stats_dir), "--xshare-stats-every", "1"],
                        sglang_args=["--disable-radix-cache"],
                        env={"XSHARE_PROFILE": "1", "XSHARE_ADMIN_TOKEN": TOKEN}, log_path=work / "server.log")
    t0 = time.monotonic()
    with running(srv, f"{name} server"):
        time.sleep(1.0)  # let the start-up health check's generation finish
        s0 = stats(stats_dir)
        on = one_round(srv)
        s1 = stats(stats_dir)
        status, reply = admin(srv, "POST", "/xshare/disable")
        assert status == 200 and reply["config"]["enabled"] is False, reply
        off = one_round(srv)
        s2 = stats(stats_dir)
        budget = max(spec.top_k, spec.num_experts // 4)
        status, reply = admin(srv, "PATCH", "/xshare/config", {"enabled": True, "budget": budget, "warmup_k": 0})
        assert status == 200 and reply["config"]["budget"] == budget, reply
        small = one_round(srv)
        s3 = stats(stats_dir)
    seen = {"name": name, "spec": spec, "model": model, "on": on, "off": off, "small": small, "budget": budget,
            "stats_on": delta(s0, s1), "stats_off": delta(s1, s2), "stats_small": delta(s2, s3),
            "short_rows": s3.get("short_rows", 0) - s2.get("short_rows", 0), "coverage": s1.get("coverage"),
            "startup_coverage": s0.get("startup_coverage"), "log": (work / "server.log").read_text(),
            "seconds": time.monotonic() - t0}
    print(f"\n{name}: {seen['seconds']:.0f} s; selector on: {json.dumps(seen['stats_on'], sort_keys=True)}; "
          f"off: {json.dumps(seen['stats_off'], sort_keys=True)}; budget {budget}: "
          f"{json.dumps(seen['stats_small']['layers'], sort_keys=True)}, short rows {seen['short_rows']}")
    return seen


def test_requests_get_their_requested_length(served):
    for out in served["on"] + served["off"]:
        assert len(out["output_ids"]) == NEW_TOKENS and out["meta_info"]["finish_reason"]["type"] == "length"
    config = json.loads((served["model"] / "config.json").read_text())
    assert config["architectures"] == [MODEL_CLASSES[served["spec"].arch]]


def test_routing_hook_reached_on_every_moe_layer(served):
    num_layers = len(served["spec"].moe_layers)
    for phase in ("stats_on", "stats_off"):
        st = served[phase]
        assert st["forwards"] > 0 and st["fallbacks_total"] == 0, (phase, st)
        assert sum(st["mode_forwards"].values()) == st["forwards"], (phase, st)
        for mode, n in st["mode_forwards"].items():  # each forward calls each MoE block once, and each its router
            assert st["mode_moe_calls"].get(mode) == num_layers * n, (phase, mode, st)
        assert st["calls"] == num_layers * st["forwards"], (phase, st)
        assert st["calls"] == st["applied"] + sum(st["skipped"].values()), (phase, st)


def test_skip_reasons_are_as_expected(served):
    """Selector on: :data:`EXPECTED_SKIPS`, each reason on every MoE layer of its mode's forwards; the rest of the
    decode calls applied on every MoE layer (budget E: no expert changed). Off: every call ``disabled``."""
    spec, st = served["spec"], served["stats_on"]
    num_layers = len(spec.moe_layers)
    expected = EXPECTED_SKIPS[served["name"]]
    assert set(st["skipped"]) == set(expected), st["skipped"]
    for reason, mode in expected.items():
        assert st["skipped"][reason] == num_layers * st["mode_forwards"].get(mode, 0) > 0, (reason, st)
    decode = st["mode_forwards"].get("decode", 0)
    assert decode > 0
    if "decode" in expected.values():
        assert st["applied"] == 0 and st["layers"] == {}, st
    else:
        assert st["applied"] == num_layers * decode, st
        assert set(st["layers"]) == {str(i) for i in spec.moe_layers}, st["layers"]
        for layer, d in st["layers"].items():
            assert d["calls"] == decode and d["tokens"] > d["calls"], (layer, d)  # batched decodes were seen
            assert d["changed_tokens"] == 0 and d["activated"] == d["vanilla_activated"], (layer, d)
    off = served["stats_off"]
    assert off["skipped"] == {"disabled": off["calls"]} and off["applied"] == 0 and off["layers"] == {}, off


def test_greedy_tokens_identical_with_the_selector_on_and_off(served):
    on = [o["output_ids"] for o in served["on"]]
    off = [o["output_ids"] for o in served["off"]]
    assert on == off


def test_a_budget_below_e_cuts_activated_experts_on_every_moe_layer(served):
    """Budget E/4 without warm-up: each decode call activates at most the budget (rows that cannot be filled
    inside their groups keep SGLang's routing and are counted), fewer experts than vanilla on every layer."""
    st, m = served["stats_small"], served["budget"]
    assert st["fallbacks_total"] == 0 and st["applied"] > 0, st
    assert set(st["layers"]) == {str(i) for i in served["spec"].moe_layers}, st["layers"]
    for layer, d in st["layers"].items():
        assert d["activated"] < d["vanilla_activated"], (layer, d)
        if served["short_rows"] == 0:
            assert d["activated"] <= m * d["calls"], (layer, d, m)
    for out in served["small"]:
        assert len(out["output_ids"]) == NEW_TOKENS


def test_coverage_report_says_every_moe_layer_selects(served):
    assert served["coverage"] == {str(i): "selects" for i in served["spec"].moe_layers}, served["coverage"]
    # and the start-up report, before any request, said every MoE layer would
    layers = served["spec"].moe_layers
    assert served["startup_coverage"] == {str(i): "ready" for i in layers}, served["startup_coverage"]
    assert f"coverage at start-up (rank 0): {len(layers)} MoE layers: {len(layers)} ready" in served["log"]
