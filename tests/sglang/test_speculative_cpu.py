"""Speculative decoding on the CPU test bed, without a server: the ``sgl_kernel`` stand-ins of NGRAM against
SGLang's own kernels, the verify attention of the torch-native backend, the verify layout -> request map,
the speculative check of ``xshare serve`` and the per-forward-mode stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import require_module

ROOT = Path(__file__).resolve().parents[2]


# -- the stand-ins against SGLang's own kernels (Triton's interpreter, in a subprocess) -----------------------------
@pytest.fixture(scope="module")
def op_checks():
    require_module("triton", "requirements/dev.txt", load=False)
    require_module("sglang", "scripts/install_sglang_cpu.sh", load=False)
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    env["TRITON_INTERPRET"] = "1"
    script = ROOT / "tests" / "sglang" / "speculative_ops_check.py"
    r = subprocess.run([sys.executable, str(script), "3"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", ["reconstruct_indices_from_tree_mask", "verify_tree_greedy_cpu",
                                "assign_extend_cache_locs_cpu", "fill_accept_out_cache_loc_cpu"])
def test_stand_in_matches_sglangs_kernel(op_checks, op):
    res = op_checks[op]
    assert res["cases"] >= 3 and res["mismatches"] == [], res["mismatches"][:2]


def test_verify_cases_accept_drafts(op_checks):
    assert op_checks["verify_tree_greedy_cpu"]["accepted"] > 10  # the walk, not only the bonus token, is compared


# -- the verify attention of the torch-native backend --------------------------------------------------------------
def _reference_attention(q, keys, values, visible, scale):
    """Dense masked softmax, one query at a time: q [n, H, D], keys/values [L, Hk, D], visible bool [n, L]."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    rep = heads // kv_heads
    out = torch.zeros(q.shape[0], heads, values.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        for h in range(heads):
            k, v = keys[:, h // rep].double(), values[:, h // rep].double()
            logits = (k @ q[i, h].double()) * scale
            logits[~visible[i]] = float("-inf")
            out[i, h] = torch.softmax(logits, 0) @ v
    return out


def test_tree_verify_attention_sees_the_prefix_and_the_ancestors():
    from xshare_cpu_fixes import tree_verify_attention

    g = torch.Generator().manual_seed(0)
    n, heads, kv_heads, d = 4, 4, 2, 8
    seq_lens = torch.tensor([3, 6])
    pool = torch.randperm(40, generator=g)
    req_to_token = torch.zeros(3, 16, dtype=torch.int64)
    req_to_token[2, :10] = pool[:10]  # request 0 (pool row 2): 3 committed + 4 drafts (+ spare)
    req_to_token[0, :10] = pool[10:20]  # request 1 (pool row 0): 6 committed + 4 drafts
    k_cache = torch.randn(40, kv_heads, d, generator=g)
    v_cache = torch.randn(40, kv_heads, d, generator=g)
    q = torch.randn(2 * n, heads, d, generator=g)
    chain = torch.tril(torch.ones(n, n, dtype=torch.bool))
    branch = torch.eye(n, dtype=torch.bool)
    branch[1:, 0] = True  # nodes 1..3 are children of node 0
    branch[3, 2] = True  # node 3 is a child of node 2
    tree = torch.stack([chain, branch])
    got = tree_verify_attention(q, k_cache, v_cache, req_to_token, torch.tensor([2, 0]), seq_lens, tree.flatten(), n,
                                scaling=d**-0.5, enable_gqa=True)
    for b, row in enumerate([2, 0]):
        length = int(seq_lens[b])
        tokens = req_to_token[row, :length + n]
        visible = torch.cat([torch.ones(n, length, dtype=torch.bool), tree[b]], 1)
        ref = _reference_attention(q[b * n:(b + 1) * n], k_cache[tokens], v_cache[tokens], visible, d**-0.5)
        torch.testing.assert_close(got[b * n:(b + 1) * n].double(), ref, atol=1e-5, rtol=1e-5)
    # a chain of drafts is ordinary causal attention over prefix + drafts
    tokens = req_to_token[2, :3 + n]
    causal = torch.nn.functional.scaled_dot_product_attention(
        q[:n].movedim(0, 1)[None], k_cache[tokens].movedim(0, 1)[None], v_cache[tokens].movedim(0, 1)[None],
        attn_mask=torch.tril(torch.ones(3 + n, 3 + n, dtype=torch.bool))[3:], enable_gqa=True)
    torch.testing.assert_close(got[:n], causal[0].movedim(0, 1), atol=1e-5, rtol=1e-5)


def test_the_backend_gets_the_verify_path_on_import():
    code = ("import sglang.srt.layers.attention.torch_native_backend as m; "
            "print(getattr(m.TorchNativeAttnBackend.forward_extend, 'xshare_target_verify', False))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True"


# -- rows -> requests of a verify forward ---------------------------------------------------------------------------
def _batch(bs, layout=None):
    return SimpleNamespace(batch_size=bs, spec_info=SimpleNamespace(ragged_verify_layout=layout))


def test_static_layout_maps_consecutive_rows():
    from xshare.sglang.verify_layout import verify_rows

    rows = verify_rows(_batch(3), 4)
    assert rows.reason is None and rows.counts is None and rows.per_request == 4


def test_ragged_layout_maps_each_requests_rows():
    from xshare.sglang.verify_layout import request_index, verify_rows

    rows = verify_rows(_batch(3, SimpleNamespace(verify_lens_cpu=[2, 1, 3])), 4)
    assert rows.reason is None and rows.counts == (2, 1, 3)
    assert request_index(rows.counts, torch.device("cpu")).tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("layout, reason", [
    (SimpleNamespace(verify_lens_cpu=None), "verify_layout_ragged_device_only"),
    (SimpleNamespace(verify_lens_cpu=[2, 2]), "verify_layout_ragged_misfit"),  # 2 counts for 3 requests
    (SimpleNamespace(verify_lens_cpu=[2, 0, 1]), "verify_layout_ragged_misfit"),
])
def test_unmappable_layouts_name_their_reason(layout, reason):
    from xshare.sglang.verify_layout import verify_rows

    assert verify_rows(_batch(3, layout), 4).reason == reason


# -- xshare serve / cpu_check: which speculative algorithms the stand-ins run ---------------------------------------
def test_ngram_runs_and_draft_model_algorithms_name_their_missing_ops():
    require_module("sglang", "scripts/install_sglang_cpu.sh", load=False)
    from xshare.sglang.cpu_check import missing_speculative_ops, speculative_problem

    assert missing_speculative_ops("ngram") == [] and speculative_problem("NGRAM") is None
    missing = missing_speculative_ops("NEXTN")  # SGLang's MTP alias of EAGLE
    assert "sgl_kernel.build_tree_kernel_efficient_cpu" in missing
    assert "sgl_kernel.verify_tree_greedy_cpu" not in missing
    assert "build_tree_kernel_efficient_cpu" in speculative_problem("EAGLE3")
    assert "not known to run on the CPU test bed (it runs: NGRAM)" in speculative_problem("DFLASH")


def test_cpu_check_finds_the_import_behind_a_negated_device_test(tmp_path):
    from xshare.sglang.cpu_check import find_cpu_kernel_imports

    fake = tmp_path / "sglang"
    fake.mkdir()
    (fake / "tree.py").write_text("if is_cuda() or is_hip():\n    from sglang.tree import op\n"
                                  "elif not _is_xpu:\n    from sgl_kernel.speculative import op\n"
                                  "if not _is_cpu:\n    from sgl_kernel import gpu_op\n")
    found = {(i.symbol, i.where) for i in find_cpu_kernel_imports(fake)}
    assert found == {("sgl_kernel.speculative.op", "tree.py:4")}


def test_serve_refuses_a_speculative_mode_the_stand_ins_cannot_run():
    require_module("sglang", "scripts/install_sglang_cpu.sh", load=False)
    argv = ["-m", "xshare.cli", "serve", "--xshare-print-command", "--model-path", "m", "--device", "cpu",
            "--speculative-algorithm"]
    r = subprocess.run([sys.executable, *argv, "EAGLE"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sgl_kernel.build_tree_kernel_efficient_cpu" in r.stderr
    assert "sglang.launch_server" not in r.stdout
    r = subprocess.run([sys.executable, *argv, "NGRAM"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--speculative-algorithm NGRAM" in r.stdout, r.stderr


# -- per-forward-mode stats -----------------------------------------------------------------------------------------
def test_stats_are_kept_per_forward_mode():
    from xshare.sglang.observe.stats import SelectorStats

    st = SelectorStats()
    st.mode = "decode"
    st.count_call()
    st.record_call_host(0, active=3, vanilla_active=5, num_tokens=2)
    st.mode = "target_verify"
    for active in (4, 6):
        st.count_call()
        st.record_call_host(0, active=active, vanilla_active=9, num_tokens=8)
    st.count_call()
    st.count_skip("verify_rows_mismatch")
    snap = st.snapshot()
    assert snap["layers"]["0"]["calls"] == 3 and snap["layers"]["0"]["activated"] == 13  # all modes together
    verify, decode = snap["modes"]["target_verify"], snap["modes"]["decode"]
    assert (verify["calls"], verify["applied"], verify["mean_activated"], verify["mean_vanilla_activated"]) == \
        (3, 2, 5.0, 9.0)
    assert verify["skipped"] == {"verify_rows_mismatch": 1} and decode["skipped"] == {}
    assert (decode["calls"], decode["applied"], decode["activated"]) == (1, 1, 3)


def test_experts_per_request_are_counted_per_request():
    from xshare.sglang.observe.stats import SelectorStats

    st = SelectorStats()
    st.mode = "target_verify"
    groups = torch.tensor([0, 0, 1, 1])
    ids = torch.tensor([[0, 1], [1, 2], [5, 6], [5, 6]])  # request 0 uses {0, 1, 2}, request 1 {5, 6}
    st.record_requests(groups, ids, 8, limit=2)
    st.record_requests(torch.tensor([0, 0]), torch.tensor([[3, 4], [4, 3]]), 8, limit=2)  # one request, {3, 4}
    req = st.mode_report()["target_verify"]["requests"]
    assert req == {"request_calls": 3, "mean_experts": 7 / 3, "max_experts": 3, "over_group_budget": 1}
    st.mode = "decode"
    st.record_requests(groups, ids, 8, limit=None)  # a policy without a per-request budget (des_seq)
    assert "over_group_budget" not in st.mode_report()["decode"]["requests"]


# -- a verify call whose rows cannot be mapped keeps SGLang's routing, counted by reason -----------------------------
def _verify_route(state, policy="xshare_spec", rows=8):
    from xshare.selection import SelectorConfig
    from xshare.sglang import layer
    from xshare.sglang import state as rt
    from xshare.sglang.settings import PluginSettings

    runtime = rt.ProcessState(PluginSettings(enabled=True,
                                             selector=SelectorConfig(policy=policy, budget=4, warmup_k=0)))
    runtime.push(state)
    logits = torch.randn(rows, 16, generator=torch.Generator().manual_seed(1))
    w, ids = torch.topk(torch.softmax(logits, -1), 4, dim=-1)
    args = {"topk_ids": ids, "topk_weights": w / w.sum(-1, keepdim=True), "router_logits": logits, "layer_id": 1,
            "num_token_non_padded": None, "expert_location_dispatch_info": None}
    cfg = SimpleNamespace(top_k=4, num_shared_topk_slots=0, allow_routed_experts_capture=True, scoring_func="softmax",
                          renormalize=True, custom_routing_function=None, correction_bias=None, use_grouped_topk=False,
                          num_expert_group=None, topk_group=None, routed_scaling_factor=None,
                          apply_routed_scaling_factor_on_output=False, fused_shared_experts_scaling_factor=None)
    out = layer.route(runtime, args, topk_config=cfg)
    return out, runtime.stats.snapshot()["modes"]["target_verify"]


@pytest.mark.parametrize("groups, unmapped, reason", [
    (torch.arange(6) // 2, None, "verify_rows_mismatch"),  # 6 mapped rows for a call of 8
    (None, None, "verify_rows_unknown"),
    (None, "verify_layout_ragged_device_only", "verify_layout_ragged_device_only"),
])
def test_unmappable_verify_rows_keep_sglangs_routing(groups, unmapped, reason):
    from xshare.sglang.state import ForwardState

    state = ForwardState(mode="target_verify", tokens_per_req=2, groups=groups, unmapped=unmapped)
    out, verify = _verify_route(state)
    assert out is None and verify["skipped"] == {reason: 1} and verify["applied"] == 0


def test_mapped_verify_rows_are_routed_and_ungrouped_policies_ignore_the_layout():
    from xshare.sglang.state import ForwardState

    out, verify = _verify_route(ForwardState(mode="target_verify", tokens_per_req=2, groups=torch.arange(8) // 2))
    assert out is not None and verify["applied"] == 1 and verify["requests"]["request_calls"] == 4
    state = ForwardState(mode="target_verify", tokens_per_req=2, unmapped="verify_layout_ragged_device_only")
    out, verify = _verify_route(state, policy="xshare")
    assert out is not None and verify["applied"] == 1 and verify["skipped"] == {}


def test_tree_verify_attention_refuses_a_layout_it_does_not_know():
    from xshare_cpu_fixes import tree_verify_attention

    q, cache, pool = torch.zeros(8, 2, 4), torch.zeros(20, 2, 4), torch.zeros(2, 16, dtype=torch.int64)
    args = (torch.tensor([0, 1]), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="2 requests x 4 draft rows"):  # 6 rows for 2 requests of 4 drafts
        tree_verify_attention(q[:6], cache, cache, pool, *args, torch.ones(32, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="24 mask entries"):  # a mask too short for 2 trees of 4 x 4
        tree_verify_attention(q, cache, cache, pool, *args, torch.ones(24, dtype=torch.bool), 4)
    assert tree_verify_attention(q, cache, cache, pool, *args, torch.ones(32, dtype=torch.bool), 4).shape == (8, 2, 4)
