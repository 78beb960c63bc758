"""The adapter's routing decision (xshare.sglang.state / hooks) on plain tensors.

SGLang's objects are stood in for by small namespaces with the attributes the adapter reads; the
real server path is covered by test_sglang_e2e*.py.
"""

import functools
import logging
from types import SimpleNamespace

import pytest
import torch

from xshare.selection import SelectorConfig
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.hooks import binding
from xshare.sglang.hooks import routing as routing_hooks
from xshare.sglang.observe import report
from xshare.sglang.settings import PluginSettings

E, K = 16, 4


def topk_config(shared=0, **kw):
    cfg = dict(top_k=K + shared, num_shared_topk_slots=shared, allow_routed_experts_capture=True,
               scoring_func="softmax", renormalize=True, custom_routing_function=None, correction_bias=None,
               use_grouped_topk=False, num_expert_group=None, topk_group=None, routed_scaling_factor=None,
               apply_routed_scaling_factor_on_output=False, fused_shared_experts_scaling_factor=None)
    cfg.update(kw)
    return SimpleNamespace(**cfg)


def vanilla(logits, k=K):
    w, ids = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def call_args(logits, shared=0, ids_dtype=torch.int64):
    ids, w = vanilla(logits)
    if shared:
        ids = torch.cat([ids, torch.full((ids.shape[0], shared), E, dtype=ids.dtype)], 1)
        w = torch.cat([w, torch.full((w.shape[0], shared), 2.5)], 1)
    return {"topk_ids": ids.to(ids_dtype), "topk_weights": w.float(), "router_logits": logits, "layer_id": 3,
            "num_token_non_padded": None, "expert_location_dispatch_info": None}


def make_runtime(**kw):
    sel = kw.pop("selector", SelectorConfig(policy="xshare", budget=4, warmup_k=0))
    return rt.ProcessState(PluginSettings(enabled=True, selector=sel, **kw))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, E, generator=g) * 2


def test_decode_batch_is_rewritten_within_budget(logits):
    runtime = make_runtime()
    runtime.push(rt.ForwardState(mode="decode"))
    args = call_args(logits)
    out = layer.route(runtime, args, topk_config=topk_config())
    assert out is not None
    ids, w = out["topk_ids"], out["topk_weights"]
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (12, K)
    assert torch.unique(ids).numel() <= 4 < torch.unique(args["topk_ids"]).numel()
    assert torch.allclose(w.sum(-1), torch.ones(12), atol=1e-5)
    assert (torch.sort(ids, 1).values[:, 1:] != torch.sort(ids, 1).values[:, :-1]).all()  # distinct per token
    snap = runtime.stats.snapshot()
    assert snap["applied"] == 1 and snap["layers"]["3"]["activated"] == torch.unique(ids).numel()
    assert snap["layers"]["3"]["vanilla_activated"] == torch.unique(args["topk_ids"]).numel()
    changed = (torch.sort(ids, 1).values != torch.sort(args["topk_ids"], 1).values).any(1).sum()
    assert 0 < snap["layers"]["3"]["changed_tokens"] == changed
    assert args["topk_ids"] is not ids  # out of place: SGLang's own tensors are untouched


def test_budget_at_least_e_reproduces_vanilla(logits):
    runtime = make_runtime(selector=SelectorConfig(policy="xshare", budget=E))
    runtime.push(rt.ForwardState(mode="decode"))
    args = call_args(logits)
    out = layer.route(runtime, args, topk_config=topk_config())
    assert torch.equal(out["topk_ids"], args["topk_ids"])
    assert torch.allclose(out["topk_weights"], args["topk_weights"], atol=1e-6)
    assert runtime.stats.snapshot()["layers"]["3"]["changed_tokens"] == 0


def test_shared_expert_columns_are_left_alone(logits):
    runtime = make_runtime()
    runtime.push(rt.ForwardState(mode="decode"))
    args = call_args(logits, shared=1, ids_dtype=torch.int32)
    out = layer.route(runtime, args, topk_config=topk_config(shared=1))
    assert out["topk_ids"].dtype == torch.int32 and out["topk_ids"].shape == (12, K + 1)
    assert torch.equal(out["topk_ids"][:, -1], args["topk_ids"][:, -1])
    assert torch.equal(out["topk_weights"][:, -1], args["topk_weights"][:, -1])
    assert torch.unique(out["topk_ids"][:, :K]).numel() <= 4


