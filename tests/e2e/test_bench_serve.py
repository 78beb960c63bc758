"""``xshare bench serve``: setting lists and metrics parsing (pure), and a tiny sweep end to end on a
real SGLang CPU server (one policy, one budget, few requests): JSON schema and plots."""

import json
import subprocess
import sys

import pytest

from xshare.bench.serve.grid import build_settings, parse_budget, parse_target_mass
from xshare.bench.serve.metrics import parse_metrics, window_figures
from xshare.bench.serve.sweep import _round_order


def test_settings_grid():
    s = build_settings(["xshare", "oea"], [0.25, 8], [1, 2])
    assert [x.name for x in s] == ["off", "topk", "xshare@0.25", "xshare@8", "oea@k0=1", "oea@k0=2"]
    assert not s[0].enabled and s[0].body()["enabled"] is False
    assert s[2].body() == {"enabled": True, "policy": "xshare", "budget": 0.25, "warmup_k": 1}
    assert s[4].to_dict()["budget"] is None and s[4].to_dict()["warmup_k"] == 1
    with pytest.raises(ValueError, match="--policy"):
        build_settings(["nope"], [0.5], [1])
    with pytest.raises(ValueError, match="--budget"):
        parse_budget("1.5")
    with pytest.raises(ValueError, match="--budget"):
        parse_budget("x")
    assert parse_budget("8") == 8 and parse_budget("0.5") == 0.5


def test_target_mass_settings_run_at_budget_e():
    s = build_settings(["xshare", "oea"], [8], [1], target_masses=[0.9, 0.95])
    assert [x.name for x in s] == ["off", "topk", "xshare@8", "xshare@tau=0.9", "xshare@tau=0.95", "oea@k0=1"]
    assert s[3].body() == {"enabled": True, "policy": "xshare", "budget": 1.0, "warmup_k": 1, "target_mass": 0.9}
    assert s[3].to_dict()["target_mass"] == 0.9 and s[2].to_dict()["target_mass"] is None
    assert "target_mass" not in s[2].body()
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ValueError, match="--target-mass"):
            parse_target_mass(bad)


def test_speculative_settings_add_the_per_request_policies():
    with pytest.raises(ValueError, match="need --speculative-algorithm"):
        build_settings(["xshare_spec"], [0.5], [1])
    s = build_settings(["xshare", "xshare_spec"], [0.5], [1], include_topk=False, speculative=True, group_budget=6)
    assert [x.name for x in s] == ["off", "xshare@0.5", "xshare_spec@0.5"]
    assert s[2].body() == {"enabled": True, "policy": "xshare_spec", "budget": 0.5, "warmup_k": 1, "group_budget": 6}
    assert "group_budget" not in s[1].body() and s[2].to_dict()["group_budget"] == 6
    s = build_settings(["xshare", "xshare_spec"], [0.5], [1], include_topk=False, speculative=True, anchors=(0, None))
    assert [x.name for x in s] == ["off", "xshare@0.5", "xshare_spec@0.5,a=0", "xshare_spec@0.5"]
    assert s[2].body()["anchor_k"] == 0 and "anchor_k" not in s[3].body() and "anchor_k" not in s[1].body()


