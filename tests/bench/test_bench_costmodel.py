"""``xshare bench costmodel`` and the calibration of the cost model on SGLang's published H200 kernel times."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xshare.cli import main
from xshare.eval.costmodel import (
    CALIBRATION,
    GPUS,
    MODELS,
    SGLANG_PR11730,
    CostModel,
    fit_calibration,
    uniform_active,
)

PUBLISHED = dict(zip(SGLANG_PR11730.batch, SGLANG_PR11730.kernel_us, strict=True))


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "cm.json"
    assert main(["bench", "costmodel", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_command_reproduces_sglangs_published_h200_times_within_25_percent(tmp_path):
    doc = _run(tmp_path, "--model", "qwen3-235b-a22b", "--gpu", "h200", "--dtype", "fp8", "--tp", "8",
               "--batch", "1,2,4,8,16,24,32")
    rows = doc["results"]
    assert [r["batch"] for r in rows] == [1, 2, 4, 8, 16, 24, 32]
    for r in rows:
        assert r["moe_layer_us"] == pytest.approx(PUBLISHED[r["batch"]], rel=0.25), r
        assert r["published_us"] == PUBLISHED[r["batch"]]
        assert r["active_experts"] == pytest.approx(128 * (1 - (1 - 8 / 128) ** r["batch"]))
        assert r["compute_us"] < 0.05 * r["memory_us"]  # memory-bound at these batches: the fit's premise
    assert doc["settings"]["routing_detail"].startswith("uniform routing, exact expectation")
    assert doc["settings"]["moe_fixed_us"] == CALIBRATION["moe_fixed_us"]


def test_the_calibration_constants_are_the_fit_and_the_form_predicts_held_out_batches():
    fit = fit_calibration()
    assert fit["moe_fixed_us"] == pytest.approx(CALIBRATION["moe_fixed_us"], abs=0.05)
    assert fit["expert_hbm_efficiency"] == pytest.approx(CALIBRATION["expert_hbm_efficiency"], abs=5e-4)
    # fitted on B <= 8 only, the same form predicts B = 16, 24, 32 within 10%
    early = fit_calibration(use=slice(0, 4))
    cm = CostModel(GPUS["h200"], MODELS["qwen3-235b-a22b"], 1, tp=8, moe_fixed_us=early["moe_fixed_us"],
                   expert_hbm_efficiency=early["expert_hbm_efficiency"])
    for b in (16, 24, 32):
        n = uniform_active(128, 8, b)
        z = np.zeros((1, 1))
        t = cm.layer_times(np.array([[n]]), np.array([[8.0 * b]]), z, z, np.array([b]))[0] * 1e6
        assert t == pytest.approx(PUBLISHED[b], rel=0.10), b


def test_a_wrong_constant_misses_the_published_numbers(tmp_path):
    doc = _run(tmp_path, "--model", "qwen3-235b-a22b", "--dtype", "fp8", "--tp", "8", "--batch", "1,32",
               "--moe-fixed-us", "0", "--expert-hbm-efficiency", "0.8")  # the plain roofline of xshare eval
    assert any(abs(r["error"]) > 0.25 for r in doc["results"])


def test_xshare_at_the_vllm_ports_setting(tmp_path):
    doc = _run(tmp_path, "--model", "gpt-oss-120b", "--batch", "4,16", "--budget", "24", "--routing", "trace",
               "--samples", "16")
    small, b16 = doc["results"]
    assert b16["xshare_active_experts"] <= 24 < b16["active_experts"] <= uniform_active(128, 4, 16)
    assert b16["moe_speedup"] > 1.3 and b16["otps_ratio"] > 1.2
    assert small["otps_ratio"] < b16["otps_ratio"]  # little to share at B = 4; the selector's cost remains
    assert doc["settings"]["sigma"] > 0 and "trace statistics" in doc["settings"]["routing_detail"]


def test_reduction_finds_the_budget_and_overheads_dilute_the_gain(tmp_path):
    base = ["--model", "gpt-oss-120b", "--batch", "16", "--reduction", "0.3", "--samples", "16"]
    plain = _run(tmp_path, *base)["results"][0]
    assert plain["xshare_active_experts"] == pytest.approx(0.7 * plain["active_experts"], abs=1.5)
    slow = _run(tmp_path, *base, "--context", "4096", "--step-overhead-us", "2600")["results"][0]
    assert slow["kv_ms"] > 0 and 1.0 < slow["otps_ratio"] < plain["otps_ratio"]


def test_expert_parallel_counts_the_busiest_gpu(tmp_path):
    doc = _run(tmp_path, "--model", "deepseek-v3", "--ep", "8", "--batch", "32", "--budget", "64", "--samples", "8")
    r = doc["results"][0]
    assert r["active_experts"] <= 32 and r["active_experts"] > r["active_experts_total"] / 8
    assert r["xshare_active_experts"] < r["active_experts"] and r["a2a_us"] > 0


@pytest.mark.parametrize("args, needle", [
    (["--model", "deepseek-v3", "--tp", "2", "--ep", "2"], "--tp and --ep"),
    (["--model", "gpt-oss-120b", "--budget", "2"], "--budget"),
    (["--model", "gpt-oss-120b", "--ep", "3"], "--ep"),
    (["--model", "gpt-oss-120b", "--budget", "24", "--reduction", "0.2"], "--reduction"),
    (["--model", "gpt-oss-120b", "--expert-hbm-efficiency", "1.5"], "--expert-hbm-efficiency"),
])
def test_bad_arguments_are_named(tmp_path, capsys, args, needle):
    out = tmp_path / "x.json"
    assert main(["bench", "costmodel", *args, "--json", str(out)]) == 2
    assert needle in capsys.readouterr().err and not out.exists()


def test_presets_used_here_exist():
    assert {"qwen3-235b-a22b", "gpt-oss-120b", "deepseek-v3"} <= set(MODELS)