@pytest.fixture
def installed():
    """Install a process state the hooks find (uninstalled after the test)."""
    yield lambda settings: rt.install(settings)
    rt.uninstall()


@pytest.mark.parametrize("on", [False, True], ids=["draft_layers_off", "draft_layers_on"])
def test_draft_model_layers_select_only_when_configured(logits, installed, on):
    """A draft worker's forwards (SGLang's real ForwardMode through the forward hook) are counted as
    ``draft_decode``; their MoE layers keep SGLang's routing (``draft_layer``) unless XSHARE_DRAFT_LAYERS,
    and then select under their own mode, apart from the target's figures."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from xshare.sglang.hooks import forward

    runtime = installed(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=4, warmup_k=0),
                                       draft_layers=on))
    runtime.scattered_input = False  # (process facts read once: no SGLang runtime context in a unit test)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=logits.shape[0],
                            input_ids=torch.zeros(logits.shape[0], dtype=torch.long))
    seen = {}

    def model_forward(self, fb):
        seen["mode"] = runtime.current.mode
        seen["out"] = layer.route(runtime, call_args(logits), topk_config=topk_config())

    forward.model_runner_forward_hook(model_forward, SimpleNamespace(is_draft_worker=True, device="cpu"), batch)
    assert seen["mode"] == "draft_decode"
    modes = runtime.stats.mode_report()
    if on:
        assert seen["out"] is not None and runtime.stats.applied == 1
        assert modes["draft_decode"]["applied"] == 1 and "decode" not in modes
    else:
        assert seen["out"] is None and runtime.stats.skipped["draft_layer"] == 1 and runtime.stats.applied == 0
    forward.model_runner_forward_hook(model_forward, SimpleNamespace(is_draft_worker=False, device="cpu"), batch)
    assert seen["mode"] == "decode" and seen["out"] is not None  # the target model selects either way


@pytest.mark.parametrize(
    ("state", "cfg", "reason"),
    [
        (rt.ForwardState(mode="extend"), {}, "mode_extend"),
        (rt.ForwardState(mode="idle"), {}, "mode_idle"),
        (rt.ForwardState(mode="decode", is_draft=True), {}, "draft_layer"),
        (rt.ForwardState(mode="decode"), {"allow_routed_experts_capture": False}, "draft_layer"),
        (None, {}, "no_forward_state"),
        # routers the selector does not know stay SGLang's (biased / grouped routers are selected:
        # tests/sglang/test_sglang_router_families.py)
        (rt.ForwardState(mode="decode"), {"custom_routing_function": lambda *a: None},
         "unsupported_custom_routing_function"),
        (rt.ForwardState(mode="decode"), {"scoring_func": "relu"}, "unsupported_scoring_relu"),
        (rt.ForwardState(mode="decode"), {"use_grouped_topk": True, "num_expert_group": 5, "topk_group": 2},
         "unsupported_router_config"),
    ],
)
def test_not_applicable_calls_are_left_to_sglang(logits, state, cfg, reason):
    runtime = make_runtime()
    runtime.push(state)
    assert layer.route(runtime, call_args(logits), topk_config=topk_config(**cfg)) is None
    assert runtime.stats.skipped[reason] == 1 and runtime.stats.applied == 0


def test_prefill_when_asked_and_batch_size_range(logits):
    runtime = make_runtime(apply_prefill=True)
    runtime.push(rt.ForwardState(mode="extend"))
    assert layer.route(runtime, call_args(logits), topk_config=topk_config()) is not None
    runtime = make_runtime(selector=SelectorConfig(policy="xshare", budget=4, min_tokens=16))
    runtime.push(rt.ForwardState(mode="decode"))
    assert layer.route(runtime, call_args(logits), topk_config=topk_config()) is None
    assert runtime.stats.skipped["batch_size"] == 1


def test_injected_fault_falls_back_and_is_counted(logits, caplog):
    runtime = make_runtime(fault_inject="every:2")
    runtime.push(rt.ForwardState(mode="decode"))
    with caplog.at_level(logging.ERROR, logger="xshare.sglang"):
        results = [layer.route(runtime, call_args(logits), topk_config=topk_config()) for _ in range(6)]
    assert [r is None for r in results] == [False, True, False, True, False, True]
    assert runtime.stats.fallbacks == {"InjectedFault": 3} and runtime.stats.applied == 3
    assert sum("selector failed" in r.message for r in caplog.records) == 1  # logged once


def test_xshare_spec_groups_follow_tokens_per_request():
    runtime = make_runtime(selector=SelectorConfig(policy="xshare_spec", budget=E, group_budget=K, warmup_k=0))
    groups = runtime.group_ids(12, 3, torch.device("cpu"))
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert runtime.group_ids(6, 3, torch.device("cpu")).data_ptr() == groups.data_ptr()  # one buffer


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_update_settings_swaps_the_active_config(logits, cpu_kernel):
    runtime = make_runtime(cpu_kernel=cpu_kernel)
    runtime.push(rt.ForwardState(mode="decode"))
    first = layer.route(runtime, call_args(logits), topk_config=topk_config())
    assert torch.unique(first["topk_ids"]).numel() <= 4
    runtime.update_settings(PluginSettings(enabled=True, cpu_kernel=cpu_kernel,
                                           selector=SelectorConfig(policy="xshare", budget=6, warmup_k=0)))
    second = layer.route(runtime, call_args(logits), topk_config=topk_config())
    assert 4 < torch.unique(second["topk_ids"]).numel() <= 6
    if not cpu_kernel:  # the device knobs of the torch path follow in place
        knobs = next(iter(runtime._knobs.values()))
        assert knobs.budget.item() == 6
    runtime.update_settings(PluginSettings(enabled=False))
    assert layer.route(runtime, call_args(logits), topk_config=topk_config()) is None


def _fake_post_process(topk_ids, topk_weights, topk_config, router_logits, layer_id, num_token_non_padded=None,
                       expert_location_dispatch_info=None, padded_rows_masked=False):
    return topk_ids, topk_weights, expert_location_dispatch_info


def test_hook_binds_positional_and_keyword_arguments(logits):
    rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=4, warmup_k=0)))
    try:
        rt.get().push(rt.ForwardState(mode="decode"))
        a = call_args(logits)
        ids, w, info = routing_hooks.post_process_topk_ids_hook(
            _fake_post_process, a["topk_ids"], a["topk_weights"], topk_config(), logits, 3,
            expert_location_dispatch_info="info")
        assert torch.unique(ids).numel() <= 4 and info == "info"
        ids2, _, _ = routing_hooks.post_process_topk_ids_hook(
            _fake_post_process, topk_ids=a["topk_ids"], topk_weights=a["topk_weights"], topk_config=topk_config(),
            router_logits=logits, layer_id=3)
        assert torch.equal(ids, ids2)
    finally:
        rt.uninstall()
    # without a runtime (plugin disabled / other process) the call passes through untouched
    out = routing_hooks.post_process_topk_ids_hook(_fake_post_process, a["topk_ids"], a["topk_weights"], topk_config(),
                                           logits, 3)
    assert out[0] is a["topk_ids"]


def _kw_only(a, b=2, *, c=3):
    return a, b, c


@pytest.mark.parametrize("fn", [_fake_post_process, _kw_only])
def test_bind_arguments_is_inspects_bind(fn):
    """The hook's fast binder gives inspect's bound arguments (defaults applied) for every way of calling,
    and refuses what inspect refuses."""
    import inspect

    sig = inspect.signature(fn)
    names = list(sig.parameters)
    calls = [((1, 2, 3, 4, 5), {}), ((1, 2, 3, 4, 5, 6, 7, 8), {}), ((1, 2, 3), {"router_logits": 4, "layer_id": 5}),
             ((), dict(zip(names, range(len(names)), strict=True))), ((1,), {}), ((1,), {"b": 5}), ((1,), {"c": 9}),
             ((1, 2, 3, 4, 5, 6, 7, 8, 9), {}), ((1, 2), {"topk_ids": 3}), ((1, 2, 3, 4, 5), {"nope": 1}), ((), {})]
    agreed = 0
    for args, kwargs in calls:
        try:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            want = dict(bound.arguments)
        except TypeError:
            with pytest.raises(TypeError):
                binding.bind_arguments(fn, args, kwargs)
            continue
        got = binding.bind_arguments(fn, args, kwargs)
        assert got == want and list(got) == list(want), (args, kwargs)
        assert fn(**got) == fn(*args, **kwargs)
        agreed += 1
    assert agreed >= 3


@pytest.mark.parametrize("policy", ["topk", "xshare", "xshare_ep", "xshare_spec", "lynx", "des_vote", "des_seq",
                                    "oea"])
@pytest.mark.parametrize("padded", [False, True])
def test_adapter_selection_matches_the_core_without_ties(policy, padded):
    from xshare.selection import Placement, select
    from xshare.selection.decide import LayerCall, decide
    from xshare.selection.knobs import SelectorKnobs

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(10, E, generator=g) * 3
    config = SelectorConfig(policy=policy, budget=6, warmup_k=1)
    placement = Placement.contiguous(E, 4) if policy == "xshare_ep" else None
    groups = torch.arange(10) // 2
    nt = torch.tensor(8) if padded else None
    knobs = SelectorKnobs.create(config, E, K)
    ref = select(logits, K, config, groups=groups, placement=placement, num_tokens=nt, knobs=knobs)
    sg_ids = vanilla(logits)[0]
    call = LayerCall(logits, K, engine_ids=sg_ids, groups=groups, placement=placement, num_tokens=nt,
                            knobs=knobs)
    got = decide(call, config).routing
    assert torch.equal(got.topk_ids, ref.topk_ids) and torch.equal(got.topk_weights, ref.topk_weights)
    assert torch.equal(got.active, ref.active)


def test_exact_ties_are_broken_as_sglang_broke_them():
    runtime = make_runtime(selector=SelectorConfig(policy="xshare", budget=E, warmup_k=1))
    runtime.push(rt.ForwardState(mode="decode"))
    logits = torch.full((3, E), -2.0)
    logits[:, 5] = 3.0
    logits[:, [2, 9, 11, 14]] = 1.0  # four experts tie for the last three places
    sglang_ids = torch.tensor([[5, 14, 9, 11], [5, 11, 2, 14], [5, 2, 9, 11]])  # whatever SGLang picked
    probs = torch.softmax(logits, -1)
    w = probs.gather(1, sglang_ids)
    args = {"topk_ids": sglang_ids.clone(), "topk_weights": w / w.sum(-1, keepdim=True), "router_logits": logits,
            "layer_id": 0, "num_token_non_padded": None}
    out = layer.route(runtime, args, topk_config=topk_config())
    assert torch.equal(out["topk_ids"], sglang_ids)  # same experts, same column order
    assert torch.equal(out["topk_weights"], args["topk_weights"])
    assert runtime.stats.snapshot()["layers"]["0"]["changed_tokens"] == 0
    # the core alone breaks the tie by the lower index: a different (equally scored) expert
    from xshare.selection import select

    assert not torch.equal(select(logits, K, SelectorConfig(policy="xshare", budget=E)).topk_ids, sglang_ids)


def test_xshare_ep_placement_from_sglang_expert_location_metadata(monkeypatch, logits):
    """Placement from SGLang's ExpertLocationMetadata (redundant experts included), cached until
    EPLB rewrites the map; with replicas the hook passes physical ids and disables SGLang's remap."""
    import sys

    import sglang.srt.eplb  # noqa: F401 - the real parent package; its expert_location module is faked

    from xshare.selection import Placement
    from xshare.sglang.placement import sglang_placement

    num_slots, ep = 20, 4  # 16 logical experts + 4 redundant, 5 slots per EP rank
    p2l = torch.stack([torch.cat([torch.arange(E), torch.tensor([0, 5, 10, 15])]) for _ in range(2)])
    meta = SimpleNamespace(physical_to_logical_map_cpu=p2l, ep_size=ep, num_layers=2, num_logical_experts=E)
    fake = SimpleNamespace(get_global_expert_location_metadata=lambda: meta)
    monkeypatch.setitem(sys.modules, "sglang.srt.eplb.expert_location", fake)
    runtime = rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare_ep", budget=8,
                                                                               warmup_k=0)))
    try:
        runtime.placements.source = functools.partial(sglang_placement, runtime.placements)
        first = sglang_placement(runtime.placements, 1, E)
        ref = Placement.from_physical(p2l[1], ep)
        assert torch.equal(first.slot_gpu, ref.slot_gpu) and torch.equal(first.replicas, ref.replicas)
        assert first.has_replicas and first.num_gpus == ep
        assert sglang_placement(runtime.placements, 1, E) is first  # cached
        p2l[1, 16] = 3  # EPLB moved a replica (in place)
        assert sglang_placement(runtime.placements, 1, E) is not first
        runtime.push(rt.ForwardState(mode="decode"))
        args = call_args(logits)
        args["layer_id"] = 1
        out = layer.route(runtime, args, topk_config=topk_config())
        assert out["expert_location_dispatch_info"] is None
        phys = out["topk_ids"]
        assert phys.min() >= 0 and phys.max() < num_slots
        logical = p2l[1][phys]
        assert torch.unique(logical).numel() <= 8
        placement = sglang_placement(runtime.placements, 1, E)
        per_gpu = torch.zeros(ep, dtype=torch.int64)
        for e in torch.unique(logical).tolist():
            per_gpu[placement.primary_gpu[e]] += 1
        assert per_gpu.max() <= 2  # gpu_cap = ceil(8 / 4)
        # SGLang's LP dispatch all-reduces in its solver on every rank: the dispatch stays, ids stay logical
        args = dict(call_args(logits), layer_id=1,
                    expert_location_dispatch_info=SimpleNamespace(ep_dispatch_algorithm="lp"))
        out = layer.route(runtime, args, topk_config=topk_config())
        assert "expert_location_dispatch_info" not in out and out["topk_ids"].max() < E
        assert torch.unique(out["topk_ids"]).numel() <= 8
    finally:
        rt.uninstall()


