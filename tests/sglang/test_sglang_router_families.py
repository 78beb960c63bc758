"""The serving adapter on every router family SGLang 0.5.23 implements, against SGLang's own routing.

SGLang's real ``select_experts`` (the CPU path) routes random router logits for a real ``TopKConfig``;
the adapter (``xshare.sglang.layer.route``, what the routing hook calls) then rewrites that call's output. With a
budget >= E its output is SGLang's bit for bit (ids, column order, weights, shared slot); with a
budget m < E every changed row routes inside the set the policy chose, the group limit holds, the
weights are SGLang's rule on the new ids, no unreachable expert is routed, and the batch activates at
most max(m, |warm-up|) experts (plus those of rows counted as short, which keep SGLang's routing).
"""

import pytest
import torch

from conftest import require_module
from xshare.selection import SelectorConfig
from xshare.selection.routers.gate import router_scores
from xshare.selection.routers.spec import RouterSpec
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.configs.shared_experts import SharedExpertsConfig  # noqa: E402
from sglang.srt.models.llama4 import Llama4MoE  # noqa: E402

T = 24


def _cfg(family: str):  # noqa: ANN202
    """(TopKConfig, E, routed top_k) of one router family."""
    g = torch.Generator().manual_seed(sum(map(ord, family)))  # stable across processes
    if family == "deepseek_v3":  # sigmoid + bias, 8 groups keep 4, routed scaling, fused shared slot
        e, k = 64, 6
        return topk.TopKConfig(top_k=k + 1, use_grouped_topk=True, num_expert_group=8, topk_group=4,
                               renormalize=True, torch_native=True, correction_bias=torch.randn(e, generator=g) * 0.1,
                               routed_scaling_factor=2.5,
                               shared_experts=SharedExpertsConfig(num_fused_shared_experts=1),
                               fused_shared_experts_scaling_factor=1.0), e, k
    if family == "deepseek_v3_scaled":  # the factor inside the weights, no shared slot
        e, k = 32, 4
        return topk.TopKConfig(top_k=k, use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=True,
                               torch_native=True, correction_bias=torch.randn(e, generator=g) * 0.1,
                               routed_scaling_factor=2.5, apply_routed_scaling_factor_on_output=True), e, k
    if family == "glm45":  # one group, bias (GLM-4.5 / Kimi-K2 code path)
        e, k = 32, 4
        return topk.TopKConfig(top_k=k, use_grouped_topk=True, num_expert_group=1, topk_group=1, renormalize=True,
                               torch_native=True, correction_bias=torch.randn(e, generator=g) * 0.1,
                               routed_scaling_factor=2.5), e, k
    if family == "deepseek_v2":  # softmax, groups, no bias
        e, k = 64, 6
        return topk.TopKConfig(top_k=k, use_grouped_topk=True, num_expert_group=8, topk_group=3, renormalize=False,
                               torch_native=True, routed_scaling_factor=16.0), e, k
    if family == "minimax_m2":  # sigmoid + bias, no groups
        e, k = 32, 4
        return topk.TopKConfig(top_k=k, renormalize=True, torch_native=True, scoring_func="sigmoid",
                               correction_bias=torch.randn(e, generator=g) * 0.1), e, k
    if family == "sqrtsoftplus":
        e, k = 32, 4
        return topk.TopKConfig(top_k=k, renormalize=True, torch_native=True, scoring_func="sqrtsoftplus"), e, k
    if family == "llama4":  # custom function: top-1, sigmoid weight
        e, k = 16, 1
        return topk.TopKConfig(top_k=k, renormalize=False, torch_native=True,
                               custom_routing_function=Llama4MoE.custom_routing_function), e, k
    raise AssertionError(family)


FAMILIES = ["deepseek_v3", "deepseek_v3_scaled", "glm45", "deepseek_v2", "minimax_m2", "sqrtsoftplus", "llama4"]
DTYPES = [torch.float32, torch.bfloat16]


def _logits(e: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, e, generator=g) * 2
    x[:4] = torch.round(x[:4] * 2) / 2  # exact ties in a few rows
    return x.to(dtype)


def _sglang(cfg, x):  # noqa: ANN001, ANN202
    out = topk.select_experts(torch.zeros(x.shape[0], 8, dtype=x.dtype), x, cfg)
    return out.topk_ids, out.topk_weights


