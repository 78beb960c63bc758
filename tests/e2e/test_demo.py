"""End to end: ``xshare demo`` on a real SGLang CPU server (trained tiny model, selector off then on at runtime).

The model is the project's trained tiny Qwen3-MoE at a short recipe (the default shape, few training steps: the
``trained_model`` fixture of tests/conftest.py) so the test does not wait for the full training; the demo itself is
the README's command.
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import group_processes

pytestmark = pytest.mark.e2e


def test_demo_end_to_end(trained_model, short_recipe, tmp_path):
    out_json = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "demo", "--model-dir", str(trained_model),
                           "--problems", "32", "--budget", "8", "--warmup-k", "0", "--json", str(out_json),
                           "--log", str(tmp_path / "server.log")],
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    # the runtime switch went through the admin endpoint
    assert re.search(r"PUT /xshare/config -> v\d+: .*'enabled': True", out), out
    doc = json.loads(out_json.read_text())
    off, on = doc["rows"]
    assert off["setting"] == "off" and on["setting"].startswith("on (xshare")
    assert off["requests"] == on["requests"] == 3 * 32  # every request answered, both settings, 3 rounds
    rounds = re.findall(r"round (\d)/3 (off|on)", out)
    assert rounds == [("1", "off"), ("1", "on"), ("2", "on"), ("2", "off"), ("3", "off"), ("3", "on")], rounds
    assert len(off["activated_per_layer"]) == len(on["activated_per_layer"]) == short_recipe.num_layers
    for a_on, a_off in zip(on["activated_per_layer"], off["activated_per_layer"], strict=True):
        # budget 8, no warm-up (the warm-up union may exceed the budget): at most 8 experts per layer,
        # fewer than what vanilla top-k activates at 16 clients
        assert a_on <= 8 + 1e-9 < a_off, (on, off)
    assert on["peak_gpu_experts"] < off["peak_gpu_experts"]
    for r in (off, on):
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 0 <= r["accuracy"]["overall"] <= 1 and set(r["accuracy"]) >= {"add", "copy", "overall"}
    # the table and the metrics lines
    assert re.search(r"^\s*off\s+[0-9.]+/[0-9.]+/[0-9.]+\s+", out, re.M) and "exact match" in out
    for name in ("xshare:enabled", "xshare:active_experts_sum{layer=\"0\"", "xshare:selector_calls_total",
                 "xshare:config_changes_total"):
        assert any(line.strip().startswith(name) for line in out.splitlines()), name
    enabled = [line for line in out.splitlines() if line.strip().startswith("xshare:enabled")]
    assert enabled and float(enabled[0].split()[-1]) == 1.0
    assert "server stopped (cleanly)" in out
    assert not doc["leftover_processes"]
    assert doc["server_pid"] and not group_processes(doc["server_pid"]), "server processes left behind"


def test_demo_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "demo", "--budget", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--budget" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "xshare.cli", "demo", "--policy", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--policy" in proc.stderr
