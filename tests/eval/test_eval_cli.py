"""``xshare eval`` end to end: options, outputs, bad input, and the figures on the real traces."""

import json

import numpy as np
import pytest

from conftest import SHARED, require_path
from xshare.cli import main
from xshare.eval.report import ROW_KEYS, SCHEMA
from xshare.eval.synth import synthetic_trace, write_synthetic_trace

TRACES = [SHARED / "traces" / "esft_intent.npz", SHARED / "traces" / "esft_summary.npz"]


def _traces(tmp_path, **kw):
    a = write_synthetic_trace(tmp_path / "a.npz", num_seqs=14, num_experts=16, top_k=4, seed=1, **kw)
    b = write_synthetic_trace(tmp_path / "b.npz", num_seqs=10, num_experts=16, top_k=4, seed=2, **kw)
    return a, b


def _run(capsys, *argv):
    rc = main(["eval", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["eval", "--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--trace", "--policy", "--batch", "--budget", "--warmup-k", "--group-budget", "--gpus", "--gpu-cap",
                "--placement", "--layers", "--seed", "--json", "--plot", "--markdown", "--top-k", "--eplb-trace",
                "--model", "--gpu-type", "--match-active", "--jobs"):
        assert opt in text


def test_sweep_writes_json_plots_and_markdown(tmp_path, capsys):
    a, b = _traces(tmp_path)
    out_json, plots, md = tmp_path / "r.json", tmp_path / "plots", tmp_path / "t.md"
    rc, out, err = _run(capsys, "--trace", a, "--trace", b, "--policy", "all", "--policy", "oea:warmup_k=1,2,3",
                        "--batch", 4, "--batch", 8, "--budget", 5, "--budget", 0.5, "--gpus", 4, "--match-active", 6,
                        "--json", out_json, "--plot", plots, "--markdown", md)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["schema"] == SCHEMA
    rows = doc["results"]
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    # every policy at both batch sizes; oea at three warm-ups; xshare at both budgets
    assert {(r["policy"], r["batch"]) for r in rows} >= {(p, b) for p in ("topk", "xshare", "lynx", "oea") for b in
                                                        (4, 8)}
    assert sorted(r["warmup_k"] for r in rows if r["policy"] == "oea" and r["batch"] == 8) == [1, 2, 3]
    assert sorted(r["budget"] for r in rows if r["policy"] == "xshare" and r["batch"] == 4) == [5, 8]
    for r in rows:
        assert r["reduction"] == pytest.approx(1 - r["active_experts_mean"] / r["vanilla_active_experts_mean"])
        assert r["peak_ratio"] == pytest.approx(r["vanilla_peak_gpu_experts_mean"] / r["peak_gpu_experts_mean"])
        assert 0 < r["mass_kept"] <= 1 + 1e-6 and 0 <= r["top1_kept"] <= 1
        assert r["active_experts_p50"] <= r["active_experts_p95"] <= r["active_experts_max"]
        assert r["otps_ratio"] is None  # no cost-model preset has 16 experts / top-4
    vanilla = {r["batch"]: r["vanilla_active_experts_mean"] for r in rows}
    assert vanilla[4] < vanilla[8]  # more tokens, more distinct experts
    s = doc["settings"]
    assert s["traces"]["sequences"] == 24 and s["batching"]["4"]["mode"] == "decode"
    assert "cost model off" in s["cost_model_note"]
    assert doc["matched"] and all(m["active_experts"] == 6 for m in doc["matched"])
    for name in ("active_vs_batch.png", "tradeoff.png", "gpu_load.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert text.startswith("| setting |") and "xshare_ep" in text and "At 6 activated experts" in text
    assert "mass kept" in out


def test_matched_interpolates_on_the_sweep(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--budget", 5, "--budget", 9, "--batch", 8,
                      "--gpus", 4, "--match-active", 7, "--match-active", 100, "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    (lo, hi) = sorted(doc["results"], key=lambda r: r["active_experts_mean"])
    at7 = next(m for m in doc["matched"] if m["active_experts"] == 7)
    t = (7 - lo["active_experts_mean"]) / (hi["active_experts_mean"] - lo["active_experts_mean"])
    assert at7["mass_kept"] == pytest.approx(lo["mass_kept"] + t * (hi["mass_kept"] - lo["mass_kept"]))
    assert next(m for m in doc["matched"] if m["active_experts"] == 100)["mass_kept"] is None


def test_target_mass_sweep_rows_and_matched_curves(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--policy", "oea", "--budget", 16,
                      "--target-mass", 0.6, "--target-mass", 0.95, "--target-mass", "none", "--batch", 8,
                      "--gpus", 4, "--match-active", 6, "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    rows = {r["target_mass"]: r for r in doc["results"] if r["policy"] == "xshare"}
    assert set(rows) == {0.6, 0.95, None}
    assert all(r["target_mass"] is None for r in doc["results"] if r["policy"] == "oea")  # no mass target
    lo, hi, full = rows[0.6], rows[0.95], rows[None]
    assert lo["active_experts_mean"] < hi["active_experts_mean"] < full["active_experts_mean"]
    assert lo["mass_kept"] < hi["mass_kept"] <= full["mass_kept"]
    assert "tau=0.6" in lo["label"]
    knobs = {(m["policy"], m["knob"]) for m in doc["matched"]}
    assert ("xshare", "target_mass") in knobs and ("xshare", "budget") in knobs


def test_per_layer_budgets_replay_each_layer_with_its_own(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    out_json = tmp_path / "r.json"
    layers = synthetic_trace()["topk_ids"].shape[0]
    per_layer = [3 + i for i in range(layers)]
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--budget", json.dumps(per_layer), "--budget",
                      '{"default": 4, "0": 9}', "--batch", 8, "--gpus", 4, "--json", out_json)
    assert rc == 0, err
    rows = json.loads(out_json.read_text())["results"]
    args = (json.dumps(per_layer, separators=(",", ":")), '{"default":4,"0":9}')
    listed, mapped = (next(r for r in rows if r["budget_arg"] == arg) for arg in args)
    assert listed["per_layer"]["budget"] == per_layer
    assert mapped["per_layer"]["budget"] == [9] + [4] * (layers - 1)
    act = mapped["per_layer"]["active_experts_mean"]
    assert act[0] > max(act[1:])  # the layer given more experts activates more
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--budget", json.dumps(per_layer[:-1]), "--batch", 8)
    assert rc == 2 and f"{layers} MoE layers" in err
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--budget", '{"99": 4}', "--batch", 8)
    assert rc == 2 and "unknown MoE layer id(s) 99" in err


def test_proposed_layer_budgets_come_from_the_sweep(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    out_json = tmp_path / "r.json"
    rc, out, err = _run(capsys, "--trace", a, "--policy", "xshare", *sum((["--budget", b] for b in (3, 5, 8, 12)), []),
                        "--batch", 8, "--gpus", 4, "--propose-layer-budgets", 0.8, "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    prop = doc["proposed_layer_budgets"]
    rows = sorted(doc["results"], key=lambda r: r["budget"])
    for i, b in enumerate(prop["budgets"]):
        fits = [r["budget"] for r in rows if r["per_layer"]["mass_kept"][i] >= 0.8]
        assert b == (fits[0] if fits else 12)
    assert prop["total"] == sum(prop["budgets"]) and json.dumps(prop["budgets"]) in out
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--propose-layer-budgets", 1.5, "--batch", 8)
    assert rc == 2 and "--propose-layer-budgets" in err


def test_eplb_placement_roundtrip(tmp_path, capsys):
    a, b = _traces(tmp_path)
    saved, r1, r2 = tmp_path / "pl.json", tmp_path / "r1.json", tmp_path / "r2.json"
    common = ["--trace", a, "--policy", "topk", "--policy", "xshare_ep", "--budget", 8, "--gpus", 4, "--batch", 6]
    rc, _, err = _run(capsys, *common, "--placement", "eplb", "--eplb-redundant", 4, "--eplb-trace", b,
                      "--save-placement", saved, "--json", r1)
    assert rc == 0, err
    p = json.loads(saved.read_text())
    assert np.array(p["physical_to_logical_map"]).shape == (2, 20) and p["num_gpus"] == 4
    d1 = json.loads(r1.read_text())
    assert d1["settings"]["placement"]["loads_from"] == [b] and d1["settings"]["placement"]["num_physical"] == 20
    rc, _, err = _run(capsys, *common, "--placement", saved, "--json", r2)
    assert rc == 0, err
    d2 = json.loads(r2.read_text())
    for x, y in zip(d1["results"], d2["results"], strict=True):
        assert x["peak_gpu_experts_mean"] == y["peak_gpu_experts_mean"]
        assert x["gpu_load_mean"] == y["gpu_load_mean"]


def test_recorded_batches_are_replayed(tmp_path, capsys):
    a = write_synthetic_trace(tmp_path / "rec.npz", batch_size=5, num_experts=16, top_k=4)
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", a, "--policy", "xshare", "--budget", 6, "--gpus", 2, "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    n = np.load(a)["seq_ids"].size
    assert doc["settings"]["batching"]["recorded"]["batches"] == -(-n // 5)
    assert doc["results"][0]["batch"] is None
    rc, _, err = _run(capsys, "--trace", a, "--batch", 4)
    assert rc == 2 and "batch_ids" in err and a in err


def _assert_failed_cleanly(rc, err, tmp_path, *needles):
    assert rc == 2
    for n in needles:
        assert str(n) in err, err
    assert not (tmp_path / "out.json").exists()
    assert not (tmp_path / "plots").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".xshare")] == []


def _outputs(tmp_path):
    return ["--json", tmp_path / "out.json", "--plot", tmp_path / "plots", "--markdown", tmp_path / "out.md"]


@pytest.mark.parametrize("key", ["topk_ids", "topk_weights", "seq_ids", "meta"])
def test_missing_key_fails_without_output(tmp_path, capsys, key):
    arrays = synthetic_trace()
    del arrays[key]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    good = write_synthetic_trace(tmp_path / "good.npz")
    rc, _, err = _run(capsys, "--trace", good, "--trace", bad, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, bad, repr(key))


def test_mismatched_shapes_fail_without_output(tmp_path, capsys):
    arrays = synthetic_trace()
    arrays["topk_weights"] = arrays["topk_weights"][:, :-1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    rc, _, err = _run(capsys, "--trace", bad, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, bad, "'topk_weights'")


def test_empty_trace_fails_without_output(tmp_path, capsys):
    arrays = synthetic_trace()
    for k in ("topk_ids", "topk_weights"):
        arrays[k] = arrays[k][:, :0]
    for k in ("seq_ids", "positions"):
        arrays[k] = arrays[k][:0]
    bad = tmp_path / "empty.npz"
    np.savez(bad, **arrays)
    rc, _, err = _run(capsys, "--trace", bad, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, bad, "empty")


def test_top_k_flag_disagreeing_fails_without_output(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    rc, _, err = _run(capsys, "--trace", a, "--top-k", 6, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, a, "'meta'", "top_k = 4", "--top-k 6")


@pytest.mark.parametrize("argv, needles", [
    (["--budget", "17"], ["--budget 17", "E = 16"]),
    (["--budget", "1.5"], ["--budget 1.5", "(0, 1]"]),
    (["--budget", "x"], ["--budget 'x'"]),
    (["--warmup-k", "5"], ["--warmup-k 5", "top_k = 4"]),
    (["--policy", "nope"], ["unknown policy 'nope'"]),
    (["--policy", "xshare:budget=40"], ["budget 40", "E = 16"]),
    (["--gpus", "3"], ["--gpus 3"]),
    (["--batch", "99"], ["--batch 99", "sequences"]),
    (["--layers", "7"], ["--layers", "out of range"]),
    (["--model", "deepseek-v3"], ["--model deepseek-v3", "256 experts"]),
    (["--placement", "missing.json"], ["missing.json", "not found"]),
    (["--eplb-trace", "x.npz"], ["--eplb-trace needs --placement eplb"]),
    (["--target-mass", "0"], ["--target-mass", "(0, 1]"]),
    (["--target-mass", "1.5"], ["--target-mass", "(0, 1]"]),
    (["--policy", "xshare:target_mass=2"], ["xshare:target_mass", "(0, 1]"]),
])
def test_bad_flags_fail_without_output(tmp_path, capsys, argv, needles):
    a, _ = _traces(tmp_path)
    rc, _, err = _run(capsys, "--trace", a, "--batch", 4, *argv, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, *needles)


def test_bad_placement_file_names_the_key(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    pl = tmp_path / "pl.json"
    pl.write_text(json.dumps({"physical_to_logical_map": [list(range(15)) + [0]]}))
    rc, _, err = _run(capsys, "--trace", a, "--batch", 4, "--gpus", 4, "--placement", pl, *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, pl, "physical_to_logical_map")


def test_output_folder_must_exist(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    rc, _, err = _run(capsys, "--trace", a, "--json", tmp_path / "no" / "r.json")
    assert rc == 2 and "--json" in err


def test_real_traces_xshare_and_xshare_ep_figures(tmp_path, capsys):
    """The documented figures (docs/eval.md) on three of the 26 layers."""
    for path in TRACES:
        require_path(path, "the recorded routing traces, in the shared folder next to the repository")
    out_json = tmp_path / "real.json"
    rc, out, err = _run(capsys, "--trace", TRACES[0], "--trace", TRACES[1], "--layers", "0,12,25", "--batch", 16,
                        "--policy", "topk", "--policy", "xshare", "--policy", "xshare_ep", "--budget", 32,
                        "--warmup-k", 1, "--gpus", 8, "--gpu-cap", 4, "--json", out_json)
    assert rc == 0, err
    rows = {r["policy"]: r for r in json.loads(out_json.read_text())["results"]}
    xs, ep = rows["xshare"], rows["xshare_ep"]
    assert xs["reduction"] >= 0.25 and xs["mass_kept"] >= 0.90
    assert xs["top1_kept"] == 1.0  # warm-up k0 = 1 keeps every token's top-1
    assert ep["peak_ratio"] >= 1.7
    assert rows["topk"]["otps_ratio"] == 1.0 and xs["otps_ratio"] is not None  # DeepSeek-V2-Lite preset
    assert "DeepSeek-V2-Lite" in out


def test_replays_a_shard_of_the_live_recorder(tmp_path, capsys):
    """A trace written by the SGLang plugin's recorder (router logits, recorded batches) replays as is."""
    import torch

    from xshare.sglang.observe.trace import TraceRecorder

    rec = TraceRecorder(tmp_path / "rec", max_tokens=10_000, flush_tokens=10_000, meta={"model": "toy"})
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        rids = [f"r{(step + i) % 9}" for i in range(6)]
        rec.begin_forward(rids, 1, torch.full((6,), step))
        for layer in (3, 4):
            rec.add_layer(layer, torch.randn(6, 16, generator=gen), 4, "softmax")
        rec.end_forward()
    shard = rec.flush()
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", shard, "--policy", "topk", "--policy", "xshare", "--budget", 8, "--gpus", 4,
                      "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    assert doc["settings"]["batching"]["recorded"]["batches"] == 12
    assert doc["settings"]["traces"]["files"][0]["router_logits"] is True
    xs = next(r for r in doc["results"] if r["policy"] == "xshare")
    assert xs["active_experts_max"] <= 8 < xs["vanilla_active_experts_mean"]
    assert xs["per_layer"]["layer"] == [3, 4]


def test_a_recorded_biased_grouped_router_trace_replays_with_its_router(tmp_path, capsys):
    """A trace the recorder wrote for a DeepSeek-V3-style router (sigmoid + correction bias, 4 groups keep
    2) stores the routing description and the biases, its top-K is the router's own routing, and the
    replay routes with that router: vanilla = the stored routing, a budget keeps every token inside its
    groups."""
    import torch

    from xshare.eval.traces import load_trace
    from xshare.selection.routers.gate import reference_route, router_scores
    from xshare.selection.routers.spec import RouterSpec
    from xshare.sglang.observe.trace import TraceRecorder

    gen = torch.Generator().manual_seed(1)
    specs = {layer: RouterSpec(scoring="sigmoid", correction_bias=torch.randn(16, generator=gen) * 0.5,
                               num_expert_group=4, topk_group=2, routed_scaling_factor=2.5) for layer in (1, 2)}
    rec = TraceRecorder(tmp_path / "rec", max_tokens=10_000, flush_tokens=10_000, meta={"model": "toy-v3"})
    logits = {}
    for step in range(10):
        rec.begin_forward([f"r{(step + i) % 8}" for i in range(6)], 1, torch.full((6,), step))
        for layer, spec in specs.items():
            x = torch.randn(6, 16, generator=gen)
            logits.setdefault(layer, []).append(x)
            rec.add_layer(layer, x, 4, "sigmoid", router=spec)
        rec.end_forward()
    shard = rec.flush()
    trace = load_trace(shard)
    assert trace.router == specs[1].to_meta() and trace.correction_bias.shape == (2, 16)
    for li, layer in enumerate((1, 2)):
        spec = trace.layer_router(li)
        assert torch.equal(spec.correction_bias, specs[layer].correction_bias.float())
        x = torch.cat(logits[layer]).half().float()  # the trace stores float16 logits
        own = reference_route(x, 4, specs[layer], exact=False).topk_ids.long()
        stored = torch.from_numpy(trace.topk_ids[li])
        assert torch.equal(torch.sort(stored, 1).values, torch.sort(own, 1).values)
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", shard, "--policy", "topk", "--policy", "xshare", "--budget", 6, "--gpus", 4,
                      "--json", out_json)
    assert rc == 0, err
    doc = json.loads(out_json.read_text())
    vanilla = next(r for r in doc["results"] if r["policy"] == "topk")
    assert vanilla["mass_kept"] == pytest.approx(1.0) and vanilla["top1_kept"] == pytest.approx(1.0)
    xs = next(r for r in doc["results"] if r["policy"] == "xshare")
    assert xs["active_experts_mean"] < vanilla["active_experts_mean"]
    # which means something: plain sigmoid top-k (no bias, no groups) routes many tokens differently
    x = torch.cat(logits[1]).half().float()
    plain = torch.topk(router_scores(x, specs[1], exact=False).affinity, 4, dim=-1).indices
    stored = torch.from_numpy(trace.topk_ids[0])
    differs = (torch.sort(plain, 1).values != torch.sort(stored, 1).values).any(1)
    assert differs.float().mean() > 0.2


def test_all_skips_settings_a_policy_rejects_but_a_named_policy_fails(tmp_path, capsys):
    a, _ = _traces(tmp_path)
    out_json = tmp_path / "r.json"
    rc, _, err = _run(capsys, "--trace", a, "--batch", 4, "--gpus", 4, "--budget", 6, "--policy", "all",
                      "--warmup-k", 0, "--warmup-k", 2, "--json", out_json)
    assert rc == 0, err
    assert "skipped oea k0=0" in err and "skipped des_seq k0=0" in err
    labels = {r["label"] for r in json.loads(out_json.read_text())["results"]}
    assert {"oea k0=2", "xshare m=6 k0=0", "xshare m=6 k0=2"} <= labels and "oea k0=0" not in labels
    rc, _, err = _run(capsys, "--trace", a, "--batch", 4, "--gpus", 4, "--policy", "oea", "--warmup-k", 0,
                      *_outputs(tmp_path))
    _assert_failed_cleanly(rc, err, tmp_path, "--policy oea", "warmup_k must be >= 1")