def _route(cfg, x, ids, w, selector):  # noqa: ANN001, ANN202
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=selector))
    runtime.push(rt.ForwardState(mode="decode"))
    args = {"topk_ids": ids.clone(), "topk_weights": w.clone(), "router_logits": x, "layer_id": 0,
            "num_token_non_padded": None}
    out = layer.route(runtime, args, topk_config=cfg)
    return out, runtime.stats.snapshot()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_at_least_e_is_sglangs_routing_bit_for_bit(family, dtype):
    cfg, e, k = _cfg(family)
    x = _logits(e, dtype)
    ids, w = _sglang(cfg, x)
    out, snap = _route(cfg, x, ids, w, SelectorConfig(policy="xshare", budget=e, warmup_k=1))
    assert snap["skipped"] == {} and snap["fallbacks_total"] == 0, snap  # selected, not skipped
    assert out is not None and snap["applied"] == 1
    assert torch.equal(out["topk_ids"], ids) and torch.equal(out["topk_weights"], w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_below_e_routes_inside_the_set_as_the_router_would(family, dtype):
    cfg, e, k = _cfg(family)
    x = _logits(e, dtype, seed=1)
    ids, w = _sglang(cfg, x)
    m = max(k, e // 4)
    out, snap = _route(cfg, x, ids, w, SelectorConfig(policy="xshare", budget=m, warmup_k=1))
    assert out is not None and snap["fallbacks_total"] == 0, snap
    spec = RouterSpec.from_topk_config(cfg, weight_dtype=x.dtype)
    gs = router_scores(x, spec)
    new_ids, new_w = out["topk_ids"][:, :k].long(), out["topk_weights"][:, :k].float()
    # the shared slot (if any) is SGLang's
    assert torch.equal(out["topk_ids"][:, k:], ids[:, k:]) and torch.equal(out["topk_weights"][:, k:], w[:, k:])
    changed = (new_ids != ids[:, :k].long()).any(1) | (new_w != w[:, :k].float()).any(1)
    # warm-up: each token's own top-1 as the router ranks it (choice score among reachable experts)
    choice = torch.where(gs.reachable, gs.choice, torch.full_like(gs.choice, float("-inf")))
    warm = torch.zeros(e, dtype=torch.bool)
    warm[choice.argmax(1)] = True
    active = torch.zeros(e, dtype=torch.bool)
    active[new_ids.flatten()] = True
    if snap["short_rows"] == 0:
        assert int(active.sum()) <= max(m, int(warm.sum())), (int(active.sum()), m, int(warm.sum()))
    if k > 1 and e > 2 * m:
        assert changed.any(), "the budget changed no row"
    for t in range(T):
        row = new_ids[t]
        assert len(set(row.tolist())) == k and int(row.min()) >= 0 and int(row.max()) < e
        assert bool(gs.reachable[t, row].all()), "routed an expert outside the token's groups"
        if spec.num_expert_group:
            groups = {int(i) // (e // spec.num_expert_group) for i in row}
            assert len(groups) <= spec.topk_group
        if not changed[t]:
            continue
        aff = gs.affinity[t, row]  # the weights: SGLang's rule on the new ids
        expect = aff / aff.sum() if spec.renormalize else aff
        if spec.scaling_in_weights:
            expect = expect * spec.routed_scaling_factor
        torch.testing.assert_close(new_w[t], expect.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
    set_changed = (torch.sort(new_ids, 1).values != torch.sort(ids[:, :k].long(), 1).values).any(1)
    assert snap["layers"]["0"]["changed_tokens"] == int(set_changed.sum())


def test_an_unknown_custom_routing_function_is_left_to_sglang_and_counted():
    cfg = topk.TopKConfig(top_k=2, renormalize=True, torch_native=True,
                          custom_routing_function=lambda **kw: None)
    x = _logits(16, torch.float32)
    w, ids = torch.topk(torch.softmax(x, -1), 2, dim=-1)
    out, snap = _route(cfg, x, ids, w, SelectorConfig(policy="xshare", budget=4))
    assert out is None and snap["skipped"] == {"unsupported_custom_routing_function": 1}


@pytest.mark.parametrize("family", ["deepseek_v3", "glm45", "deepseek_v2"])
def test_router_layers_route_under_cuda_graph_capture_without_host_reads(family, monkeypatch):
    """Inside CUDA-graph capture the routing of a biased / grouped layer reads its numbers from the
    device knobs and never reads a tensor's value on the host; it equals the eager forward's."""
    cfg, e, k = _cfg(family)
    x = _logits(e, torch.float32, seed=4)
    ids, w = _sglang(cfg, x)
    settings = PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=e // 4, warmup_k=1))

    def route(capturing: bool):
        runtime = rt.ProcessState(settings)
        runtime.push(rt.ForwardState(mode="decode", capturing=capturing))
        args = {"topk_ids": ids.clone(), "topk_weights": w.clone(), "router_logits": x, "layer_id": 0,
                "num_token_non_padded": torch.tensor(T - 2)}
        return runtime, layer.route(runtime, args, topk_config=cfg)

    eager_rt, eager = route(False)
    reads: list[str] = []

    def forbidden(name):
        def read(self, *a, **kw):
            reads.append(name)
            raise AssertionError(f"Tensor.{name}() under capture")
        return read

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"):
            m.setattr(torch.Tensor, name, forbidden(name))
        captured_rt, captured = route(True)
    assert reads == []
    snap = captured_rt.stats.snapshot()
    assert captured is not None and snap["applied"] == 1 and snap["fallbacks_total"] == 0, snap
    assert torch.equal(captured["topk_ids"], eager["topk_ids"])
    assert torch.equal(captured["topk_weights"], eager["topk_weights"])
    assert not torch.equal(captured["topk_ids"][:, :k], ids[:, :k])  # the budget changed the routing
    assert snap["layers"]["0"]["activated"] == eager_rt.stats.snapshot()["layers"]["0"]["activated"]


@pytest.mark.parametrize("policy", ["xshare", "lynx", "des_vote", "oea", "xshare_ep", "des_seq", "xshare_spec"])
def test_every_policy_works_on_a_grouped_biased_router(policy):
    cfg, e, k = _cfg("deepseek_v3")
    x = _logits(e, torch.float32, seed=2)
    ids, w = _sglang(cfg, x)
    settings = PluginSettings(enabled=True, sim_gpus=4, selector=SelectorConfig(policy=policy, budget=16,
                                                                                warmup_k=1))
    runtime = rt.ProcessState(settings)
    runtime.push(rt.ForwardState(mode="decode", tokens_per_req=2))
    args = {"topk_ids": ids.clone(), "topk_weights": w.clone(), "router_logits": x, "layer_id": 0,
            "num_token_non_padded": None}
    out = layer.route(runtime, args, topk_config=cfg)
    snap = runtime.stats.snapshot()
    assert out is not None and snap["fallbacks_total"] == 0 and snap["applied"] == 1, snap
    gs = router_scores(x, RouterSpec.from_topk_config(cfg))
    routed = out["topk_ids"][:, :k].long()
    assert bool(torch.gather(gs.reachable, 1, routed).all())
    assert snap["layers"]["0"]["activated"] <= snap["layers"]["0"]["vanilla_activated"]


def test_which_path_routes_each_family():
    """The backend each family takes (Decision.backend, the reason where the reference routes instead):
    on CPU tensors the C kernel when it is built (plain and router-spec layers), the fused Triton
    kernel when forced (interpreted here; what 'auto' picks on CUDA), the torch reference when forced
    or when the call is one the wanted backend does not implement (a policy without a kernel)."""
    from xshare.selection.backends.c.kernel import cpu_kernel_available
    from xshare.selection.backends.triton.route import kernel_supports
    from xshare.selection.decide import LayerCall, LayerRouting, decide

    config = SelectorConfig(policy="xshare", budget=8, warmup_k=1)
    x = _logits(32, torch.float32)
    c_or_torch = "c" if cpu_kernel_available() else "torch"
    plain = decide(LayerCall(x, 4, LayerRouting("softmax", True)), config, cpu_kernel=cpu_kernel_available())
    assert plain.replaced is None and plain.backend == c_or_torch and (plain.cpu is not None) == cpu_kernel_available()
    for family in FAMILIES:
        cfg, e, k = _cfg(family)
        spec = RouterSpec.from_topk_config(cfg, weight_dtype=torch.float32)
        logits = _logits(e, torch.float32)
        ids, _ = _sglang(cfg, logits)
        call = LayerCall(logits, k, spec, engine_ids=ids[:, :k])
        d = decide(call, config, cpu_kernel=cpu_kernel_available())
        assert d.replaced is not None and d.backend == c_or_torch, family
        forced = decide(call, config.replace(backend="triton"))
        assert forced.backend == "triton" and forced.reason is None, family
        assert torch.equal(forced.routing.topk_ids, d.routing.topk_ids), family
        ref = decide(call, config.replace(backend="torch"))
        assert ref.backend == "torch" and ref.reason is None and torch.equal(ref.routing.topk_ids, d.routing.topk_ids)
        lynx = decide(call, config.replace(policy="lynx", backend="triton"))
        assert lynx.backend == "torch" and lynx.reason == "policy_lynx", family
    assert kernel_supports(config, 32) and not kernel_supports(config.replace(policy="lynx"), 32)


@pytest.mark.parametrize("policy,expected", [("xshare", "triton"), ("lynx", "torch (policy_lynx)")])
def test_stats_say_which_backend_routed_each_layer(policy, expected):
    """/xshare/stats 'backends': per layer what routed its applied calls, and why the torch reference did
    where the fused kernel was wanted; 'backend_calls' counts them."""
    from xshare.selection.decide import planned_backend

    cfg, e, k = _cfg("deepseek_v3")
    x = _logits(e, torch.float32, seed=5)
    ids, w = _sglang(cfg, x)
    selector = SelectorConfig(policy=policy, budget=e // 4, warmup_k=1, backend="triton")
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=selector))
    runtime.push(rt.ForwardState(mode="decode"))
    for layer_id in (3, 7):
        out = layer.route(runtime, {"topk_ids": ids.clone(), "topk_weights": w.clone(), "router_logits": x,
                             "layer_id": layer_id}, topk_config=cfg)
        assert out is not None
    snap = runtime.stats.snapshot()
    assert snap["backends"] == {"3": expected, "7": expected}
    assert snap["backend_calls"] == {expected: 2}
    assert planned_backend(selector, "cuda") == expected
    assert planned_backend(selector.replace(backend="auto"), "cpu", cpu_kernel=False) == "torch (c_unavailable)"
