"""A target mass without a budget given is uncapped; a budget given still caps it, and how often it
did is counted (``Routing.cap_bound``, ``/xshare/stats``, ``xshare:mass_cap_bound_total``, ``xshare
eval``'s ``cap_bound``).

"Not given" is the budget's None: it travels through ``to_dict`` / JSON (persisted and signed configs,
GET /xshare/config), so every path below resolves it the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SHARED, require_path
from xshare.cli import main
from xshare.selection import SelectorConfig, select
from xshare.selection.backends.reference import prepare_batch
from xshare.selection.common import MASS_RTOL, fill_count
from xshare.selection.decide import LayerCall, decide
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.policies.xshare import xshare_set
from xshare.selection.types import ModelShape
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.admin import config as admin
from xshare.sglang.settings import PluginSettings, load_settings

E, K = 64, 6
TRACES = [SHARED / "traces" / "esft_intent.npz", SHARED / "traces" / "esft_summary.npz"]


# -- the config: one fact (budget None = not given), resolved in budget_for ---------------------------------
def test_the_default_budget_does_not_cap_a_mass_target():
    assert SelectorConfig().budget_for(E) == 32  # no target: half of E, as before
    assert SelectorConfig(target_mass=0.9).budget_for(E) == E
    assert SelectorConfig(target_mass=0.9, budget=16).budget_for(E) == 16
    assert SelectorConfig(target_mass=0.9, budget=0.5).budget_for(E) == 32  # an explicit 0.5 still caps
    assert SelectorConfig(target_mass=0.9).replace(target_mass=None).budget_for(E) == 32


def test_per_layer_budgets_and_targets_resolve_per_layer():
    layers = (3, 4)
    cfg = SelectorConfig(budget={"3": 16}, target_mass=0.9)  # layer 4 has no budget given
    assert cfg.for_layer(3, layers).budget_for(E) == 16 and cfg.for_layer(4, layers).budget_for(E) == E
    cfg = SelectorConfig(target_mass={"default": None, "4": 0.9})
    assert cfg.for_layer(3, layers).budget_for(E) == 32 and cfg.for_layer(4, layers).budget_for(E) == E
    cfg = SelectorConfig(budget=[None, 16], target_mass=0.9)
    assert [cfg.for_layer(i, layers).budget_for(E) for i in layers] == [E, 16]


@pytest.mark.parametrize(("given", "expected"), [({"target_mass": 0.9}, E), ({"target_mass": 0.9, "budget": 16}, 16),
                                                 ({}, 32)])
def test_not_given_survives_serialisation(given, expected):
    cfg = SelectorConfig(**given)
    back = SelectorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.budget_for(E) == expected


def test_device_knobs_follow_the_resolved_budget():
    knobs = SelectorKnobs.create(SelectorConfig(), E, K)
    assert knobs.budget.item() == 32
    knobs.update(SelectorConfig(target_mass=0.9))
    assert knobs.budget.item() == E and knobs.target_mass.item() == pytest.approx(0.9)
    knobs.update(SelectorConfig(target_mass=0.9, budget=16))
    assert knobs.budget.item() == 16
    knobs.update(SelectorConfig())
    assert knobs.budget.item() == 32 and knobs.target_mass.item() == 0


def test_environment_settings():
    env = {"XSHARE_ENABLE": "1"}
    assert load_settings({**env, "XSHARE_TARGET_MASS": "0.9"}).selector.budget_for(E) == E
    assert load_settings({**env, "XSHARE_TARGET_MASS": "0.9", "XSHARE_BUDGET": "16"}).selector.budget_for(E) == 16
    layered = load_settings({**env, "XSHARE_TARGET_MASS": "0.9", "XSHARE_BUDGET": '{"3": 16}'}).selector
    assert layered.for_layer(3, (3, 4)).budget_for(E) == 16 and layered.for_layer(4, (3, 4)).budget_for(E) == E
    assert load_settings({**env, "XSHARE_BUDGET": "none"}).selector.budget_for(E) == 32


def test_serve_passes_no_budget_unless_given():
    from xshare.cli import build_parser
    from xshare.commands import serve

    def launch(*argv):
        args, extra = build_parser().parse_known_args(["serve", *argv, "--model-path", "m"])
        args._extra = extra
        return serve.build_launch(args, {})[1]

    env = launch("--xshare-target-mass", "0.9")
    assert "XSHARE_BUDGET" not in env and load_settings(env).selector.budget_for(E) == E
    env = launch("--xshare-target-mass", "0.9", "--xshare-budget", "16")
    assert load_settings(env).selector.budget_for(E) == 16


def _current(cfg: SelectorConfig) -> dict:
    return {**{k: v for k, v in cfg.to_dict().items() if k in admin.CONFIG_FIELDS}, "enabled": True}


def test_admin_changes_lift_and_restore_the_cap_on_every_rank():
    """PATCH target_mass on a default config lifts the cap; PATCH target_mass null restores the default;
    a PATCH that sets both caps. The config travels as JSON (signed message, persisted file) and the
    ranks' device knobs follow (a real ProcessState routing a decode call)."""
    model = ModelShape(num_experts=16, top_k=4)
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare")))
    runtime.push(rt.ForwardState(mode="decode"))
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(0)) * 2
    w, ids = torch.topk(torch.softmax(logits, -1), 4, dim=-1)
    args = {"topk_ids": ids, "topk_weights": w / w.sum(-1, keepdim=True), "router_logits": logits, "layer_id": 3,
            "num_token_non_padded": None, "expert_location_dispatch_info": None}
    from types import SimpleNamespace
    topk_config = SimpleNamespace(top_k=4, num_shared_topk_slots=0, allow_routed_experts_capture=True,
                                  scoring_func="softmax", renormalize=True, custom_routing_function=None,
                                  correction_bias=None, use_grouped_topk=False, num_expert_group=None, topk_group=None,
                                  routed_scaling_factor=None, apply_routed_scaling_factor_on_output=False,
                                  fused_shared_experts_scaling_factor=None)
    assert layer.route(runtime, args, topk_config=topk_config) is not None
    knobs = next(iter(runtime._knobs.values()))
    assert knobs.budget.item() == 8

    def apply(update):
        new = admin.build_config(admin.config_of(runtime.settings), update, replace_all=False, model=model)
        new = json.loads(json.dumps(new))  # as the signed message and the persisted file carry it
        runtime.update_settings(admin.settings_from_config(runtime.settings, new))
        runtime.sync_knobs()  # what the forward hook does before the next forward
        return new

    new = apply({"target_mass": 0.9})
    assert new["budget"] is None and knobs.budget.item() == 16
    assert apply({"target_mass": None})["budget"] is None and knobs.budget.item() == 8
    assert apply({"target_mass": 0.9, "budget": 6})["budget"] == 6 and knobs.budget.item() == 6
    assert apply({"target_mass": None})["budget"] == 6 and knobs.budget.item() == 6  # given: it stays
    assert apply({"budget": None, "target_mass": 0.8})["budget"] is None and knobs.budget.item() == 16
    put = admin.build_config(_current(SelectorConfig(budget=6)), {"target_mass": 0.9}, replace_all=True, model=model)
    assert put["budget"] is None and SelectorConfig.from_dict(
        {k: put[k] for k in admin.CONFIG_FIELDS}).budget_for(16) == 16


