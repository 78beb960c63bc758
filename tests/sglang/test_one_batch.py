"""``xshare one-batch``: SGLang's own one-batch benchmark (``sglang.benchmark.one_batch``, which never
loads plugins by itself) with the plugin loaded. A real run on the CPU with a biased-router tiny
model (GLM-4.5 architecture): the start-up coverage report, and the selector applied on every MoE
layer with activated experts at the budget."""

import json
import subprocess
import sys

from conftest import require_module
from xshare.models.tiny_moe import PRESETS, build_tiny_moe

require_module("sglang.benchmark.one_batch", "scripts/install_sglang_cpu.sh", load=False)

PROMPTS = ["def hello(name):", "import os", "class Buffer:", "for i in range(10):"]


def test_one_batch_runs_with_the_selector_on_every_moe_layer(tmp_path):
    spec = PRESETS["glm45"]
    model = build_tiny_moe(tmp_path / "model", spec)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    stats = tmp_path / "stats"
    budget = spec.top_k
    # the benchmark's latency mode draws token ids below 10000 (more than a tiny vocabulary), so
    # its correctness mode runs the same ModelRunner on these prompts
    cmd = [sys.executable, "-m", "xshare.cli", "one-batch", "--xshare-budget", str(budget), "--xshare-warmup-k", "0",
           "--xshare-stats-dir", str(stats), "--xshare-stats-every", "1",
           "--model-path", str(model), "--device", "cpu", "--batch-size", str(len(PROMPTS)), "--output-len", "6",
           "--correctness-test", "--prompt-filename", str(prompts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "coverage at start-up (rank 0)" in log, log[-4000:]
    files = list(stats.glob("*.json"))
    assert len(files) == 1, files
    snap = json.loads(files[0].read_text())
    layers = {str(i) for i in spec.moe_layers}
    assert snap["startup_coverage"] == dict.fromkeys(layers, "ready"), snap["startup_coverage"]
    assert snap["coverage"] == dict.fromkeys(layers, "selects"), snap["coverage"]
    assert snap["applied"] > 0 and snap["fallbacks_total"] == 0, snap
    for layer in layers:
        figures = snap["layers"][layer]
        assert figures["mean_activated"] <= budget < figures["mean_vanilla_activated"], figures
