"""Load forecasts, replica plans from them and the expert bytes a re-plan moves (``xshare.eval.predict``),
and ``xshare eval --placement predictive`` end to end (synthetic traces, then the real ESFT traces)."""

import json

import numpy as np
import pytest

from conftest import SHARED, require_path
from xshare.cli import main
from xshare.eval.eplb import rebalance_experts
from xshare.eval.predict import (
    EWMAForecaster,
    StaticForecaster,
    align_to,
    check_plan,
    forecast_accuracy,
    make_forecaster,
    moved_experts,
    plan_replicas,
    step_loads,
    transition_matrix,
)
from xshare.eval.synth import write_synthetic_trace
from xshare.eval.traces import load_traces

TRACES = [SHARED / "traces" / "esft_intent.npz", SHARED / "traces" / "esft_summary.npz"]


# -- forecasts -----------------------------------------------------------------------------------------
def test_step_loads_counts_valid_assignments():
    ids = np.array([[[0, 1], [1, 2]], [[3, 3], [0, 0]]])  # [NB=2, W=2, k=2]
    valid = np.array([[True, True], [True, False]])
    assert step_loads(ids, valid, 4).tolist() == [[1, 2, 1, 0], [0, 0, 0, 2]]


def test_transition_matrix_keeps_the_load_and_finds_a_fixed_mapping():
    rng = np.random.default_rng(0)
    one = rng.integers(0, 8, size=(200, 1))
    m = transition_matrix(one, (one + 3) % 8, 8)  # top-1: every token moves from expert i to expert i + 3
    assert np.allclose(m, np.roll(np.eye(8), 3, axis=1))
    # top-2: expert i's tokens go to i + 3 and to the shift of their other expert
    prev = np.stack([rng.permutation(8)[:2] for _ in range(200)])
    m = transition_matrix(prev, (prev + 3) % 8, 8)
    assert np.allclose(m.sum(1), 1.0) and np.allclose(np.diag(np.roll(m, -3, axis=1)), 0.5)
    # in general prev_load @ M is this layer's load on the tokens it was estimated from
    cur = np.stack([rng.permutation(8)[:2] for _ in range(200)])
    m2 = transition_matrix(prev, cur, 8)
    load_prev = np.bincount(prev.ravel(), minlength=8)
    assert np.allclose(load_prev @ m2, np.bincount(cur.ravel(), minlength=8))


def test_ewma_follows_a_shift_and_static_does_not():
    base = np.array([4.0, 0.0, 0.0, 0.0])
    f = EWMAForecaster(base, alpha=0.5)
    f.observe(0, np.array([0.0, 4.0, 0.0, 0.0]))
    assert f.predict(1).tolist() == [2.0, 2.0, 0.0, 0.0]
    for t in range(1, 30):
        f.observe(t, np.array([0.0, 4.0, 0.0, 0.0]))
    assert np.allclose(f.predict(30), [0, 4, 0, 0], atol=1e-6)
    assert StaticForecaster(base).predict(30).tolist() == base.tolist()


