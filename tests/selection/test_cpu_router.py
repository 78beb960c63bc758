"""The CPU fast path for router-spec layers (xshare.selection.backends.c.router, _cpu_router.c) against
the torch path of decide_router.

Every router family x {fp32, bf16} on seeded random and tied inputs, with padding rows, exact rows,
the engine's own picks (ties included, in its own column order), warm-up 0..top_k and budgets top_k..E:
ids, replaced rows and short rows equal, weights bit for bit (torch.equal). Its top-k is torch.topk's
own order on the CPU (checked directly), and the serving adapter records the same counters and
metric rows with the fast path on and off.
"""

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import missing, require_module
from xshare.selection import SelectorConfig
from xshare.selection.backends.c import kernel as K
from xshare.selection.backends.c.router import cpu_router_route, cpu_router_supports
from xshare.selection.decide import LayerCall, decide, gate_deferrable, layer_config
from xshare.selection.routers.gate import reference_route, router_scores
from xshare.selection.routers.spec import RouterSpec
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.observe.figures import routing_checksum
from xshare.sglang.settings import PluginSettings

if not K.cpu_kernel_available():  # it needs a C compiler (CC, cc, gcc or clang)
    missing(f"no CPU kernel: {K.cpu_kernel_problem()}")


def _bias(e: int, seed: int) -> torch.Tensor:
    return torch.randn(e, generator=torch.Generator().manual_seed(seed)) * 0.3


# family -> (spec builder, E, routed top_k)
FAMILIES = {
    "deepseek_v3": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(64, 1), num_expert_group=8,
                                       topk_group=4, routed_scaling_factor=2.5, num_fused_shared_experts=1,
                                       fused_shared_experts_scaling_factor=1.0), 64, 6),
    "deepseek_v3_scaled": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(32, 2), num_expert_group=4,
                                              topk_group=2, routed_scaling_factor=2.5, scaling_in_weights=True), 32, 4),
    "auxfree_tiny": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(32, 3), num_expert_group=8,
                                        topk_group=4, routed_scaling_factor=2.5), 32, 4),
    "glm45_kimi_k2": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(32, 4), num_expert_group=1,
                                         topk_group=1, routed_scaling_factor=2.5), 32, 4),
    "deepseek_v2": (lambda: RouterSpec(scoring="softmax", num_expert_group=8, topk_group=3, renormalize=False,
                                       routed_scaling_factor=16.0, scaling_in_weights=True), 64, 6),
    "grouped_shared": (lambda: RouterSpec(scoring="softmax", num_expert_group=4, topk_group=2,
                                          routed_scaling_factor=2.0, num_fused_shared_experts=1), 32, 4),
    "minimax_m2": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(32, 5)), 32, 4),
    "ernie_softmax_bias": (lambda: RouterSpec(scoring="softmax", correction_bias=_bias(32, 6) * 0.1,
                                              renormalize=False), 32, 4),
    "deepseek_v4_sqrtsoftplus": (lambda: RouterSpec(scoring="sqrtsoftplus", correction_bias=_bias(32, 7)), 32, 4),
    "sqrtsoftplus": (lambda: RouterSpec(scoring="sqrtsoftplus"), 32, 4),
    "softmax_scaled": (lambda: RouterSpec(scoring="softmax", routed_scaling_factor=2.5, scaling_in_weights=True),
                       32, 4),
    "wide_partial_sort": (lambda: RouterSpec(scoring="sigmoid", correction_bias=_bias(256, 8)), 256, 4),
    "llama4": (lambda: RouterSpec(scoring="sigmoid", renormalize=False, custom="llama4"), 16, 1),
}
DTYPES = [torch.float32, torch.bfloat16]
POLICIES = ["xshare", "xshare", "xshare", "topk", "lynx", "des_vote", "oea"]