def _decode_forward(runtime, logits, cfg):
    """One decode forward of one MoE layer call, and its end (as the forward hook ends it)."""
    state = rt.ForwardState(mode="decode")
    runtime.push(state)
    layer.route(runtime, call_args(logits), topk_config=cfg)
    runtime.pop()
    report.forward_ended(runtime, state)


def test_coverage_per_layer_and_a_loud_warning_when_no_layer_selects(logits, caplog):
    unknown = topk_config(custom_routing_function=lambda *a: None)
    runtime = make_runtime()
    for _ in range(report.COVERAGE_CHECK_FORWARDS):
        with caplog.at_level(logging.WARNING, logger="xshare.sglang"):
            _decode_forward(runtime, logits, unknown)
    assert runtime.stats.snapshot()["coverage"] == {"3": "unsupported_custom_routing_function"}
    warned = [r.getMessage() for r in caplog.records if "selected on no MoE layer" in r.getMessage()]
    assert len(warned) == 1 and "3: unsupported_custom_routing_function" in warned[0], warned

    # a layer that selects is reported as such, and nothing is said
    caplog.clear()
    runtime = make_runtime()
    state = rt.ForwardState(mode="decode")
    runtime.push(state)
    assert layer.route(runtime, call_args(logits), topk_config=topk_config()) is not None
    assert report.check_coverage(runtime) is None and runtime.stats.snapshot()["coverage"] == {"3": "selects"}

    # the hook never called (a runner backend that bypasses select_experts)
    runtime = make_runtime()
    runtime.applicable_forwards = report.COVERAGE_CHECK_FORWARDS
    assert "never called" in report.check_coverage(runtime)
    assert report.check_coverage(make_runtime(selector=SelectorConfig())) is not None  # enabled, nothing seen
    off = rt.ProcessState(PluginSettings(enabled=False))
    assert report.check_coverage(off) is None


def test_require_coverage_stops_after_the_first_decode_forward(logits):
    unknown = topk_config(custom_routing_function=lambda *a: None)
    runtime = make_runtime(require_coverage=True)
    with pytest.raises(report.CoverageRefused, match="selected on no MoE layer"):
        _decode_forward(runtime, logits, unknown)
    # a batch below min_tokens is not a coverage problem at the first forward
    small = make_runtime(require_coverage=True, selector=SelectorConfig(policy="xshare", budget=4, min_tokens=64))
    _decode_forward(small, logits, topk_config())
    assert small.stats.snapshot()["skipped"] == {"batch_size": 1}
