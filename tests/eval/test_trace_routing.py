"""The routing statistics the GPU check carries (overlay/xshare/bench/_trace_routing.py) and the synthetic
router logits built from them (xshare.bench._routing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED, require_path
from xshare.bench._routing import fit_sigma, synthetic_logits, trace_ratio, uniform_active
from xshare.bench._trace_routing import STATS

GENERATED = ROOT / "overlay" / "xshare" / "bench" / "_trace_routing.py"


@pytest.mark.slow
def test_regenerating_the_statistics_gives_the_same_bytes(tmp_path):
    traces = require_path(SHARED / "traces" / "esft_intent.npz", "the ESFT traces").parent
    out = tmp_path / "stats.py"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "trace_routing_stats.py"), "--traces", str(traces),
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    assert out.read_bytes() == GENERATED.read_bytes()
    assert GENERATED.stat().st_size < 4096  # a few numbers, not a copy of the traces


def test_the_statistics_are_the_documented_ones():
    per = STATS["per_batch"]
    assert (STATS["num_experts"], STATS["top_k"], STATS["layers"]) == (64, 6, 26)
    assert per["16"]["active_mean"] == pytest.approx(43.0, abs=0.05)  # docs/eval.md: 43.0 at B = 16
    assert per["32"]["active_mean"] == pytest.approx(51.3, abs=0.05)
    for b, v in per.items():
        assert v["uniform"] == pytest.approx(uniform_active(64, 6, int(b)), abs=1e-3)
        assert v["ratio"] == pytest.approx(v["active_mean"] / v["uniform"], abs=1e-3)


def _mean_active(e: int, k: int, b: int, sigma: float, n: int = 300, seed: int = 99) -> float:
    ids = synthetic_logits(n, b, e, sigma=sigma, seed=seed).topk(k, dim=-1).indices.reshape(n, -1)
    return float(torch.zeros(n, e).scatter_(1, ids, 1.0).sum(1).mean())


def test_synthetic_routing_reproduces_the_traces_activation_on_their_own_shape():
    sigma = fit_sigma(64, 6)
    assert sigma > 0
    for b, tol in ((4, 0.02), (8, 0.02), (16, 0.02), (32, 0.06)):  # fitted at 16; the others are predictions
        want = STATS["per_batch"][str(b)]["active_mean"]
        assert _mean_active(64, 6, b, sigma) == pytest.approx(want, rel=tol), b


@pytest.mark.parametrize("e, k", [(128, 4), (128, 8), (256, 8)])
def test_other_shapes_get_the_traces_ratio_and_sigma_zero_is_uniform(e, k):
    sigma = fit_sigma(e, k)
    assert _mean_active(e, k, 16, sigma) / uniform_active(e, k, 16) == pytest.approx(trace_ratio(16), abs=0.02)
    assert _mean_active(e, k, 16, 0.0) == pytest.approx(uniform_active(e, k, 16), rel=0.02)
    assert fit_sigma(e, k, 1.0) == 0.0


def test_ratio_interpolation_and_bad_arguments():
    assert trace_ratio(1) == 1.0 and trace_ratio(16) == STATS["per_batch"]["16"]["ratio"]
    assert STATS["per_batch"]["32"]["ratio"] <= trace_ratio(24) <= STATS["per_batch"]["16"]["ratio"]
    assert trace_ratio(1000) == STATS["per_batch"]["64"]["ratio"]
    with pytest.raises(ValueError, match="batch"):
        trace_ratio(0)
    with pytest.raises(ValueError, match="top_k"):
        fit_sigma(8, 9)
    with pytest.raises(ValueError, match="sigma"):
        synthetic_logits(1, 2, 8, sigma=-1)
    a = synthetic_logits(2, 3, 8, sigma=0.5, seed=1)
    assert torch.equal(a, synthetic_logits(2, 3, 8, sigma=0.5, seed=1)) and a.shape == (2, 3, 8)