def _case(family: str, dtype: torch.dtype, seed: int):  # noqa: ANN202
    """One randomised router-spec call and config (seeded)."""
    build, e, k = FAMILIES[family]
    spec = build()
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    t = rng.randint(1, 24)
    x = torch.randn(t, e, generator=g) * 2
    kind = rng.choice(["random", "ties", "coarse_ties", "masked"])
    if kind == "ties":
        x = x.round()
    elif kind == "coarse_ties":
        x = (x / 2).round()  # few distinct values: ties in experts and in group scores
    elif kind == "masked":
        x[torch.rand(t, e, generator=g) < 0.2] = float("-inf")
        x[:, 0] = 0.0  # every row keeps a finite logit
    x = x.to(dtype)
    engine_ids = None
    if rng.random() < 0.85:  # the engine's own picks, in its own column order
        engine_ids = reference_route(x, k, spec).topk_ids[:, :k]
        if rng.random() < 0.5:
            engine_ids = engine_ids[:, torch.randperm(k, generator=g)]
        engine_ids = engine_ids.to(rng.choice([torch.int32, torch.int64]))
    policy = rng.choice(POLICIES)
    cfg = SelectorConfig(policy=policy, budget=rng.randint(k, e), warmup_k=rng.randint(1 if policy == "oea" else 0, k),
                         min_tokens=rng.choice([1, 1, 1, 6]))
    num_tokens = rng.choice([None, None, rng.randint(0, t), torch.tensor(rng.randint(0, t))])
    exact = (torch.rand(t, generator=g) < 0.25) if rng.random() < 0.2 else None
    call = LayerCall(x, k, spec, engine_ids=engine_ids, num_tokens=num_tokens, exact=exact)
    return call, cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_c_path_is_the_torch_path(family, dtype):
    seen = {"replaced": 0, "short": 0, "kept": 0, "exact": 0}
    for seed in range(40):
        call, cfg = _case(family, dtype, seed * 7919 + len(family))
        want = decide(call, cfg)
        got = decide(call, cfg, cpu_kernel=True)
        assert isinstance(got.cpu, K.CpuRouting) and want.cpu is None, "the C path did not route"
        where = (family, dtype, seed, cfg)
        assert torch.equal(got.routing.topk_ids, want.routing.topk_ids), where
        assert got.routing.topk_ids.dtype == want.routing.topk_ids.dtype == torch.int32
        assert torch.equal(got.routing.topk_weights, want.routing.topk_weights), where  # bit for bit
        assert torch.equal(got.routing.active, want.routing.active), where
        assert torch.equal(got.replaced, want.replaced), where
        assert got.short_rows.dtype == want.short_rows.dtype and int(got.short_rows) == int(want.short_rows), where
        assert got.config == want.config
        seen["replaced"] += int(got.replaced.sum())
        seen["short"] += int(got.short_rows)
        seen["kept"] += int((~got.replaced).sum())
        seen["exact"] += call.exact is not None
    # the cases reach every branch: rows routed inside the set, rows kept, exact rows
    assert seen["replaced"] > 0 and seen["kept"] > 0 and seen["exact"] > 0, seen
    if family in ("deepseek_v3", "deepseek_v2", "grouped_shared", "deepseek_v3_scaled", "auxfree_tiny"):
        assert seen["short"] > 0, seen  # group limits leave some rows short of top_k inside S