def _drifting_loads(steps=400, experts=16, period=50, seed=0):
    """Hot experts that change every ``period`` steps (the next steps look like the last ones)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((steps, experts))
    for start in range(0, steps, period):
        hot = rng.choice(experts, 3, replace=False)
        w = np.full(experts, 1.0)
        w[hot] = 8.0
        out[start:start + period] = rng.poisson(w * 2, size=(min(period, steps - start), experts))
    return out


def test_ewma_forecasts_a_drifting_hot_set_better_than_the_average():
    loads = _drifting_loads()
    base = loads.mean(0)
    ewma = forecast_accuracy(EWMAForecaster(base, 0.3), loads, horizon=8, hot=3).summary()
    static = forecast_accuracy(StaticForecaster(base), loads, horizon=8, hot=3).summary()
    assert ewma["hot_precision"] > static["hot_precision"] + 0.3
    assert ewma["load_error"] < static["load_error"]
    assert ewma["forecasts"] == 50


def test_a_static_forecast_of_a_constant_load_is_exact():
    loads = np.tile([5.0, 1.0, 0.0, 3.0], (20, 1))
    acc = forecast_accuracy(StaticForecaster(loads[0]), loads, horizon=4, hot=2).summary()
    assert acc["hot_precision"] == 1.0 and acc["hot_recall"] == 1.0 and acc["load_error"] == 0.0


def test_cross_layer_forecast_sees_the_same_step_of_the_previous_layer():
    """Layer l routes every token to (its layer l-1 expert + 1): with alpha 1 the cross-layer forecast of a
    step is exact, while the EWMA of the layer's own past lags."""
    rng = np.random.default_rng(1)
    prev_ids = rng.integers(0, 8, size=(300, 1))
    m = transition_matrix(prev_ids, (prev_ids + 1) % 8, 8)
    prev_loads = _drifting_loads(200, 8, period=1, seed=2)  # a new hot set every step
    loads = np.roll(prev_loads, 1, axis=1)
    cross = make_forecaster("cross_layer", loads.mean(0), alpha=1.0, prev_loads=prev_loads,
                            prev_base=prev_loads.mean(0), transition=m)
    ewma = make_forecaster("ewma", loads.mean(0), alpha=1.0)
    acc_cross = forecast_accuracy(cross, loads, horizon=1, hot=3).summary()
    acc_ewma = forecast_accuracy(ewma, loads, horizon=1, hot=3).summary()
    assert acc_cross["load_error"] == pytest.approx(0.0, abs=1e-12)
    assert acc_ewma["load_error"] > 0.2
    # without a previous layer (the first MoE layer) cross_layer is the EWMA of the layer itself
    assert isinstance(make_forecaster("cross_layer", loads[0]), EWMAForecaster)


def test_unknown_predictor_and_bad_alpha_name_the_option():
    with pytest.raises(ValueError, match="--predictor 'lstm'"):
        make_forecaster("lstm", np.ones(4))
    with pytest.raises(ValueError, match="--ewma-alpha"):
        EWMAForecaster(np.ones(4), alpha=0.0)
    with pytest.raises(ValueError, match="--replan-every 0"):
        forecast_accuracy(StaticForecaster(np.ones(4)), np.ones((3, 4)), horizon=0, hot=1)


# -- planning --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("planner", ["eplb", "greedy"])
@pytest.mark.parametrize("slots", [1, 2])
def test_plans_fit_the_slots_and_replicate_the_hot_experts(planner, slots):
    rng = np.random.default_rng(3)
    load = rng.uniform(1, 2, size=16)
    load[[5, 11]] = [40.0, 30.0]
    p2l = plan_replicas(load, 4, slots, planner)
    assert p2l.shape == (16 + 4 * slots,)
    counts = np.bincount(p2l, minlength=16)
    assert counts.min() >= 1 and counts[5] >= 2 and counts[11] >= 2
    per_gpu = p2l.reshape(4, -1)
    if planner == "greedy":
        # the home slots stay contiguous: only the spare slots change; no GPU holds two copies of one expert
        # (EPLB's packing does not promise that: a second copy on one GPU spreads nothing)
        assert (per_gpu[:, :4] == np.arange(16).reshape(4, 4)).all()
        assert all(np.unique(row).size == row.size for row in per_gpu)