# -- the cap-bound flag ---------------------------------------------------------------------------------------
def test_fill_count_flags_a_budget_that_stops_the_target():
    score = torch.tensor([0.4, 0.3, 0.2, 0.1])
    forced = torch.tensor([True, False, False, False])
    cand = ~forced
    fill, bound = fill_count(score, forced, cand, 2, 0.9)  # 0.9 needs 3 experts; the budget allows 2
    assert fill.item() == 1 and bool(bound)
    fill, bound = fill_count(score, forced, cand, 4, 0.9)
    assert fill.item() == 2 and not bool(bound)
    for off in (None, 0.0, torch.zeros(())):
        fill, bound = fill_count(score, forced, cand, 2, off)
        assert fill.item() == 1 and not bool(bound)
    # the warm-up alone exceeds the budget: the target is unreached and the budget allowed nothing more
    fill, bound = fill_count(score, torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True]),
                             1, 0.9)
    assert fill.item() == 0 and bool(bound)
    # reached by the warm-up itself: not bound, however small the budget
    assert not bool(fill_count(score, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool), 1, 0.9)[1])


def _trace_batches(layer: int, batch: int = 16, count: int = 40):
    require_path(TRACES[0])
    from xshare.eval.batching import decode_batches
    from xshare.eval.traces import load_traces

    trace = load_traces([str(p) for p in TRACES])
    bt = decode_batches(trace.seq_ids, trace.positions, batch, 0)
    logits = trace.layer_logits(layer)
    return [logits[torch.from_numpy(bt.tokens[b])] for b in range(count)]