SERVED = sorted(f for f in FAMILIES if FAMILIES[f][0]().gate in ("grouped", "biased_grouped"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", SERVED)
def test_served_path_is_the_torch_path(family, dtype):
    """The one-call served path (the gate's rest, the decision and SGLang's outputs in C) writes what the
    torch path's routing merged into SGLang's outputs gives: ids and weights bit for bit, in every column
    (shared slots and unchanged rows kept), with the same replaced rows, short rows and counts."""
    seen = {"replaced": 0, "kept": 0}
    for seed in range(40):
        call, cfg = _case(family, dtype, seed * 104729 + len(family))
        if cfg.policy not in ("xshare", "topk"):
            cfg = SelectorConfig(policy="xshare", budget=cfg.budget, warmup_k=cfg.warmup_k, min_tokens=cfg.min_tokens)
        own = reference_route(call.router_logits, call.top_k, call.layer)  # SGLang's outputs, shared slot last
        k = call.top_k
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        ids = own.topk_ids.clone()
        weights = own.topk_weights.clone()
        ids[:, :k], weights[:, :k] = ids[:, perm], weights[:, perm]  # the engine's own column order
        call = dataclasses.replace(call, engine_ids=ids[:, :k], engine_outputs=(ids, weights))
        want = decide(call, cfg)
        got = decide(call, cfg, cpu_kernel=True)
        assert got.outputs is not None and got.backend == "c", "the served path did not route"
        where = (family, dtype, seed, cfg)
        pick = want.replaced.unsqueeze(1)
        want_ids, want_w = ids.clone(), weights.clone()
        want_ids[:, :k] = torch.where(pick, want.routing.topk_ids, ids[:, :k])
        want_w[:, :k] = torch.where(pick, want.routing.topk_weights, weights[:, :k])
        assert torch.equal(got.outputs[0], want_ids), where
        assert torch.equal(got.outputs[1], want_w), where  # bit for bit
        assert torch.equal(got.routing.topk_ids, want.routing.topk_ids), where
        assert torch.equal(got.routing.active, want.routing.active), where
        assert torch.equal(got.replaced, want.replaced), where
        assert int(got.short_rows) == int(want.short_rows), where
        assert got.cpu.active_counts() == (int(want.routing.active.sum()), int(got.cpu.vanilla_active.sum())), where
        seen["replaced"] += int(got.replaced.sum())
        seen["kept"] += int((~got.replaced).sum())
    assert seen["replaced"] > 0 and seen["kept"] > 0, seen


DEFERRED = [f for f in SERVED if not FAMILIES[f][0]().num_fused_shared_experts]


def _sglang_gate(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang 0.5.23's own gate of a grouped / biased-grouped call on the CPU (weights, ids)."""
    sg = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
    spec, x = call.layer, call.router_logits
    h = torch.zeros(x.shape[0], 4)
    kw = dict(num_expert_group=spec.num_expert_group, topk_group=spec.topk_group,
              routed_scaling_factor=spec.routed_scaling_factor,
              apply_routed_scaling_factor_on_output=spec.scaling_in_weights)
    if spec.gate == "biased_grouped":
        return sg.biased_grouped_topk_gpu(h, x, spec.correction_bias, call.top_k, spec.renormalize, **kw)
    return sg.grouped_topk_gpu(h, x, call.top_k, spec.renormalize, scoring_func=spec.scoring, **kw)


@pytest.fixture
def room_for_recompiles():
    """SGLang's gates are compiled here for several configurations and dtypes; past Dynamo's limit (8) they
    would silently run eagerly (other numerics than the compiled gate a server runs): Dynamo starts afresh."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    old = config.recompile_limit
    config.recompile_limit = 64
    yield
    config.recompile_limit = old


@pytest.mark.usefixtures("room_for_recompiles")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", DEFERRED)
def test_deferred_gate_is_sglangs_gate(family, dtype):
    """A call whose gate SGLang skipped (``engine_gate``: the served path computes the gate itself) gives
    what the served path gives on SGLang's own gate outputs (SGLang's compiled CPU gate, run here): the
    engine's picks are SGLang's ids in its column order, the outputs, routing, replaced rows and counts
    are the same, bit for bit; and with a budget of E nothing changes, so the outputs are SGLang's."""
    seen = {"replaced": 0, "kept": 0}
    for seed in range(30):
        call, cfg = _case(family, dtype, seed * 7919 + len(family))
        if cfg.policy not in ("xshare", "topk"):
            cfg = SelectorConfig(policy="xshare", budget=cfg.budget, warmup_k=cfg.warmup_k, min_tokens=cfg.min_tokens)
        weights, ids = _sglang_gate(call)
        given = dataclasses.replace(call, engine_ids=ids, engine_outputs=(ids, weights))
        deferred = dataclasses.replace(call, engine_ids=None, engine_gate=True)
        want = decide(given, cfg, cpu_kernel=True)
        got = decide(deferred, cfg, cpu_kernel=True)
        where = (family, dtype, seed, cfg)
        assert got.backend == "c" and got.outputs is not None, where
        assert torch.equal(got.cpu.engine_ids, ids), where
        for a, b in zip(got.outputs, want.outputs, strict=True):
            assert torch.equal(a, b), where
        assert torch.equal(got.routing.topk_ids, want.routing.topk_ids), where
        assert torch.equal(got.replaced, want.replaced), where
        assert got.cpu.active_counts() == want.cpu.active_counts(), where
        assert (got.cpu.changed_tokens, got.cpu.checksum) == (want.cpu.changed_tokens, want.cpu.checksum), where
        whole = decide(deferred, cfg.replace(budget=call.router_logits.shape[1]), cpu_kernel=True)
        assert torch.equal(whole.outputs[0], ids) and torch.equal(whole.outputs[1], weights), where
        seen["replaced"] += int(got.replaced.sum())
        seen["kept"] += int((~got.replaced).sum())
    assert seen["replaced"] > 0 and seen["kept"] > 0, seen


def test_a_deferred_gate_no_backend_computes_is_refused():
    """A call without the engine's picks goes nowhere its gate is not computed: a fused shared slot (SGLang
    draws its id), a policy the served path does not decide, the torch backend: ValueError, never a
    routing from placeholder outputs."""
    build, e, k = FAMILIES["auxfree_tiny"]
    x = torch.randn(8, e)
    call = LayerCall(x, k, build(), engine_gate=True)
    assert gate_deferrable(call, SelectorConfig(budget=8), cpu_kernel=True)
    shared = dataclasses.replace(call, layer=FAMILIES["deepseek_v3"][0](), router_logits=torch.randn(8, 64))
    for c, cfg, kw in ((shared, SelectorConfig(budget=8), {}), (call, SelectorConfig(policy="lynx", budget=8), {}),
                       (call, SelectorConfig(budget=8), {"backend": "torch"}),
                       (call, SelectorConfig(budget=8, target_mass=0.9), {})):
        assert not gate_deferrable(c, cfg, cpu_kernel=True, **kw)
        with pytest.raises(ValueError, match="engine_gate"):
            decide(c, cfg, cpu_kernel=True, **kw)
    assert not gate_deferrable(call, SelectorConfig(budget=8), cpu_kernel=False)


def test_served_path_declines_what_it_does_not_write():
    """Outputs it cannot write in place (int64 ids, bf16 weights, no outputs) and gates it does not
    complete go to the other C path, with the same routing."""
    build, e, k = FAMILIES["auxfree_tiny"]
    spec = build()
    x = torch.randn(8, e, generator=torch.Generator().manual_seed(5)) * 2
    own = reference_route(x, k, spec)
    cfg = SelectorConfig(policy="xshare", budget=k + 2, warmup_k=1)
    for outputs in [None, (own.topk_ids.long(), own.topk_weights), (own.topk_ids, own.topk_weights.bfloat16())]:
        call = LayerCall(x, k, spec, engine_ids=own.topk_ids[:, :k], engine_outputs=outputs)
        got = decide(call, cfg, cpu_kernel=True)
        assert got.outputs is None and got.backend == "c"
        assert torch.equal(got.routing.topk_ids, decide(call, cfg).routing.topk_ids)
    minimax, e2, k2 = FAMILIES["minimax_m2"]
    x2 = torch.randn(8, e2)
    own2 = reference_route(x2, k2, minimax())
    call = LayerCall(x2, k2, minimax(), engine_ids=own2.topk_ids,
                            engine_outputs=(own2.topk_ids, own2.topk_weights))
    assert decide(call, cfg, cpu_kernel=True).outputs is None


def test_bookkeeping_is_the_adapters():
    """The by-products the adapter records (activated experts with and without the selector, changed
    rows, checksum, valid rows) are what it computes from the routing in torch."""
    for seed in range(60):
        family = sorted(FAMILIES)[seed % len(FAMILIES)]
        call, cfg = _case(family, torch.float32, 31 + seed)
        if call.engine_ids is None:
            continue
        res = decide(call, cfg, cpu_kernel=True).cpu
        t, e = call.router_logits.shape
        n = t if call.num_tokens is None else int(call.num_tokens)
        valid = torch.arange(t) < n
        old = call.engine_ids.long()
        vanilla = torch.zeros(e, dtype=torch.bool)
        vanilla[old[valid].clamp_min(0).flatten()] = True
        ids = res.routing.topk_ids
        changed = ((torch.sort(old, 1).values != torch.sort(ids.long(), 1).values).any(1) & valid).sum()
        assert torch.equal(res.vanilla_active, vanilla)
        assert res.changed_tokens == int(changed) and res.num_valid == n
        assert res.checksum == int(routing_checksum(ids, valid))
        assert torch.equal(res.engine_ids, call.engine_ids.to(torch.int32))


def test_xshare_set_is_warmup_plus_fill():
    """A hand-made grouped batch (4 groups of 2, keep 2, top-2): S = every token's top-1 by choice
    score plus the best column sums over reachable experts; a restricted row re-picks its groups
    among those holding experts of S, and a row that cannot fill top_k there keeps its own routing."""
    spec = RouterSpec(scoring="sigmoid", correction_bias=torch.zeros(8), num_expert_group=4, topk_group=2)
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0, -4.0, -4.0, -4.0, -4.0],
                      [4.0, -4.0, 3.0, 2.0, -4.0, -4.0, 1.0, -4.0],
                      [-4.0, -4.0, -4.0, -4.0, 4.0, 3.0, 2.5, 2.0]])
    call = LayerCall(x, 2, spec, engine_ids=reference_route(x, 2, spec).topk_ids)
    cfg = SelectorConfig(policy="xshare", budget=3, warmup_k=1)
    res = cpu_router_route(call, layer_config(cfg, spec), router_scores(x, spec))
    # W = {0, 4}; the best other column sum is expert 2 (sigmoid 2 + sigmoid 3; row 2 cannot reach it)
    assert res.in_set.nonzero().flatten().tolist() == [0, 2, 4]
    assert res.routing.topk_ids.tolist()[:2] == [[0, 2], [0, 2]]  # groups 0 and 1, one expert of S each
    assert res.replaced.tolist() == [True, True, False]
    assert int(res.short_rows) == 1  # row 2 reaches only expert 4 of S: short, the engine's routing
    assert res.routing.topk_ids.tolist()[2] == call.engine_ids.tolist()[2]
    assert res.routing.active.nonzero().flatten().tolist() == sorted({0, 2, *call.engine_ids.tolist()[2]})