def test_greedy_puts_the_replica_on_the_least_loaded_gpu():
    load = np.array([10.0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    p2l = plan_replicas(load, 4, 1, "greedy")
    # expert 0 (10 on GPU 0) is the hottest; GPU 1 (load 4) is the lightest of the GPUs without it
    assert p2l.reshape(4, 5)[1, 4] == 0


def test_eplb_planner_is_eplb_on_the_forecast():
    rng = np.random.default_rng(4)
    load = rng.uniform(0, 10, size=16)
    ref = rebalance_experts(load[None], 24, 1, 1, 4, "global")[0][0]
    got = plan_replicas(load, 4, 2, "eplb")
    assert np.array_equal(got, ref)


def test_moved_experts_and_alignment():
    old = np.array([0, 1, 2, 0, 3, 1])  # 3 GPUs x 2 slots: {0,1}, {2,0}, {3,1}
    assert moved_experts(old, old, 3, 4) == 0
    swapped = np.array([2, 0, 0, 1, 3, 1])  # the same GPUs' contents, GPUs 0 and 1 swapped
    assert moved_experts(old, swapped, 3, 4) == 2  # expert 2 onto GPU 0, expert 1 onto GPU 1
    assert np.array_equal(align_to(old, swapped, 3, 4), old)
    # one spare slot re-filled: one copy to load
    assert moved_experts(old, np.array([0, 1, 2, 0, 3, 2]), 3, 4) == 1
    # a re-plan from the same forecast moves nothing (EPLB renumbered onto the previous plan)
    load = np.random.default_rng(5).uniform(0, 10, size=16)
    first = plan_replicas(load, 4, 1, "eplb")
    assert moved_experts(first, plan_replicas(load, 4, 1, "eplb", previous=first), 4, 16) == 0


@pytest.mark.parametrize("plan, needle", [
    (np.arange(16), "needs 20 physical slots"),
    (np.r_[np.arange(15), 0, 0, 0, 0, 0], "every one of the 16"),
    (np.r_[np.arange(16), 16, 0, 0, 0], "expert ids in [0, 16)"),
])
def test_a_plan_that_does_not_fit_the_slots_names_the_option(plan, needle):
    with pytest.raises(ValueError, match="--replica-slots 1") as ei:
        check_plan(plan, 16, 4, 1)
    assert needle in str(ei.value)


def test_unknown_planner_and_negative_slots():
    with pytest.raises(ValueError, match="--planner 'best'"):
        plan_replicas(np.ones(16), 4, 1, "best")
    with pytest.raises(ValueError, match="--replica-slots -1"):
        plan_replicas(np.ones(16), 4, -1)


# -- xshare eval --placement predictive -----------------------------------------------------------------
def _run(capsys, *argv):
    rc = main(["eval", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def synth(tmp_path):
    return write_synthetic_trace(tmp_path / "a.npz", num_layers=3, num_seqs=16, tokens_per_seq=(20, 30),
                                 num_experts=16, top_k=4, seed=1)


def test_predictive_compares_none_eplb_and_forecasts(tmp_path, capsys, synth):
    out_json, md, plots = tmp_path / "r.json", tmp_path / "t.md", tmp_path / "plots"
    rc, out, err = _run(capsys, "--trace", synth, "--batch", 8, "--gpus", 4, "--policy", "topk", "--policy",
                        "xshare_ep", "--budget", 8, "--gpu-cap", 3, "--placement", "predictive", "--replica-slots", 1,
                        "--predictor", "ewma", "--predictor", "cross_layer", "--predictor", "static",
                        "--replan-every", 4, "--planner", "eplb", "--planner", "greedy", "--json", out_json,
                        "--markdown", md, "--plot", plots)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    rows = doc["results"]
    labels = {(r["policy"], r["placement"], r["predictor"], r["planner"]) for r in rows}
    for policy in ("topk", "xshare_ep"):
        assert (policy, "none", None, None) in labels
        assert (policy, "eplb", None, None) in labels
        for pred in ("ewma", "cross_layer", "static"):
            for planner in ("eplb", "greedy"):
                assert (policy, "predictive", pred, planner) in labels
    nb = rows[0]["num_batches"]
    for r in rows:
        # every placement carries the same tokens: the mean per GPU is B * k / G
        assert r["gpu_tokens_mean"] == pytest.approx(8 * 4 / 4, rel=0.02)
        assert r["peak_gpu_tokens_mean"] >= r["gpu_tokens_mean"]
        assert len(r["timeline"]["peak_gpu_tokens"]) == nb
        assert np.mean(r["timeline"]["peak_gpu_tokens"]) == pytest.approx(r["peak_gpu_tokens_mean"], rel=1e-3)
        if r["placement"] == "predictive":
            assert r["replans"] == -(-nb // 4) - 1
            f = r["forecast"]
            assert 0 <= f["hot_precision"] <= 1 and 0 <= f["hot_recall"] <= 1 and f["load_error"] >= 0
        else:
            assert r["moved_experts"] == 0 and r["forecast"] is None
    by = {(r["policy"], r["predictor"], r["planner"]): r for r in rows if r["placement"] == "predictive"}
    for policy in ("topk", "xshare_ep"):
        assert by[(policy, "static", "eplb")]["moved_experts"] == 0  # the same forecast: nothing moves
        assert by[(policy, "ewma", "eplb")]["moved_experts"] > 0
        # greedy re-fills only the 4 spare slots of each layer
        assert by[(policy, "ewma", "greedy")]["moved_experts"] <= 4 * 3 * by[(policy, "ewma", "greedy")]["replans"]
    assert (plots / "peak_timeline.png").stat().st_size > 0
    assert "| placement |" in md.read_text() and "peak tok/GPU" in out


@pytest.mark.parametrize("argv, needle", [
    (["--placement", "predictive", "--replan-every", "0"], "--replan-every 0"),
    (["--placement", "predictive", "--replan-every", "-3"], "--replan-every -3"),
    (["--placement", "predictive", "--predictor", "lstm"], "--predictor 'lstm'"),
    (["--placement", "predictive", "--planner", "best"], "--planner 'best'"),
    (["--placement", "predictive", "--replica-slots", "-1"], "--replica-slots -1"),
    (["--placement", "predictive", "--ewma-alpha", "0"], "--ewma-alpha"),
    (["--placement", "predictive", "--save-placement", "p.json"], "--save-placement"),
    (["--placement", "eplb", "--predictor", "ewma"], "--predictor needs --placement predictive"),
    (["--placement", "none", "--replica-slots", "1"], "--replica-slots needs --placement eplb or predictive"),
    (["--placement", "eplb", "--replica-slots", "1", "--eplb-redundant", "4"], "--eplb-redundant"),
])
def test_bad_predictive_flags_fail_without_output(tmp_path, capsys, synth, argv, needle):
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", synth, "--batch", 8, "--gpus", 4, "--policy", "topk", *argv,
                      "--json", out_json)
    assert rc == 2 and needle in err, err
    assert not out_json.exists()


def test_replica_slots_set_eplb_redundant_experts(tmp_path, capsys, synth):
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", synth, "--batch", 8, "--gpus", 4, "--policy", "topk", "--placement", "eplb",
                      "--replica-slots", 2, "--json", out_json)
    assert rc == 0, err
    info = json.loads(out_json.read_text())["settings"]["placement"]
    assert info["redundant"] == 8 and info["num_physical"] == 24


def test_real_traces_forecasts_and_plans():
    """On the ESFT traces (stored routing, B = 16 decode steps of layer 12): the EWMA of recent steps
    finds the hot experts of the next 16 steps better than the whole-trace average, and plans from it
    fit the slots."""
    for path in TRACES:
        require_path(path, "the recorded routing traces, in the shared folder next to the repository")
    from xshare.eval.batching import decode_batches

    trace = load_traces([str(p) for p in TRACES])
    bt = decode_batches(trace.seq_ids, trace.positions, 16, 0)
    layer = 12
    loads = step_loads(trace.topk_ids[layer][bt.tokens.clip(0)], bt.tokens >= 0, trace.num_experts)
    base = trace.expert_loads([layer])[0] * (bt.sizes.mean() / trace.num_tokens)
    ewma = forecast_accuracy(EWMAForecaster(base, 0.2), loads, horizon=16, hot=8).summary()
    static = forecast_accuracy(StaticForecaster(base), loads, horizon=16, hot=8).summary()
    assert ewma["hot_precision"] > static["hot_precision"]
    assert ewma["load_error"] < static["load_error"]
    p2l = plan_replicas(EWMAForecaster(base).predict(0), 8, 2)
    assert check_plan(p2l, 64, 8, 2).shape == (80,)


def test_the_cli_default_alpha_is_the_forecasters():
    from xshare.commands.eval import DEFAULT_ALPHA as CLI_ALPHA
    from xshare.eval.predict import DEFAULT_ALPHA

    assert CLI_ALPHA == DEFAULT_ALPHA
