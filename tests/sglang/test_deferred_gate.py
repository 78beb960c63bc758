"""SGLang's grouped gates skipped where the C served path computes them (xshare.sglang.deferred_gate).

SGLang's real ``select_experts`` (the CPU path, its compiled gates) runs with the plugin's hooks applied
the way SGLang's ``HookRegistry`` applies them: the routing hook alone (SGLang's gate, then the selector),
and the routing hook with the gate hook (the gate skipped where the selector routes the call). The two
give the same outputs bit for bit and the same counters; the gate runs exactly where the selector does
not compute it (another policy, a mass target, a fused shared slot, a fault, a disabled selector, a batch
outside the size gates, no forward state, a call from outside ``select_experts``).
"""

import pkgutil

import pytest
import torch

from conftest import missing, require_module
from xshare.selection import SelectorConfig
from xshare.selection.backends.c import kernel as K
from xshare.sglang import state as rt
from xshare.sglang.hooks import routing as hooks
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.configs.shared_experts import SharedExpertsConfig  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType  # noqa: E402

if not K.cpu_kernel_available():
    missing(f"no CPU kernel: {K.cpu_kernel_problem()}")

T = 20


@pytest.fixture(autouse=True, scope="module")
def _room_for_recompiles():
    """SGLang's gates are compiled here (and in earlier test files) for several configurations and dtypes;
    past Dynamo's limit (8) they would silently run eagerly, with other numerics than the compiled gate a
    server runs and the C path reproduces: Dynamo starts afresh here, with room."""
    torch._dynamo.reset()  # a gate that reached the limit in an earlier test file runs eagerly until reset
    config = torch._dynamo.config
    old = config.recompile_limit
    config.recompile_limit = 64
    yield
    config.recompile_limit = old


def _config(family: str):  # noqa: ANN202
    """(SGLang TopKConfig, E) of one grouped router family."""
    g = torch.Generator().manual_seed(sum(map(ord, family)))
    bias = torch.randn(64, generator=g) * 0.1
    if family == "auxfree":  # the CPU demo's aux-loss-free model: sigmoid + bias, 8 groups keep 4
        return topk.TopKConfig(top_k=4, use_grouped_topk=True, num_expert_group=8, topk_group=4, renormalize=True,
                               correction_bias=bias[:32].clone(), routed_scaling_factor=2.5), 32
    if family == "deepseek_v3_scaled":
        return topk.TopKConfig(top_k=6, use_grouped_topk=True, num_expert_group=8, topk_group=4, renormalize=True,
                               correction_bias=bias.clone(), routed_scaling_factor=2.5,
                               apply_routed_scaling_factor_on_output=True), 64
    if family == "glm45":  # one group
        return topk.TopKConfig(top_k=4, use_grouped_topk=True, num_expert_group=1, topk_group=1, renormalize=True,
                               correction_bias=bias[:32].clone(), routed_scaling_factor=2.5), 32
    if family == "deepseek_v2":  # softmax, groups, no bias, not renormalised
        return topk.TopKConfig(top_k=6, use_grouped_topk=True, num_expert_group=8, topk_group=3, renormalize=False,
                               routed_scaling_factor=16.0, apply_routed_scaling_factor_on_output=True), 64
    if family == "deepseek_v3_shared":  # the fused shared slot: SGLang draws its id, the gate always runs
        return topk.TopKConfig(top_k=7, use_grouped_topk=True, num_expert_group=8, topk_group=4, renormalize=True,
                               correction_bias=bias.clone(), routed_scaling_factor=2.5,
                               shared_experts=SharedExpertsConfig(num_fused_shared_experts=1),
                               fused_shared_experts_scaling_factor=1.0), 64
    raise AssertionError(family)


@pytest.fixture
def hooked(monkeypatch):
    """Apply hooks like SGLang's HookRegistry (undone after the test); counts the gate's own runs."""
    runs = {"gate": 0}

    def apply(target, fn):
        owner, name = target.rsplit(".", 1)
        obj = pkgutil.resolve_name(owner)
        monkeypatch.setattr(obj, name, getattr(obj, name))  # restored afterwards
        HookRegistry._apply_target(target, [(HookType.AROUND, fn, HookSource("xshare", None))])

    def counted(original, *args, **kwargs):
        runs["gate"] += 1
        return original(*args, **kwargs)

    for target in hooks.GATE_TARGETS:  # innermost: counts SGLang's gate itself
        apply(target, counted)

    def install(with_gate_hook: bool):
        """The routing hook on the first call; the gate hook on top with ``with_gate_hook``."""
        if not runs.get("routing"):
            apply(hooks.POST_PROCESS_TARGET, hooks.post_process_topk_ids_hook)
            runs["routing"] = 1
        if with_gate_hook:
            for target in hooks.GATE_TARGETS:
                apply(target, hooks.gate_hook)
        return runs

    yield install
    rt.uninstall()


def _serve(cfg, x, settings: PluginSettings, mode: str | None = "decode"):  # noqa: ANN001, ANN202
    """SGLang's select_experts on ``x`` under the installed hooks: (ids, weights, stats snapshot)."""
    runtime = rt.install(settings)
    if mode is not None:
        runtime.push(rt.ForwardState(mode=mode))
    out = topk.select_experts(torch.zeros(x.shape[0], 8, dtype=x.dtype), x, cfg, layer_id=0)
    snap = {k: v for k, v in runtime.stats.snapshot().items() if k not in ("time", "uptime_s")}
    rt.uninstall()
    return out.topk_ids.clone(), out.topk_weights.clone(), snap


