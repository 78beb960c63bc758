"""The series budget: the ``xshare:*`` series a DeepSeek-V3 group on 4 x 8 GPUs exports (58 MoE layers, 256 routed
experts, EP 32, 32 scheduler ranks), counted on the exposition of the real exporter.

Each rank is a real :class:`xshare.sglang.state.ProcessState` with the real
:class:`xshare.sglang.observe.metrics.Exporter`
(``ep`` = its EP rank of 32): a window row per MoE layer with 32 GPU columns, every layer noted as selecting,
fallbacks, 80 config changes (policies, budgets, enable/disable), flushed into a real prometheus_client
multiprocess directory; SGLang's own collector class reads it back and the ``xshare:`` samples are counted. Runs in
a subprocess (this process's prometheus_client stays out of multiprocess mode); about 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# DeepSeek-V3: layers 0-2 dense (first_k_dense_replace = 3), 3..60 MoE; 256 routed experts; 4 nodes x 8 GPUs
LAYERS = tuple(range(3, 61))
EXPERTS, GPUS, RANKS = 256, 32, 32
BUDGET = 5000
#: The admin HTTP process (one per group, on the leader) counts its own results (rank="http"): applied, invalid,
#: unauthorized, forbidden, reverted, failed, and room for a few more.
HTTP_SERIES = 10

HARNESS = r"""
import json, sys, torch
from collections import Counter
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families
from xshare.sglang.observe import metrics
from xshare.sglang.state import ProcessState
from xshare.sglang.settings import load_settings
from xshare.sglang.observe.stats import WINDOW_FIELDS

detail, layers, experts, gpus, ep_size, ranks, changes, profile = json.loads(sys.argv[1])
env = {"XSHARE_ENABLE": "1", "XSHARE_METRICS_DETAIL": detail}
policies = [("xshare", "0.5"), ("xshare_ep", "0.25"), ("xshare_spec", "64"), ("topk", "8"), ("xshare", "32")]
for r in range(ranks):
    rt = ProcessState(load_settings(env), rank=r)
    rt.num_experts_hint = experts
    rt.enable_observability(metrics.Exporter(r, ep=(ep_size, r % ep_size, r < ep_size)))
    rt.stats.mode = "decode"  # what ProcessState.push sets for a decode forward
    for forward in range(3):
        for layer in layers:
            row = torch.rand(len(WINDOW_FIELDS) + 2 * gpus) * 8
            row[0] = layer
            rt.stats.record_figures(row)
            rt.stats.record_seconds(1e-4)
            rt.stats.count_call()
            rt.stats.record_call_host(layer, 6, 9, 16)  # an applied decode call: the per-mode sums
            rt.stats.note_layer(layer, "selects")
        rt.stats.count_forward()
    rt.stats.count_fallback("RuntimeError")
    if profile:  # XSHARE_PROFILE=1 (off by default)
        rt.stats.record_forward_time("decode", 0.5); rt.stats.record_moe_time("decode", 0.25)
    rt.flush_metrics()
    for v in range(1, changes + 1):
        policy, budget = policies[v % len(policies)]
        rt.set_config(load_settings({**env, "XSHARE_POLICY": policy, "XSHARE_BUDGET": budget,
                                     "XSHARE_ENABLE": "0" if v % 7 == 0 else "1"}), v)
        rt.metrics.config_change("applied")
        rt.flush_metrics()
reg = CollectorRegistry()
multiprocess.MultiProcessCollector(reg)
text = generate_latest(reg).decode()
if len(sys.argv) > 2:
    open(sys.argv[2], "w").write(text)
per_family = Counter()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        if s.name.startswith("xshare:"):
            per_family[fam.name] += 1
print(json.dumps(per_family))
"""


def count_series(tmp_path, detail: str, *, layers=LAYERS, experts=EXPERTS, gpus=GPUS, ep_size=GPUS, ranks=RANKS,
                 changes=80, exposition=None, profile=False) -> dict[str, int]:
    """``xshare:`` samples per metric family in the exposition of ``ranks`` exporters of that shape (written to
    ``exposition`` when given). Every rank ran decode forwards and had one fallback; ``profile``: with
    XSHARE_PROFILE's forward timings too."""
    d = tmp_path / detail
    d.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d)}
    args = json.dumps([detail, list(layers), experts, gpus, ep_size, ranks, changes, profile])
    extra = [str(exposition)] if exposition else []
    r = subprocess.run([sys.executable, "-c", HARNESS, args, *extra], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def test_deepseek_v3_on_32_gpus_fits_the_budget(tmp_path):
    fams = count_series(tmp_path, "group")
    total = sum(fams.values()) + HTTP_SERIES
    print(f"\nDeepSeek-V3, {RANKS} ranks, EP {GPUS}, {len(LAYERS)} MoE layers, detail=group: {total} xshare series "
          f"for the group ({sum(fams.values())} from the schedulers + {HTTP_SERIES} HTTP)")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(fams.items(), key=lambda kv: -kv[1])))
    assert total <= BUDGET
    # a version is a value, not a label: 80 changes over 4 policies leave 4 config_info series per rank
    assert fams["xshare:config_info"] == 4 * RANKS
    assert fams["xshare:config_version"] == RANKS
    # per-GPU gauges: each rank reports its own GPU only, layers aggregated
    assert fams["xshare:gpu_active_experts"] == fams["xshare:gpu_tokens"] == GPUS
    # the coverage metric: one (selects) series per rank
    assert fams["xshare:layers"] == RANKS
    # distributions come from rank 0 only: one aggregated series set per histogram
    from xshare.sglang.observe.metrics import DISTRIBUTIONS

    for name in DISTRIBUTIONS:
        assert fams[name.removesuffix("_total")] == len(metrics_buckets(name)) + 3, name


def metrics_buckets(name: str) -> tuple[float, ...]:
    from xshare.sglang.observe import metrics

    return metrics._BUCKETS[name]


@pytest.mark.parametrize("detail", ["rank", "layer"])
def test_finer_detail_is_opt_in_and_counted(tmp_path, detail):
    """The finer levels follow their documented formulas (docs/observability.md), on 4 of the group's ranks (the
    whole group takes a minute to feed): every rank exports the distributions, ``layer`` per MoE layer. On the
    32-rank group that is about 5,870 series (rank) and 97,070 (layer), which is why they are opt-in."""
    ranks = 4
    fams = count_series(tmp_path, detail, ranks=ranks, changes=5)
    per_layer = len(LAYERS) if detail == "layer" else 1
    for name in ("xshare:active_experts", "xshare:vanilla_active_experts"):
        assert fams[name] == ranks * per_layer * (len(metrics_buckets(name)) + 3)
    assert fams["xshare:peak_mean_ratio"] == ranks * (len(metrics_buckets("xshare:peak_mean_ratio")) + 3)
    assert fams["xshare:gpu_active_experts"] == fams["xshare:gpu_tokens"] == ranks * per_layer  # own GPU only
    projected = sum(fams.values()) * RANKS // ranks + HTTP_SERIES
    print(f"\nDeepSeek-V3, detail={detail}: {sum(fams.values())} series on {ranks} ranks, ~{projected} for the group")
    assert projected > BUDGET