def test_topk_order_is_torchs():
    """The C top-k (libstdc++'s introselect / introsort / heap select, as ATen's topk_impl_loop runs
    them) puts ties, NaN and -inf in torch.topk's columns, sorted or not, for every k."""
    lib = K.library()
    rng = random.Random(0)
    for it in range(1500):
        rows, n = rng.randint(1, 3), rng.randint(1, 300)
        k = rng.randint(1, n if it % 3 == 0 else min(n, 12))
        ordered = rng.random() < 0.5
        g = torch.Generator().manual_seed(it)
        kind = it % 5
        v = torch.randn(rows, n, generator=g)
        if kind == 0:
            v = torch.randint(0, 3, (rows, n), generator=g).float()
        elif kind == 1:
            v[torch.rand(rows, n, generator=g) < 0.5] = float("-inf")
        elif kind == 2:
            v = v.round()
            v[torch.rand(rows, n, generator=g) < 0.1] = float("nan")
        elif kind == 3:
            v = v.to(torch.bfloat16)
        want = torch.topk(v, k, dim=-1, sorted=ordered).indices
        got = torch.empty(rows, k, dtype=torch.int64)
        vf = v.float().contiguous()
        assert lib.xshare_cpu_topk(rows, n, k, int(ordered), vf.data_ptr(), got.data_ptr()) == 0
        assert torch.equal(got, want), (it, rows, n, k, ordered, kind)


