"""Replay metrics of ``xshare eval`` against a brute-force, batch-by-batch computation."""

import numpy as np
import pytest
import torch

from xshare.eval.batching import decode_batches, recorded_batches
from xshare.eval.eplb import rebalance_experts
from xshare.eval.replay import Plan, Setting, make_settings, parse_policy_spec, replay
from xshare.eval.summary import summarise, summarise_all
from xshare.eval.synth import write_synthetic_trace
from xshare.eval.traces import load_trace
from xshare.selection import Placement, select

E, K, G = 16, 4, 4


def _plan(tmp_path, settings, *, eplb=False, recorded=False, router_logits=False, batch=5):
    path = write_synthetic_trace(tmp_path / "t.npz", num_layers=2, num_seqs=12, num_experts=E, top_k=K, seed=11,
                                 router_logits=router_logits, batch_size=7 if recorded else None)
    tr = load_trace(path)
    layers = [0, 1]
    if recorded:
        batches = {None: recorded_batches(tr.batch_ids)}
    else:
        batches = {batch: decode_batches(tr.seq_ids, tr.positions, batch, seed=2)}
    if eplb:
        phy2log, _, _ = rebalance_experts(tr.expert_loads(), E + G, 1, 1, G)
        placements = [Placement.from_physical(phy2log[l], G, num_experts=E) for l in layers]
    else:
        placements = [Placement.contiguous(E, G)] * 2
    settings = [Setting(s.policy, next(iter(batches)), s.budget, s.warmup_k, s.group_budget, s.gpu_cap)
                for s in settings]
    return Plan(trace=tr, layers=layers, batches=batches, settings=settings, placements=placements)


def _brute(plan, setting):
    """Per-batch metrics with plain Python sets, averaged over layers and batches."""
    tr = plan.trace
    bt = plan.batches[setting.batch]
    acc = {k: [] for k in ("active", "mass", "top1", "peak", "tok", "pom")}
    for li, layer in enumerate(plan.layers):
        z = tr.layer_logits(layer)
        probs = tr.layer_probs(layer).numpy()
        pl = plan.placements[li]
        slot_gpu = pl.slot_gpu.tolist()
        first_slot = pl.replicas[:, 0].tolist()
        for b in range(bt.num_batches):
            rows = bt.row(b)
            r = select(z[rows], K, setting.config(), groups=torch.from_numpy(tr.seq_ids[rows]), placement=pl)
            ids = r.topk_ids.tolist()
            acc["active"].append(len({e for row in ids for e in row}))
            kept = sum(float(probs[t, e]) for t, row in zip(rows, ids, strict=True) for e in row)
            total = sum(float(probs[t, e]) for t in rows for e in tr.topk_ids[layer, t])
            acc["mass"].append(kept / total)
            acc["top1"].append(np.mean([tr.topk_ids[layer, t, 0] in row for t, row in zip(rows, ids, strict=True)]))
            if r.physical_ids is not None:
                slots = r.physical_ids.tolist()
            else:
                slots = [[first_slot[e] for e in row] for row in ids]
            per_gpu = [set() for _ in range(pl.num_gpus)]
            assign = [0] * pl.num_gpus
            for row in slots:
                for s in row:
                    per_gpu[slot_gpu[s]].add(s)
                    assign[slot_gpu[s]] += 1
            loads = [len(x) for x in per_gpu]
            acc["peak"].append(max(loads))
            acc["pom"].append(max(loads) / np.mean(loads))
            acc["tok"].append(max(assign) / np.mean(assign))
    return {k: float(np.mean(v)) for k, v in acc.items()}


SETTINGS = [Setting("topk", 0), Setting("xshare", 0, budget=6, warmup_k=1), Setting("xshare_ep", 0, 6, 1, None, 2),
            Setting("oea", 0, warmup_k=2), Setting("lynx", 0, budget=7), Setting("xshare_spec", 0, 6, 1, 2)]