@pytest.mark.parametrize("argv, named", [
    (["--speculative-num-draft-tokens", "4"], "needs --speculative-algorithm"),
    (["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "0"], "--speculative-num-draft-tokens"),
    (["--speculative-algorithm", "NGRAM", "--policy", "xshare_spec", "--group-budget", "0"], "--group-budget"),
    (["--speculative-algorithm", "NGRAM", "--policy", "xshare_spec", "--anchor-k", "-1"], "--anchor-k"),
])
def test_bad_speculative_arguments_are_refused(tmp_path, argv, named):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "bench", "serve", "--out", str(out), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and named in proc.stderr and not out.exists()


def test_round_order_interleaves_and_keeps_off_first():
    s = build_settings(["xshare"], [0.25, 0.5], [1])
    orders = [[x.name for x in _round_order(s, r)] for r in range(3)]
    assert all(o[0] == "off" and sorted(o) == sorted(x.name for x in s) for o in orders)
    assert len({tuple(o) for o in orders}) == 3


def test_metrics_difference_gives_per_layer_means():
    def text(n, act0, act1, peak):
        return "\n".join([
            f'xshare:active_experts_sum{{layer="0",rank="0"}} {act0 * n}',
            f'xshare:active_experts_count{{layer="0",rank="0"}} {n}',
            f'xshare:active_experts_sum{{layer="1",rank="0"}} {act1 * n}',
            f'xshare:active_experts_count{{layer="1",rank="0"}} {n}',
            f'xshare:vanilla_active_experts_sum{{layer="0",rank="0"}} {20 * n}',
            f'xshare:vanilla_active_experts_count{{layer="0",rank="0"}} {n}',
            f'xshare:peak_gpu_active_experts_sum{{rank="0"}} {peak * 2 * n}',
            f'xshare:peak_gpu_active_experts_count{{rank="0"}} {2 * n}',
            'xshare:active_experts_bucket{layer="0",le="4.0",rank="0"} 3.0',
            f'xshare:forwards_total{{mode="decode",rank="0"}} {n}',
            f'xshare:forward_seconds_total{{mode="decode",rank="0"}} {0.02 * n}',
            f'xshare:moe_seconds_total{{mode="decode",rank="0"}} {0.02 * act0 / 10 * n}',
            f'xshare:forward_seconds_total{{mode="extend",rank="0"}} {5.0 * n}',
            'sglang:other 1.0'])
    before = parse_metrics(text(10, 8, 8, 3))
    after = parse_metrics(text(30, 7, 6, 2.5))  # 20 more forwards at 6.5 / 5 experts
    f = window_figures(before, after)
    assert f["forwards"] == 20
    assert f["activated_per_layer"] == pytest.approx([6.5, 5.0])
    assert f["vanilla_per_layer"][0] == pytest.approx(20.0) and f["vanilla_per_layer"][1] is None
    assert f["peak_gpu_experts"] == pytest.approx((2.5 * 60 - 3 * 20) / 40)
    assert f["decode_forward_ms"] == pytest.approx(20.0)  # extend time does not count
    assert f["moe_share_decode"] == pytest.approx((0.014 * 30 - 0.016 * 10) / (0.02 * 20))
    assert window_figures(before, before)["activated_per_layer"] is None
    assert window_figures(before, before)["moe_share_decode"] is None


def test_bad_arguments_write_nothing(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "bench", "serve", "--out", str(out),
                           "--budget", "2.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget" in proc.stderr and not out.exists()


@pytest.mark.e2e
def test_tiny_sweep_end_to_end(trained_model, short_recipe, tmp_path):
    out = tmp_path / "serve"
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "bench", "serve", "--out", str(out),
                           "--model-dir", str(trained_model), "--policy", "xshare", "--budget", "8", "--no-topk",
                           "--problems", "16", "--rounds", "1", "--clients", "8"],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "serve.json").read_text())
    assert set(doc) == {"meta", "settings", "rows", "errors"} and doc["errors"] == []
    assert doc["meta"]["leftover_processes"] == [] and doc["meta"]["clients"] == 8
    assert doc["meta"]["server_threads"] == 1
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["off", "xshare@8"]
    off, xs = rows["off"], rows["xshare@8"]
    for r in (off, xs):
        assert r["requests"] == r["expected_requests"] == 16
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert set(r["accuracy"]) >= {"add", "brackets", "copy", "reverse", "sort", "overall"}
        assert len(r["activated_per_layer"]) == short_recipe.num_layers
        assert 0 < r["moe_share_decode"] < 1 and r["decode_forward_ms"] > 0  # XSHARE_PROFILE in the server
    assert off["decode_tokens_per_s_ratio"] == pytest.approx(1.0) and xs["decode_tokens_per_s_ratio"] > 0
    assert all(a <= 8 + 1e-9 for a in xs["activated_per_layer"])
    assert xs["activated"] < off["activated"]  # vanilla top-k of 8 concurrent requests activates more than 8
    assert xs["peak_gpu_experts"] < xs["vanilla_peak_gpu_experts"]
    assert 0 < xs["mass_kept"] <= 1
    for name in ("accuracy_vs_experts.png", "speed_vs_experts.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