def _logits(e: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(T, e, generator=torch.Generator().manual_seed(seed)) * 2
    x[:5] = torch.round(x[:5] * 2) / 2  # exact ties in a few rows
    return x.to(dtype)


def _compare(hooked, family: str, dtype: torch.dtype, settings: PluginSettings, *, mode: str | None = "decode",
             skipped: bool) -> dict:
    cfg, e = _config(family)
    x = _logits(e, dtype, seed=len(family))
    runs = hooked(False)
    want = _serve(cfg, x, settings, mode)
    assert runs["gate"] == 1  # the routing hook alone: SGLang's gate ran (the counter counts)
    hooked(True)
    got = _serve(cfg, x, settings, mode)
    assert runs["gate"] == (1 if skipped else 2), (family, settings.selector, mode)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (family, dtype)
    assert got[2] == want[2]  # every counter: calls, applied, skips, fallbacks, backends, figures
    return got[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["auxfree", "deepseek_v3_scaled", "glm45", "deepseek_v2"])
@pytest.mark.parametrize("budget", [0.25, 1.0])
def test_the_skipped_gate_gives_sglangs_routing_and_the_selectors(hooked, family, dtype, budget):
    """The selector applies: SGLang's gate never runs, outputs and counters are the same as with it."""
    settings = PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=budget, warmup_k=1))
    snap = _compare(hooked, family, dtype, settings, skipped=True)
    assert snap["applied"] == 1 and snap["fallbacks_total"] == 0, snap


CASES = {  # settings or states where the selector does not compute the gate: SGLang's gate runs
    "lynx": (dict(selector=SelectorConfig(policy="lynx", budget=0.5)), "decode"),
    "target_mass": (dict(selector=SelectorConfig(policy="xshare", budget=0.5, target_mass=0.9)), "decode"),
    "torch_backend": (dict(selector=SelectorConfig(policy="xshare", budget=0.5, backend="torch")), "decode"),
    "fault": (dict(selector=SelectorConfig(policy="xshare", budget=0.5), fault_inject="always"), "decode"),
    "disabled": (dict(enabled=False), "decode"),
    "batch_gate": (dict(selector=SelectorConfig(policy="xshare", budget=0.5, min_tokens=T + 1)), "decode"),
    "prefill": (dict(selector=SelectorConfig(policy="xshare", budget=0.5)), "extend"),
    "no_forward_state": (dict(selector=SelectorConfig(policy="xshare", budget=0.5)), None),
    "no_c_kernel": (dict(selector=SelectorConfig(policy="xshare", budget=0.5), cpu_kernel=False), "decode"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gate_runs_where_the_selector_does_not_compute_it(hooked, case):
    kw, mode = CASES[case]
    settings = PluginSettings(**{"enabled": True, **kw})
    _compare(hooked, "auxfree", torch.bfloat16, settings, mode=mode, skipped=False)


def test_a_fused_shared_slot_keeps_sglangs_gate(hooked):
    """SGLang draws the shared slot's id at random: its gate runs (seeded alike in both passes)."""
    torch.manual_seed(0)
    cfg, e = _config("deepseek_v3_shared")
    x = _logits(e, torch.float32, seed=3)
    settings = PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=0.25))
    hooked(False)
    torch.manual_seed(7)
    want = _serve(cfg, x, settings)
    runs = hooked(True)
    before = runs["gate"]
    torch.manual_seed(7)
    got = _serve(cfg, x, settings)
    assert runs["gate"] - before == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[2]["applied"] == 1


def test_a_gate_called_outside_select_experts_runs(hooked):
    """Only select_experts hands the gate's outputs straight to the routing hook: any other caller gets
    SGLang's gate."""
    cfg, e = _config("auxfree")
    x = _logits(e, torch.float32, seed=1)
    hooked(False)
    runs = hooked(True)
    runtime = rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=0.25)))
    runtime.push(rt.ForwardState(mode="decode"))
    before = runs["gate"]
    w, ids = topk.biased_grouped_topk(torch.zeros(T, 8), x, cfg.correction_bias, 4, True, 8, 4,
                                      routed_scaling_factor=2.5)
    assert runs["gate"] - before == 1
    want_w, want_ids = topk.biased_grouped_topk_gpu(torch.zeros(T, 8), x, cfg.correction_bias, 4, True, 8, 4,
                                                    routed_scaling_factor=2.5)
    assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
    assert runtime.current.deferred_gate is None


def test_a_gate_on_gpu_tensors_is_sglangs(hooked):
    """Tensors off the CPU (``meta`` here, as on a GPU): the hook calls SGLang's gate at once, defers nothing."""
    calls = []

    def gate(hidden_states, gating_output, correction_bias, topk, renormalize, num_expert_group=None,
             topk_group=None, num_fused_shared_experts=0, routed_scaling_factor=None,
             apply_routed_scaling_factor_on_output=False):
        calls.append(gating_output.device.type)
        return "sglang's outputs"

    scope = {"__name__": hooks.TOPK_MODULE, "hook": hooks.gate_hook, "gate": gate}
    exec("def select_experts(*args):\n    return hook(gate, *args)", scope)  # a caller the hook takes for SGLang's
    runtime = rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=0.25)))
    runtime.push(rt.ForwardState(mode="decode"))
    for device in ("meta", "cpu"):
        out = scope["select_experts"](torch.empty(T, 8, device=device), torch.zeros(T, 32, device=device),
                                      torch.zeros(32), 4, True, 8, 4)
        if device == "meta":
            assert out == "sglang's outputs" and calls == ["meta"] and runtime.current.deferred_gate is None
    assert calls == ["meta"]  # on the CPU the same call was deferred: SGLang's gate did not run
    assert runtime.current.deferred_gate is not None and out == runtime.current.deferred_gate.outputs()