@pytest.mark.parametrize("kind", ["contiguous", "eplb", "recorded", "router_logits"])
def test_metrics_match_brute_force(tmp_path, kind):
    plan = _plan(tmp_path, SETTINGS, eplb=kind == "eplb", recorded=kind == "recorded",
                 router_logits=kind == "router_logits")
    result = replay(plan, progress=False)
    rows = {r["label"]: r for r in summarise_all(result)}
    assert len(rows) == len(SETTINGS)
    want_all = {s: _brute(plan, s) for s in plan.settings}
    vanilla = want_all[plan.settings[0]]
    for s in plan.settings:
        row = rows[s.label()]
        want = want_all[s]
        assert row["active_experts_mean"] == pytest.approx(want["active"])
        assert row["mass_kept"] == pytest.approx(want["mass"], rel=1e-5)
        assert row["top1_kept"] == pytest.approx(want["top1"])
        assert row["peak_gpu_experts_mean"] == pytest.approx(want["peak"])
        assert row["peak_over_mean_gpu"] == pytest.approx(want["pom"], rel=1e-5)
        assert row["tokens_per_gpu_max_over_mean"] == pytest.approx(want["tok"], rel=1e-5)
        assert row["vanilla_active_experts_mean"] == pytest.approx(vanilla["active"])
        assert row["reduction"] == pytest.approx(1 - want["active"] / vanilla["active"])
        assert row["peak_ratio"] == pytest.approx(vanilla["peak"] / want["peak"])
        assert row["num_batches"] == plan.batches[s.batch].num_batches
        assert len(row["per_layer"]["active_experts_mean"]) == 2
        # every activated expert sits on one GPU, unless replicas of it are used on several
        if kind == "eplb":
            assert sum(row["gpu_load_mean"]) >= row["active_experts_mean"] - 1e-9
        else:
            assert sum(row["gpu_load_mean"]) == pytest.approx(row["active_experts_mean"])


def test_vanilla_row_and_budget_invariants(tmp_path):
    plan = _plan(tmp_path, SETTINGS + [Setting("xshare", 0, budget=E, warmup_k=1)])
    rows = {r["label"]: r for r in summarise_all(replay(plan, progress=False))}
    top = rows["topk"]
    assert (top["reduction"], top["mass_kept"], top["top1_kept"], top["peak_ratio"]) == (0.0, 1.0, 1.0, 1.0)
    # budget E keeps everything: identical to topk
    full = rows[f"xshare m={E} k0=1"]
    assert full["active_experts_mean"] == top["active_experts_mean"] and full["mass_kept"] == pytest.approx(1.0)
    # B = 5 tokens, warm-up top-1: |W| <= 5 < m = 6, so no batch activates more than m experts
    xs = rows["xshare m=6 k0=1"]
    assert xs["active_experts_max"] <= 6 < top["active_experts_max"]
    assert xs["reduction"] > 0 and xs["top1_kept"] == 1.0 and xs["mass_kept"] < 1.0
    assert xs["budget"] == 6 and xs["warmup_k"] == 1 and xs["gpu_cap"] is None
    assert rows["xshare_ep m=6 k0=1 cap=2"]["gpu_cap"] == 2
    assert rows["oea k0=2"]["budget"] is None
    assert xs["selector_ms_per_layer"] > 0


def test_fraction_budget_resolves_against_e(tmp_path):
    plan = _plan(tmp_path, [Setting("topk", 0), Setting("xshare_ep", 0, budget=0.5, warmup_k=1)])
    row = summarise(replay(plan, progress=False), plan.settings[1])
    assert row["budget"] == 8 and row["budget_arg"] == 0.5 and row["gpu_cap"] == 2  # ceil(8 / 4 GPUs)


def test_parallel_replay_matches_serial(tmp_path):
    plan = _plan(tmp_path, SETTINGS[1:3])
    serial = summarise_all(replay(plan, jobs=1, progress=False))
    parallel = summarise_all(replay(plan, jobs=2, progress=False))
    for a, b in zip(serial, parallel, strict=True):
        for key in ("active_experts_mean", "mass_kept", "top1_kept", "peak_gpu_experts_mean", "per_layer"):
            assert a[key] == b[key]


def test_make_settings_sweeps_only_the_knobs_a_policy_reads():
    axes = {"budget": [8, 16], "warmup_k": [1, 2], "gpu_cap": [], "group_budget": []}
    got = make_settings([("topk", {}), ("xshare", {}), ("lynx", {}), ("oea", {"warmup_k": [1, 2, 3]})], [16], axes)
    labels = [s.label() for s in got]
    assert labels == ["topk", "xshare m=8 k0=1", "xshare m=8 k0=2", "xshare m=16 k0=1", "xshare m=16 k0=2",
                      "lynx m=8", "lynx m=16", "oea k0=1", "oea k0=2", "oea k0=3"]
    assert all(s.batch == 16 for s in got)
    # duplicates collapse
    assert len(make_settings([("xshare", {}), ("xshare", {})], [4], axes)) == 4


def test_parse_policy_spec():
    assert parse_policy_spec("oea:warmup_k=1,2;budget=3") == ("oea", {"warmup_k": ["1", "2"], "budget": ["3"]})
    assert parse_policy_spec("xshare") == ("xshare", {})
    with pytest.raises(ValueError, match="knob"):
        parse_policy_spec("xshare:speed=1")