def test_on_the_traces_an_uncapped_target_is_reached_and_an_explicit_budget_is_counted():
    """On DeepSeek-V2-Lite's routing (B = 16): with no budget given, every batch's set reaches tau of its
    gate mass and nothing is flagged; with a budget given (24) the flag is set exactly on the batches
    whose set falls short of tau."""
    tau = 0.95
    flagged = 0
    batches = _trace_batches(layer=5)
    for logits in batches:
        for cfg in (SelectorConfig(target_mass=tau), SelectorConfig(target_mass=tau, budget=24)):
            b = prepare_batch(LayerCall(logits, K), cfg)
            s = xshare_set(b)
            sums = b.column_sums()
            short = bool(sums[s].sum() < tau * sums.sum() * (1 - MASS_RTOL))
            assert bool(b.cap_bound) == short
            routing = select(logits, K, cfg)
            assert bool(routing.cap_bound) == short
            if cfg.budget is None:
                assert not short
            else:
                assert int(s.sum()) <= max(32, int(b.warmup().sum()))
                flagged += short
    assert 0 < flagged < len(batches)  # both cases occur on real routing


def test_every_routing_path_reports_the_same_flag():
    """The torch path (host and device decision), the CPU kernel, DeepEP global mode and a policy with a
    per-GPU cap report the flag; a policy without a mass target reports None; padding-only batches and
    the batch-size gate count nothing."""
    from xshare.selection import Placement
    from xshare.selection.backends.c.kernel import cpu_kernel_available, cpu_route

    cfg = SelectorConfig(target_mass=0.95, budget=24)
    seen = set()
    for logits in _trace_batches(layer=5, count=20):
        want = select(logits, K, cfg).cap_bound
        seen.add(bool(want))
        assert want is not None and want.shape == () and want.dtype == torch.bool
        knobs = SelectorKnobs.create(cfg, E, K)
        assert bool(select(logits, K, cfg, knobs=knobs).cap_bound) == bool(want)
        assert bool(decide(LayerCall(logits, K), cfg).routing.cap_bound) == bool(want)
        global_mode = LayerCall(logits, K, all_reduce=lambda stats: stats)  # a group of one rank
        assert bool(decide(global_mode, cfg).routing.cap_bound) == bool(want)
        if cpu_kernel_available():
            assert bool(cpu_route(logits, K, cfg).routing.cap_bound) == bool(want)
        gated = cfg.replace(min_tokens=logits.shape[0] + 1)
        assert not bool(select(logits, K, gated, knobs=SelectorKnobs.create(gated, E, K)).cap_bound)
        # xshare_ep with per-GPU caps that never bind is xshare: the same set, the same flag
        placement = Placement.contiguous(E, 8)
        ep = cfg.replace(policy="xshare_ep", gpu_cap=E // 8)
        assert bool(select(logits, K, ep, placement=placement).cap_bound) == bool(want)
    assert seen == {False, True}
    assert select(logits, K, SelectorConfig(policy="oea", budget=24)).cap_bound is None


# -- counted in serving: /xshare/stats and the metric ------------------------------------------------------
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_the_server_counts_calls_whose_budget_stopped_the_target(cpu_kernel):
    from types import SimpleNamespace

    cfg = SelectorConfig(target_mass=0.95, budget=24)
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=cfg, cpu_kernel=cpu_kernel))
    runtime.push(rt.ForwardState(mode="decode"))
    topk_config = SimpleNamespace(top_k=K, num_shared_topk_slots=0, allow_routed_experts_capture=True,
                                  scoring_func="softmax", renormalize=True, custom_routing_function=None,
                                  correction_bias=None, use_grouped_topk=False, num_expert_group=None, topk_group=None,
                                  routed_scaling_factor=None, apply_routed_scaling_factor_on_output=False,
                                  fused_shared_experts_scaling_factor=None)
    expected = 0
    batches = _trace_batches(layer=5, count=20)
    for logits in batches:
        w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
        args = {"topk_ids": ids, "topk_weights": w / w.sum(-1, keepdim=True), "router_logits": logits,
                "layer_id": 5, "num_token_non_padded": None, "expert_location_dispatch_info": None}
        assert layer.route(runtime, args, topk_config=topk_config) is not None
        expected += bool(select(logits, K, cfg).cap_bound)
    snap = runtime.stats.snapshot()
    assert snap["applied"] == len(batches) and snap["fallbacks_total"] == 0
    assert 0 < snap["mass_cap_bound"] == expected < len(batches)