def test_supports_what_it_routes():
    spec, e, k = FAMILIES["deepseek_v3"][0](), 64, 6
    x = torch.randn(4, e)
    gs = router_scores(x, spec)
    call = LayerCall(x, k, spec)

    def ok(c: LayerCall, cfg: SelectorConfig, scores: object = gs) -> bool:
        return cpu_router_supports(c, layer_config(cfg, spec), scores)

    assert ok(call, SelectorConfig(policy="xshare", budget=8))
    assert ok(call, SelectorConfig(policy="topk"))
    assert ok(call, SelectorConfig(policy="des_vote", budget=8))  # a set policy: its set in torch
    assert not ok(call, SelectorConfig(policy="xshare", budget=8, target_mass=0.9))  # mass targets: torch
    assert not ok(call, SelectorConfig(policy="xshare_ep", budget=8))  # needs a placement
    assert not ok(call, SelectorConfig(policy="des_seq", warmup_k=1))  # per-request sets
    assert not ok(LayerCall(x, k, spec, all_reduce=lambda t: t), SelectorConfig(policy="xshare", budget=8))
    assert not ok(LayerCall(x, k, spec, engine_ids=torch.zeros(4, 2, dtype=torch.int64)),
                  SelectorConfig(policy="xshare", budget=8))  # fewer engine picks than top_k
    x64 = x.double()
    assert not ok(LayerCall(x64, k, spec), SelectorConfig(policy="xshare", budget=8), router_scores(x64, spec))
    # a float64 gate goes to the torch path and still routes
    out = decide(LayerCall(x64, k, spec), SelectorConfig(policy="xshare", budget=8), cpu_kernel=True)
    assert out.cpu is None and out.routing.topk_ids.shape == (4, k)


