"""SGLang's ``triton_kernel`` MoE runner (GPT-OSS MXFP4 on Hopper) routes with
``sglang.srt.layers.moe.topk.routing(logits, n_expts_act, sm_first, expt_indx, simulated_ep, n_rows)``
and never calls ``select_experts``. The plugin hooks that function and hands the selector's experts
in as ``expt_indx``. The ``triton_kernels`` package needs a GPU, so its routing is stood in for by
:func:`reference_routing`, a torch function with the same arguments and the semantics of
triton_kernels' top-k (the experts given in ``expt_indx``, or its own top-k; softmax over those
logits unless ``sm_first``): what is tested is the hook's logic on SGLang's real TopKConfig."""

from types import SimpleNamespace

import pytest
import torch

from conftest import require_module
from xshare.selection import SelectorConfig
from xshare.sglang import state as rt
from xshare.sglang.hooks import routing as routing_hooks
from xshare.sglang.observe import coverage
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")

T, E, K = 24, 32, 4


def runner_topk(x, k):
    """triton_kernels' own top-k by its definition (``streaming_topk``: values keyed with the expert id so
    that an exact tie goes to the lower id, the row then listed by expert id), written as a loop."""
    rows = []
    for row in x.tolist():
        best = sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]
        rows.append(sorted(best))
    return torch.tensor(rows, dtype=torch.int64)


def reference_routing(logits, n_expts_act, sm_first=False, expt_indx=None, simulated_ep=1, n_rows=None):
    """(ids int64 [T, k], gate scales [T, k]) the way triton_kernels' routing picks and weighs them."""
    x = torch.softmax(logits, -1) if sm_first else logits
    if expt_indx is None:
        ids = runner_topk(x, n_expts_act)
    else:
        assert expt_indx.dtype == torch.int16 and expt_indx.shape == (logits.shape[0], n_expts_act)
        ids = expt_indx.long()
    vals = x.gather(1, ids)
    return ids, (vals if sm_first else torch.softmax(vals, -1))


def _runtime(budget):
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=budget,
                                                                              warmup_k=0)))
    runtime.push(rt.ForwardState(mode="decode"))
    runtime.current_topk = SimpleNamespace(layer_id=3, topk_config=topk.TopKConfig(top_k=K, renormalize=True))
    return runtime


@pytest.fixture()
def installed(monkeypatch):
    def install(runtime):
        monkeypatch.setattr(rt, "_RUNTIME", runtime, raising=False)
        monkeypatch.setattr(rt, "get", lambda: runtime)
    return install


def _logits(seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2


def test_budget_at_e_is_the_runners_own_routing(installed):
    installed(_runtime(E))
    x = _logits()
    ids, w = routing_hooks.triton_routing_hook(reference_routing, x, K, sm_first=False)
    own_ids, own_w = reference_routing(x, K)
    assert torch.equal(ids, own_ids) and torch.equal(w, own_w)


@pytest.mark.parametrize("budget", [E, 2 * E])
def test_tied_bf16_logits_keep_the_runners_own_experts_at_budget_e(installed, budget):
    """bf16 logits with many exact ties: at a budget >= E the hook hands the runner exactly the experts and
    order its own top-k picks (ties to the lower id), not torch.topk's tie order."""
    installed(_runtime(budget))
    x = (_logits(5) * 2).round().clamp(-3, 3).to(torch.bfloat16)  # 7 distinct values over 32 experts
    ids, w = routing_hooks.triton_routing_hook(reference_routing, x, K, sm_first=False)
    own_ids, own_w = reference_routing(x, K)
    assert torch.equal(ids, own_ids) and torch.equal(w, own_w)


def test_a_budget_routes_inside_the_set_with_the_layers_weights(installed):
    runtime = _runtime(8)
    installed(runtime)
    x = _logits(1)
    ids, w = routing_hooks.triton_routing_hook(reference_routing, x, K, sm_first=False)
    assert torch.unique(ids).numel() <= 8 < torch.unique(reference_routing(x, K)[0]).numel()
    assert all(len(set(r.tolist())) == K for r in ids)
    torch.testing.assert_close(w, torch.softmax(x.gather(1, ids), -1))  # renormalised over the new experts
    assert bool((ids[:, :-1] < ids[:, 1:]).all())  # listed by expert id, as the runner lists its own
    snap = runtime.stats.snapshot()
    assert snap["applied"] == 1 and snap["coverage"] == {"3": "selects"}, snap
    assert snap["layers"]["3"]["activated"] <= 8


def test_calls_outside_a_topk_forward_or_with_their_own_indices_pass_through(installed):
    runtime = _runtime(8)
    installed(runtime)
    x = _logits(2)
    given = torch.topk(x, K).indices.to(torch.int16)
    ids, _ = routing_hooks.triton_routing_hook(reference_routing, x, K, expt_indx=given)
    assert torch.equal(ids, given.long())
    runtime.current_topk = None
    ids, _ = routing_hooks.triton_routing_hook(reference_routing, x, K)
    assert torch.equal(ids, reference_routing(x, K)[0])
    assert runtime.stats.snapshot()["applied"] == 0


def test_a_routing_that_refuses_the_experts_falls_back_and_is_counted(installed):
    runtime = _runtime(8)
    installed(runtime)

    def picky(logits, n_expts_act, sm_first=False, expt_indx=None, simulated_ep=1, n_rows=None):
        if expt_indx is not None:
            raise RuntimeError("unsupported index layout")
        return reference_routing(logits, n_expts_act, sm_first, None, simulated_ep, n_rows)

    x = _logits(3)
    ids, _ = routing_hooks.triton_routing_hook(picky, x, K)
    assert torch.equal(ids, reference_routing(x, K)[0])
    assert runtime.stats.snapshot()["fallbacks"] == {"triton_kernel_routing": 1}


def test_the_topk_forward_hook_names_the_running_layer_only_while_it_runs(installed):
    runtime = _runtime(8)
    runtime.current_topk = None
    installed(runtime)
    layer = SimpleNamespace(layer_id=5)
    seen = routing_hooks.topk_forward_cuda_hook(lambda self, *a: runtime.current_topk, layer)
    assert seen is layer and runtime.current_topk is None


def test_coverage_counts_the_triton_kernel_runner_as_ready_where_the_hook_can_be_installed(monkeypatch):
    cfg = topk.TopKConfig(top_k=K, renormalize=True)
    cfg.output_format = topk.TopKOutputFormat.TRITON_KERNEL
    layer = SimpleNamespace(topk_config=cfg, is_draft=False)
    monkeypatch.setattr(coverage, "triton_routing_available", lambda: False)
    assert coverage.layer_status(layer, "cuda") == "bypassed_triton_kernel"
    monkeypatch.setattr(coverage, "triton_routing_available", lambda: True)
    assert coverage.layer_status(layer, "cuda") == "ready"
