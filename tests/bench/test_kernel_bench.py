"""``xshare bench selector`` runs end to end on a tiny grid and writes well-formed JSON (no timing
assertions: the numbers depend on the machine)."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import pytest

from xshare.bench import modes
from xshare.cli import main

TINY = ["--batch", "1,4", "--experts", "8,16", "--top-k", "2,9", "--hidden", "32", "--moe-intermediate", "16",
        "--repeat", "1", "--dtype", "float32"]


def test_selector_mode_is_registered():
    assert "selector" in modes()


def test_bench_selector_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    assert main(["bench", "selector", *TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "select_us" in printed and "share%" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["hidden"] == 32 and data["meta"]["selector"]["policy"] == "xshare"
    points = data["points"]
    # top_k = 9 > E = 8 is skipped: 2 batches x (E=8: k=2; E=16: k=2, 9)
    assert sorted((p["batch"], p["experts"], p["top_k"]) for p in points) == sorted(
        (b, e, k) for b in (1, 4) for e, k in ((8, 2), (16, 2), (16, 9)))
    for p in points:
        for key in ("topk_us", "select_us", "experts_us", "experts_xshare_us", "select_over_topk",
                    "select_over_experts", "select_share_of_layer"):
            assert isinstance(p[key], float) and math.isfinite(p[key]) and p[key] > 0, (key, p)
        assert p["select_share_of_layer"] < 1
        assert 1 <= p["active_select"] <= p["experts"] and p["active_topk"] >= p["top_k"]
        assert p["kernel_us"] is None  # no CUDA here


def test_bench_selector_gpu_aware_policy_without_experts(tmp_path):
    out = tmp_path / "ep.json"
    argv = ["bench", "selector", "--batch", "8", "--experts", "16", "--top-k", "4", "--policy", "xshare_ep",
            "--gpus", "4", "--budget", "6", "--no-experts", "--repeat", "1", "--json", str(out)]
    assert main(argv) == 0
    (p,) = json.loads(out.read_text())["points"]
    assert p["budget"] == 6 and p["select_over_topk"] > 0 and "experts_us" not in p


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch"),
    (["--top-k", "x"], "--top-k"),
    (["--policy", "nope"], "--policy"),
    (["--budget", "-3"], "budget"),
    (["--experts", "4", "--policy", "xshare_ep", "--gpus", "8"], "--gpus"),
])
def test_bad_arguments_fail_cleanly(tmp_path, capsys, argv, message):
    out = tmp_path / "bad.json"
    with pytest.raises(SystemExit) if argv[0] in ("--batch", "--top-k") else contextlib.nullcontext():
        rc = main(["bench", "selector", *TINY, *argv, "--json", str(out)])
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_console_script_runs_a_point(tmp_path):
    out = tmp_path / "one.json"
    proc = subprocess.run(
        [sys.executable, "-m", "xshare.cli", "bench", "selector", "--batch", "16", "--experts", "32", "--top-k", "4",
         "--hidden", "64", "--moe-intermediate", "32", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["points"][0]["select_over_topk"] > 0


@pytest.mark.parametrize("router", ["auxfree", "deepseek_v3"])
def test_bench_selector_router_case(tmp_path, capsys, router):
    """--router times the biased grouped gate, the engine's torch path and its C path (same routing,
    checked by the benchmark itself) on the model's shape, and the C path computing the gate itself where
    SGLang's gate can be skipped (no fused shared slot)."""
    from xshare.selection.backends.c.kernel import cpu_kernel_available

    out = tmp_path / "router.json"
    argv = ["bench", "selector", "--router", router, "--batch", "4,16", "--experts", "32", "--top-k", "4",
            "--budget", "8", "--warmup-k", "2", "--hidden", "32", "--moe-intermediate", "16", "--repeat", "1",
            "--dtype", "float32", "--json", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["router"] == router
    for p in data["points"]:
        assert p["router"] == router and p["budget"] == 8
        assert p["topk_us"] > 0 and p["select_us"] > 0 and 4 <= p["active_select"] <= p["active_topk"]
        if cpu_kernel_available():
            assert p["cpu_us"] > 0 and 0 < p["cpu_share_of_layer"] < 1
            # the served path that computes the gate itself: auxfree's gate (no shared slot) only
            assert (p["gate_us"] is not None and p["gate_us"] > 0) == (router == "auxfree"), p
    if cpu_kernel_available():
        printed = capsys.readouterr().out
        assert "cpu_us" in printed and ("gate_us" in printed) == (router == "auxfree")


def test_bench_selector_router_needs_whole_groups(tmp_path, capsys):
    out = tmp_path / "bad.json"
    assert main(["bench", "selector", "--router", "deepseek_v3", "--experts", "20", "--top-k", "4",
                 "--no-experts", "--repeat", "1", "--json", str(out)]) == 2
    assert "--router deepseek_v3" in capsys.readouterr().err and not out.exists()