def test_bad_input_is_named():
    spec, e, k = FAMILIES["auxfree_tiny"][0](), 32, 4
    x = torch.randn(4, e)
    cfg = SelectorConfig(policy="xshare", budget=8, warmup_k=2)
    with pytest.raises(ValueError, match="warmup_k"):
        decide(LayerCall(x, 1, spec), cfg, cpu_kernel=True)
    with pytest.raises(ValueError, match="exact"):
        decide(LayerCall(x, k, spec, exact=torch.zeros(3, dtype=torch.bool)), cfg, cpu_kernel=True)
    with pytest.raises(RuntimeError, match="id"):  # an engine pick > E
        decide(LayerCall(x, k, spec, engine_ids=torch.full((4, k), e + 3)), cfg, cpu_kernel=True)


def _topk_config(spec: RouterSpec, top_k: int) -> SimpleNamespace:
    """A duck-typed SGLang TopKConfig of ``spec`` (what the adapter reads)."""
    grouped = spec.num_expert_group is not None
    shared = spec.num_fused_shared_experts
    return SimpleNamespace(top_k=top_k + shared, num_shared_topk_slots=shared, allow_routed_experts_capture=True,
                           scoring_func=spec.scoring, renormalize=spec.renormalize,
                           custom_routing_function=None, correction_bias=spec.correction_bias,
                           use_grouped_topk=grouped, num_expert_group=spec.num_expert_group,
                           topk_group=spec.topk_group, routed_scaling_factor=spec.routed_scaling_factor,
                           apply_routed_scaling_factor_on_output=spec.scaling_in_weights,
                           fused_shared_experts_scaling_factor=spec.fused_shared_experts_scaling_factor)


@pytest.mark.parametrize("family", ["auxfree_tiny", "deepseek_v3", "deepseek_v2", "minimax_m2", "sqrtsoftplus"])
@pytest.mark.parametrize("padded", [False, True])
def test_adapter_paths_agree(family, padded):
    """The serving adapter with the fast path on and off: the same outputs, counters, short rows and
    metric rows on a router-spec layer."""
    build, e, k = FAMILIES[family]
    spec = build()
    cfg = _topk_config(spec, k)
    runtimes = []
    for fast in (True, False):
        r = rt.ProcessState(PluginSettings(enabled=True, cpu_kernel=fast, sim_gpus=4,
                                      selector=SelectorConfig(policy="xshare", budget=max(k, e // 4), warmup_k=1)))
        r.observe = True
        r.push(rt.ForwardState(mode="decode"))
        runtimes.append(r)
    g = torch.Generator().manual_seed(2)
    for step in range(12):
        x = (torch.randn(16, e, generator=g) * 2).round(decimals=1)
        own = reference_route(x, k, spec)
        args = {"topk_ids": own.topk_ids, "topk_weights": own.topk_weights, "router_logits": x,
                "layer_id": step % 3, "num_token_non_padded": torch.tensor(11) if padded else None}
        outs = [layer.route(r, dict(args), topk_config=cfg) for r in runtimes]
        assert outs[0] is not None and outs[1] is not None
        assert torch.equal(outs[0]["topk_ids"], outs[1]["topk_ids"])
        assert torch.equal(outs[0]["topk_weights"], outs[1]["topk_weights"])
    snaps = [r.stats.snapshot() for r in runtimes]
    assert snaps[0]["fallbacks_total"] == snaps[1]["fallbacks_total"] == 0, snaps
    assert snaps[0]["layers"] == snaps[1]["layers"] and snaps[0]["applied"] == 12
    assert snaps[0]["short_rows"] == snaps[1]["short_rows"]
    torch.testing.assert_close(runtimes[0].stats.drain_window(), runtimes[1].stats.drain_window(),
                               rtol=1e-5, atol=1e-6)