def test_the_metric_counts_what_the_stats_count(tmp_path):
    code = r"""
import torch
from xshare.sglang import state as runtime
from xshare.sglang.observe import metrics
from xshare.sglang.settings import load_settings
r = runtime.ProcessState(load_settings({"XSHARE_ENABLE": "1", "XSHARE_TARGET_MASS": "0.9"}), rank=0)
r.enable_observability(metrics.create(0))
r.flush_metrics()
for flag in (True, False, True, True):
    r.stats.record_cap_bound(torch.tensor(flag))
r.flush_metrics()
r.stats.record_cap_bound(torch.tensor(True))
r.flush_metrics()
print(r.metrics.last["mass_cap_bound"])
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
reg = CollectorRegistry(); multiprocess.MultiProcessCollector(reg)
print(generate_latest(reg).decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "4"
    assert 'xshare:mass_cap_bound_total{rank="0"} 4.0' in r.stdout
    assert 'xshare:budget{rank="0"} 1.0' in r.stdout  # E unknown: the uncapped default shown as all of E


# -- xshare eval -----------------------------------------------------------------------------------------------
def test_eval_target_mass_is_uncapped_by_default_and_reports_cap_bound(tmp_path, capsys):
    require_path(TRACES[0])
    out = tmp_path / "tau.json"
    md = tmp_path / "tau.md"
    rc = main(["eval", "--no-progress", "--trace", str(TRACES[0]), "--trace", str(TRACES[1]), "--batch", "16",
               "--layers", "0-3", "--policy", "xshare", "--target-mass", "0.95", "--budget", "none", "--budget", "32",
               "--model", "none", "--json", str(out), "--markdown", str(md)])
    capsys.readouterr()
    assert rc == 0
    rows = {(r["budget_arg"]): r for r in json.loads(out.read_text())["results"]}
    free, capped = rows[None], rows[32]
    assert free["budget"] == E and free["cap_bound"] == 0.0
    assert capped["budget"] == 32 and capped["cap_bound"] > 0.5
    assert free["mass_kept"] >= 0.95 > capped["mass_kept"]
    assert free["active_experts_mean"] > capped["active_experts_mean"]
    assert len(free["per_layer"]["cap_bound"]) == 4
    text = md.read_text()
    assert "cap bound" in text.splitlines()[0]
    rc = main(["eval", "--no-progress", "--trace", str(TRACES[0]), "--batch", "16", "--layers", "0",
               "--policy", "xshare", "--model", "none", "--json", str(out)])
    capsys.readouterr()
    row = json.loads(out.read_text())["results"][0]
    assert rc == 0 and row["budget"] == 32 and row["cap_bound"] is None  # no target: the default budget, no flag
