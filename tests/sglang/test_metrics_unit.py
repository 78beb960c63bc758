"""The metrics window on tensors: per-call figures against their definitions, the device ring buffer (no host sync
until drain, overflow counted), the admin config validation (fields named), and the exporter in a real
prometheus_client multiprocess directory (a subprocess, so this process's prometheus_client stays untouched)."""

import os
import subprocess
import sys

import pytest
import torch

from xshare.selection import Placement, SelectorConfig, select
from xshare.selection.types import ModelShape
from xshare.sglang import admin
from xshare.sglang.observe.figures import call_figures
from xshare.sglang.observe.stats import WINDOW_CAPACITY, WINDOW_FIELDS, SelectorStats

F = {f: i for i, f in enumerate(WINDOW_FIELDS)}


def _case(seed=0, t=6, e=16, k=4, budget=5, gpus=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    vanilla = torch.topk(logits, k, dim=1).indices
    r = select(logits, k, SelectorConfig(policy="xshare", budget=budget, warmup_k=0))
    van_active = torch.zeros(e, dtype=torch.bool)
    van_active[vanilla.flatten()] = True
    valid = torch.ones(t, dtype=torch.bool)
    valid[-1] = False  # one padded row
    pl = Placement.contiguous(e, gpus)
    return logits, vanilla, r, van_active, valid, pl


def test_call_figures_match_their_definitions():
    logits, vanilla, r, van_active, valid, pl = _case()
    row = call_figures(3, logits, vanilla, r.topk_ids, r.active, van_active, valid, pl.primary_gpu, pl.num_gpus)
    assert row.shape == (len(WINDOW_FIELDS) + 2 * 4,)
    assert row[F["layer"]] == 3 and row[F["active"]] == r.active.sum() and row[F["vanilla_active"]] == van_active.sum()
    per_gpu = [int(r.active[i * 4:(i + 1) * 4].sum()) for i in range(4)]
    assert row[len(WINDOW_FIELDS):len(WINDOW_FIELDS) + 4].tolist() == per_gpu
    assert row[F["peak_gpu"]] == max(per_gpu)
    assert row[F["peak_mean_ratio"]] == pytest.approx(max(per_gpu) / (sum(per_gpu) / 4))
    p = torch.softmax(logits, 1)
    kept = [(p[i, r.topk_ids[i]].sum() / p[i, vanilla[i]].sum()).item() for i in range(5)]
    assert row[F["mass_kept"]].item() == pytest.approx(sum(kept) / 5, rel=1e-5)
    top1 = [int(logits[i].argmax()) in r.topk_ids[i].tolist() for i in range(5)]
    assert row[F["top1_kept"]].item() == pytest.approx(sum(top1) / 5)
    tokens = [sum(any(int(x) // 4 == gpu for x in r.topk_ids[i]) for i in range(5)) for gpu in range(4)]
    assert row[len(WINDOW_FIELDS) + 4:].tolist() == tokens
    assert row[F["tokens"]] == 5


def test_vanilla_routing_keeps_all_mass():
    logits, vanilla, _, van_active, valid, pl = _case()
    row = call_figures(0, logits, vanilla, vanilla, van_active, van_active, valid, pl.primary_gpu, 4)
    assert row[F["mass_kept"]].item() == pytest.approx(1.0) and row[F["top1_kept"]].item() == 1.0
    assert row[F["active"]] == row[F["vanilla_active"]] and row[F["peak_gpu"]] == row[F["vanilla_peak_gpu"]]


def test_ring_buffer_drains_in_order_and_counts_overflow():
    st = SelectorStats()
    assert st.drain_window().shape[0] == 0
    for i in range(5):
        st.record_figures(torch.full((len(WINDOW_FIELDS) + 2,), float(i)))
    rows = st.drain_window()
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4] and st.drain_window().shape[0] == 0
    n = WINDOW_CAPACITY + 7
    for i in range(n):
        st.record_figures(torch.full((len(WINDOW_FIELDS) + 2,), float(i)))
    rows = st.drain_window()
    assert rows.shape[0] == WINDOW_CAPACITY and st.window_dropped == 7
    assert rows[0, 0] == 7 and rows[-1, 0] == n - 1


@pytest.mark.parametrize("update, field", [
    ({"budget": 17}, "budget"), ({"budget": 3}, "budget"), ({"budget": 0.1}, "budget"), ({"policy": "nope"}, "policy"),
    ({"warmup_k": -1}, "warmup_k"), ({"gpu_cap": 0}, "gpu_cap"), ({"enabled": None}, "enabled"),
])
def test_build_config_names_the_field(update, field):
    cur = {**{k: v for k, v in SelectorConfig(budget=8).to_dict().items() if k in admin.CONFIG_FIELDS},
           "enabled": True}
    with pytest.raises(admin.ConfigInvalid) as exc:
        admin.build_config(cur, update, replace_all=False, model=ModelShape(num_experts=16, top_k=4))
    assert exc.value.field == field


def test_build_config_patch_and_put():
    cur = {**{k: v for k, v in SelectorConfig(budget=8, warmup_k=2).to_dict().items() if k in admin.CONFIG_FIELDS},
           "enabled": True}
    new = admin.build_config(cur, {"budget": 4}, replace_all=False, model=ModelShape(num_experts=16, top_k=4))
    assert new["budget"] == 4 and new["warmup_k"] == 2 and new["enabled"] is True
    put = admin.build_config(cur, {"budget": 0.5}, replace_all=True, model=ModelShape(num_experts=16, top_k=4))
    assert put["budget"] == 0.5 and put["warmup_k"] == SelectorConfig().warmup_k
    assert cur["budget"] == 8  # the input is not modified


def test_exporter_writes_the_contract_into_a_multiprocess_dir(tmp_path):
    code = r"""
import json, sys, torch
from xshare.sglang import state as runtime
from xshare.sglang.observe import metrics
from xshare.sglang.settings import load_settings
from xshare.sglang.observe.stats import WINDOW_FIELDS
rt = runtime.install(load_settings({"XSHARE_ENABLE": "1", "XSHARE_BUDGET": "4", "XSHARE_METRICS_DETAIL": "layer"}),
                     rank=1)
rt.num_experts_hint = 16
rt.enable_observability(metrics.create(1))
row = torch.zeros(len(WINDOW_FIELDS) + 4); row[1] = 4; row[2] = 9; row[3] = 3; row[5] = 1.5; row[6] = 0.9
rt.stats.record_figures(row); rt.stats.calls = 5; rt.stats.fallbacks["ValueError"] = 2
rt.stats.note_layer(0, "selects"); rt.stats.note_layer(1, "unsupported_custom_routing_function")
rt.stats.note_layer(2, "unsupported_custom_routing_function")
rt.stats.record_forward_time("decode", 0.25); rt.stats.record_moe_time("decode", 0.125)
rt.flush_metrics()
rt.stats.record_forward_time("decode", 0.25); rt.stats.record_moe_time("decode", 0.125)
rt.flush_metrics()  # counters carry the difference since the last flush
rt.set_config(load_settings({"XSHARE_ENABLE": "1", "XSHARE_POLICY": "xshare_ep", "XSHARE_BUDGET": "6"}), 7)
# the same rank at the default detail (group): rank 1 exports no distributions; its layers are aggregated
grp = runtime.ProcessState(load_settings({"XSHARE_ENABLE": "1"}), rank=2)
grp.num_experts_hint = 16
grp.enable_observability(metrics.create(2))
grp.stats.record_figures(row); row2 = row.clone(); row2[0] = 1; row2[len(WINDOW_FIELDS)] = 2
grp.stats.record_figures(row2)
grp.flush_metrics()
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
reg = CollectorRegistry(); multiprocess.MultiProcessCollector(reg)
print(generate_latest(reg).decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert 'xshare:active_experts_sum{layer="0",rank="1"} 4.0' in text
    assert 'xshare:vanilla_active_experts_sum{layer="0",rank="1"} 9.0' in text
    assert 'xshare:gpu_active_experts{gpu="1",layer="0",rank="1"} 0.0' in text
    assert 'xshare:selector_calls_total{rank="1"} 5.0' in text
    assert 'xshare:fallbacks_total{rank="1",reason="ValueError"} 2.0' in text
    # the version is a value; config_info has one series per policy used
    assert 'xshare:config_info{policy="xshare",rank="1"} 0.0' in text
    assert 'xshare:config_info{policy="xshare_ep",rank="1"} 1.0' in text
    assert 'xshare:config_version{rank="1"} 7.0' in text and "version=" not in text
    assert 'xshare:layers{rank="1",reason="",state="selects"} 1.0' in text
    assert 'xshare:layers{rank="1",reason="unsupported_custom_routing_function",state="skipped"} 2.0' in text
    assert 'rank="2"' in text and not any(line.startswith(("xshare:active_experts", "xshare:mass_kept"))
                                          and 'rank="2"' in line for line in text.splitlines())
    assert 'xshare:gpu_active_experts{gpu="0",layer="all",rank="2"} 1.0' in text  # mean of 0 and 2 over layers
    assert 'xshare:budget{rank="1"} 6.0' in text and 'xshare:enabled{rank="1"} 1.0' in text
    assert 'xshare:forward_seconds_total{mode="decode",rank="1"} 0.5' in text
    assert 'xshare:moe_seconds_total{mode="decode",rank="1"} 0.25' in text
    assert 'xshare:forwards_total{mode="decode",rank="1"} 2.0' in text


def test_coverage_counts_states_and_caps_reasons():
    """xshare:layers' values from the runtime's coverage report (xshare.sglang.observe.coverage's statuses): selects /
    ready / skipped and bypassed with their reason, capped."""
    from types import SimpleNamespace

    from xshare.sglang.observe import metrics

    st = SelectorStats()
    rt = SimpleNamespace(stats=st)
    ex = metrics.Exporter(0, prometheus=False)
    assert ex.coverage_counts(rt) == {}
    for i in range(4):  # the start-up survey: two ready, one draft layer, one bypassed by the runner backend
        st.coverage[i] = ["ready", "ready", "draft_layer", "bypassed_flashinfer_trtllm"][i]
    assert ex.coverage_counts(rt) == {("ready", ""): 2, ("skipped", "draft_layer"): 1,
                                      ("bypassed", "bypassed_flashinfer_trtllm"): 1}
    st.note_layer(0, "selects")
    for i in range(4, 4 + metrics.MAX_COVERAGE_REASONS + 2):
        st.note_layer(i, f"unsupported_reason_{i}")
    counts = ex.coverage_counts(rt)
    assert counts[("selects", "")] == 1 and counts[("ready", "")] == 1
    assert counts[("skipped", "other")] == 4  # 2 + 10 distinct reasons: 8 labelled, the rest 'other'
    assert len([k for k in counts if k[0] in ("skipped", "bypassed")]) == metrics.MAX_COVERAGE_REASONS + 1
    assert sum(counts.values()) == len(st.coverage)
