"""xshare.selection.routers against SGLang 0.5.23's own routing code (imported from the venv, not mocked).

With every expert allowed, reference_route must equal SGLang's gates bit for bit (ids, column order,
weights) for fp32 and bf16 logits, exact ties included: the eager fused_topk_torch_native, the
torch.compile'd grouped_topk_gpu / biased_grouped_topk_impl / Llama4MoE.custom_routing_function, and
select_experts with a TopKConfig (the CPU path, torch_native=True). With a restriction, the routed
experts of a non-short row are allowed, use at most topk_group groups, are the best usable experts of
the best usable groups (brute force), and carry the rule's weights; short rows equal the unrestricted
routing.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import require_module

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.configs.shared_experts import SharedExpertsConfig  # noqa: E402
from sglang.srt.models.llama4 import Llama4MoE  # noqa: E402

from xshare.selection.routers.gate import GateRouting, reference_route, router_scores  # noqa: E402
from xshare.selection.routers.numerics import inductor_row_sum, vector_sigmoid  # noqa: E402
from xshare.selection.routers.spec import RouterSpec, routed_top_k  # noqa: E402
from xshare.selection.types import RENORMALIZE_EPS  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
T = 300  # tokens per batch (not 0 or 1: torch.compile specialises those sizes)


@pytest.fixture(autouse=True, scope="module")
def _room_for_recompiles():
    """Each SGLang gate here is compiled for several configurations and dtypes; past Dynamo's limit
    (8) SGLang's function would silently run eagerly and no longer be the code under test."""
    config = torch._dynamo.config
    old = config.recompile_limit
    config.recompile_limit = 64
    yield
    config.recompile_limit = old


def make_logits(num_rows, num_experts, dtype, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, num_experts, generator=g) * 2.0
    if ties:  # quantised: many exact ties inside every row
        x = (x * 2).round() / 2
    return x.to(dtype)


def make_bias(num_experts, seed, ties=False):
    g = torch.Generator().manual_seed(seed + 1000)
    b = torch.randn(num_experts, generator=g) * 0.1
    return (b * 20).round() / 20 if ties else b


def hidden(num_rows, dtype=torch.float32):
    return torch.zeros(num_rows, 4, dtype=dtype)


def assert_same(route, weights, ids):
    assert isinstance(route, GateRouting)
    assert route.topk_ids.dtype == torch.int32 and route.topk_weights.dtype == torch.float32
    assert torch.equal(route.topk_ids, ids.to(torch.int32)), "ids or column order differ from SGLang"
    assert torch.equal(route.topk_weights, weights.to(torch.float32)), (
        f"weights differ from SGLang in {(route.topk_weights != weights.float()).sum().item()} entries")
    assert not route.short.any()


def assert_identity(x, top_k, spec):
    """allowed = all (1-D and 2-D) is allowed=None, bit for bit."""
    base = reference_route(x, top_k, spec)
    for allowed in (torch.ones(x.shape[1], dtype=torch.bool), torch.ones(x.shape, dtype=torch.bool)):
        r = reference_route(x, top_k, spec, allowed)
        assert torch.equal(r.topk_ids, base.topk_ids) and torch.equal(r.topk_weights, base.topk_weights)
        assert not r.short.any()


# ------------------------------------------------------------------------------------------------
# allowed = all: SGLang's own output, bit for bit
# ------------------------------------------------------------------------------------------------

PLAIN = [  # (scoring, bias, renormalize): Qwen3/Mixtral/OLMoE, sigmoid top-k, MiniMax-M2, Ernie/LongCat, DSV4
    ("softmax", False, True),
    ("softmax", False, False),
    ("sigmoid", False, True),
    ("sigmoid", True, True),
    ("sigmoid", True, False),
    ("softmax", True, True),
    ("sqrtsoftplus", True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scoring,bias,renorm", PLAIN)
def test_plain_equals_fused_topk_torch_native(scoring, bias, renorm, ties, dtype):
    x = make_logits(T, 64, dtype, ties, seed=1)
    b = make_bias(64, 1, ties) if bias else None
    w, i = topk.fused_topk_torch_native(hidden(T), x, 6, renorm, correction_bias=b, scoring_func=scoring)
    spec = RouterSpec(scoring=scoring, correction_bias=b, renormalize=renorm)
    assert_same(reference_route(x, 6, spec), w, i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_through_select_experts(dtype):
    """TopKConfig -> select_experts (torch_native, as TopK.forward_native on the CPU), incl. the fold of
    the routed scaling factor into the weights (MiniMax-M3 style) and a [1, E] bias."""
    x = make_logits(T, 128, dtype, True, seed=2)
    for cfg in (
        topk.TopKConfig(top_k=8, renormalize=True, torch_native=True),  # Qwen3-MoE
        topk.TopKConfig(top_k=8, renormalize=True, torch_native=True, scoring_func="sigmoid",
                        correction_bias=make_bias(128, 2), routed_scaling_factor=2.5,
                        apply_routed_scaling_factor_on_output=True),
    ):
        out = topk.select_experts(hidden(T), x, cfg)
        spec = RouterSpec.from_topk_config(cfg)
        assert_same(reference_route(x, routed_top_k(cfg), spec), out.topk_weights, out.topk_ids)
    flat = RouterSpec(scoring="sigmoid", correction_bias=make_bias(128, 2).view(1, -1))
    assert flat.correction_bias.shape == (128,)


BIASED = [  # (E, groups, keep, top_k, shared, renormalize, scaling_in_weights)
    (256, 8, 4, 8, 1, True, False),  # DeepSeek-V3/R1 with the fused shared slot
    (16, 4, 2, 3, 0, True, True),  # small grouped, factor inside the weights
    (384, 1, 1, 8, 0, False, True),  # one group (GLM-4.5 / Kimi-K2 code path), Kimi-K2's 384 experts
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,G,keep,k,shared,renorm,inw", BIASED)
def test_biased_grouped_equals_sglang(E, G, keep, k, shared, renorm, inw, dtype):
    x = make_logits(T, E, dtype, True, seed=3)
    b = make_bias(E, 3, ties=True)
    cfg = topk.TopKConfig(top_k=k + shared, use_grouped_topk=True, num_expert_group=G, topk_group=keep,
                          renormalize=renorm, torch_native=True, correction_bias=b, routed_scaling_factor=2.5,
                          apply_routed_scaling_factor_on_output=inw,
                          shared_experts=SharedExpertsConfig(num_fused_shared_experts=shared),
                          fused_shared_experts_scaling_factor=0.5 if shared else None)  # 1 / ep_size
    out = topk.select_experts(hidden(T), x, cfg)  # -> biased_grouped_topk_gpu -> biased_grouped_topk_impl
    spec = RouterSpec.from_topk_config(cfg)
    assert spec.gate == "biased_grouped" and spec.num_fused_shared_experts == shared
    route = reference_route(x, k, spec)
    assert_same(route, out.topk_weights, out.topk_ids)
    assert_identity(x, k, spec)
    if shared:
        assert (route.topk_ids[:, -1] == E).all()


GROUPED = [  # (scoring, E, groups, keep, top_k, shared, renormalize, factor, scaling_in_weights)
    ("softmax", 160, 8, 3, 6, 0, False, 16.0, False),  # DeepSeek-V2
    ("sigmoid", 64, 8, 4, 6, 1, True, 2.5, True),
]


@pytest.mark.parametrize("scoring,E,G,keep,k,shared,renorm,rsf,inw,dtype",
                         [(*GROUPED[0], dtype) for dtype in DTYPES] + [(*GROUPED[1], torch.float32)])
def test_grouped_equals_grouped_topk_gpu(scoring, E, G, keep, k, shared, renorm, rsf, inw, dtype):
    x = make_logits(T, E, dtype, True, seed=5)
    w, i = topk.grouped_topk_gpu(hidden(T), x, k + shared, renorm, G, keep, num_fused_shared_experts=shared,
                                 routed_scaling_factor=rsf, apply_routed_scaling_factor_on_output=inw,
                                 scoring_func=scoring)
    spec = RouterSpec(scoring=scoring, num_expert_group=G, topk_group=keep, renormalize=renorm,
                      routed_scaling_factor=rsf, scaling_in_weights=inw, num_fused_shared_experts=shared)
    assert_same(reference_route(x, k, spec), w, i)
    assert_identity(x, k, spec)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama4_custom_routing_function(dtype):
    x = make_logits(T, 16, dtype, True, seed=6)
    cfg = topk.TopKConfig(top_k=1, renormalize=False, torch_native=True,
                          custom_routing_function=Llama4MoE.custom_routing_function)
    out = topk.select_experts(hidden(T, dtype), x, cfg)
    spec = RouterSpec.from_topk_config(cfg, weight_dtype=dtype)
    assert spec.gate == "llama4"
    assert_same(reference_route(x, 1, spec), out.topk_weights, out.topk_ids)
    assert_identity(x, 1, spec)


def test_numeric_helpers():
    """inductor_row_sum adds in the lane order it documents; vector_sigmoid is ATen's sigmoid."""
    import numpy as np

    from xshare.selection.routers.numerics import inductor_lanes

    x = make_logits(T, 11, torch.float32, False, seed=7).abs()
    got = inductor_row_sum(x)
    assert got.shape == (T, 1) and got.dtype == torch.float32
    lanes = inductor_lanes(x.device)
    if lanes is None:
        assert torch.equal(got, x.sum(-1, keepdim=True))
    else:
        a = np.zeros((T, -(-11 // lanes) * lanes), dtype=np.float32)
        a[:, :11] = x.numpy()
        acc = a[:, :lanes].copy()
        for start in range(lanes, a.shape[1], lanes):
            acc = (acc + a[:, start:start + lanes]).astype(np.float32)
        while acc.shape[1] > 1:
            half = acc.shape[1] // 2
            acc = (acc[:, :half] + acc[:, half:]).astype(np.float32)
        assert np.array_equal(got.numpy(), acc)
    y = make_logits(64, 64, torch.float32, False, seed=8)  # a multiple of 64 elements: all vector anyway
    assert torch.equal(vector_sigmoid(y), y.sigmoid())
    torch.testing.assert_close(vector_sigmoid(y[:, :37]), y[:, :37].sigmoid(), rtol=2e-7, atol=0)


def test_rounded_constants_are_torchs_casts_without_a_tensor():
    """rounded() (the shared slot's constant weight) equals torch's cast of a Python float for every
    float dtype, signed zeros, overflow and NaN included, and creates no tensor (it runs inside captured
    calls)."""
    import random

    from xshare.selection.routers.numerics import rounded

    rng = random.Random(0)
    values = [0.0, -0.0, 1 / 3, 2.5, 1e-40, 1e40, -1e40, 65504.0, 65520.0, 3.3961775e38, math.inf, math.nan]
    values += [rng.gauss(0, 1) * 10 ** rng.randint(-45, 39) for _ in range(3000)]
    made = []
    real = torch.tensor
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        want = [real(v, dtype=dtype).item() for v in values]
        torch.tensor = lambda *a, **k: made.append(a) or real(*a, **k)  # noqa: B023
        try:
            got = [rounded(v, dtype) for v in values]
        finally:
            torch.tensor = real
        for v, a, b in zip(values, got, want, strict=True):
            assert (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b)), \
                (dtype, v, a, b)
    assert made == []


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_tiny_batches_and_eager_mode(rows):
    """Empty and one-token batches; exact=False (eager softmax) picks the same experts here."""
    exact = rows > 1  # keep the compiled softmax to the shapes it already has
    for spec, E, k in (FAMILIES["dsv2_grouped_softmax"][0](32), 32, 3), (FAMILIES["dsv3_biased_grouped"][0](16), 16, 3):
        x = make_logits(rows, E, torch.float32, False, seed=13)
        r = reference_route(x, k, spec, torch.ones(E, dtype=torch.bool), exact=exact)
        assert r.topk_ids.shape == (rows, k + spec.num_fused_shared_experts) and r.short.shape == (rows,)
        loose = reference_route(x, k, spec, exact=False)
        assert torch.equal(loose.topk_ids, r.topk_ids)
        torch.testing.assert_close(loose.topk_weights, r.topk_weights, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Restriction to allowed experts
# ------------------------------------------------------------------------------------------------

FAMILIES = {
    "softmax_topk": (lambda E: RouterSpec(scoring="softmax"), 16, 4),
    "sigmoid_bias": (lambda E: RouterSpec(scoring="sigmoid", correction_bias=make_bias(E, 8)), 16, 4),
    "dsv2_grouped_softmax": (lambda E: RouterSpec(scoring="softmax", num_expert_group=8, topk_group=3,
                                                  renormalize=False, routed_scaling_factor=16.0), 32, 3),
    "dsv3_biased_grouped": (lambda E: RouterSpec(scoring="sigmoid", correction_bias=make_bias(E, 9),
                                                 num_expert_group=4, topk_group=2, routed_scaling_factor=2.5,
                                                 num_fused_shared_experts=1), 16, 3),
    "glm_one_group": (lambda E: RouterSpec(scoring="sigmoid", correction_bias=make_bias(E, 10), num_expert_group=1,
                                           topk_group=1, routed_scaling_factor=2.5, scaling_in_weights=True), 16, 4),
    "llama4": (lambda E: RouterSpec(scoring="sigmoid", renormalize=False, custom="llama4"), 16, 1),
}


def brute_force(choice, allowed, spec, top_k):
    """Per token, by hand: (selected groups, routed set) or None when the row is short; 'tie' when a tie
    at a cut makes the answer not unique."""
    E = choice.shape[0]
    usable = [e for e in range(E) if allowed[e] and choice[e] > -math.inf]
    groups = spec.num_expert_group
    if groups is None:
        cand = usable
        chosen_groups = None
    else:
        per = E // groups
        score = {}
        for g in range(groups):
            vals = sorted((choice[e].item() for e in usable if e // per == g), reverse=True)
            if vals:
                score[g] = max(vals) if spec.gate == "grouped" else sum(vals[:2])
        order = sorted(score, key=lambda g: -score[g])
        keep = order[:spec.topk_group]
        if len(order) > len(keep) and score[order[len(keep)]] == score[keep[-1]]:
            return "tie"
        chosen_groups = set(keep)
        cand = [e for e in usable if e // per in chosen_groups]
    if len(cand) < top_k:
        return None
    ranked = sorted(cand, key=lambda e: -choice[e].item())
    if len(ranked) > top_k and choice[ranked[top_k]] == choice[ranked[top_k - 1]]:
        return "tie"
    return chosen_groups, set(ranked[:top_k])


def expected_weights(affinity_row, ids, spec):
    w = affinity_row[ids].double()
    if spec.renormalize:
        w = w / (w.sum() + RENORMALIZE_EPS)
    if spec.scaling_in_weights:
        w = w * spec.routed_scaling_factor
    return w


@st.composite
def restrictions(draw):
    name = draw(st.sampled_from(sorted(FAMILIES)))
    make, E, k = FAMILIES[name]
    rows = draw(st.integers(2, 6))
    ties = draw(st.booleans())
    x = make_logits(rows, E, torch.float32, ties, seed=draw(st.integers(0, 10_000)))
    if draw(st.booleans()):
        flags = draw(st.lists(st.booleans(), min_size=E, max_size=E))
        allowed = torch.tensor(flags)
    else:
        flags = draw(st.lists(st.booleans(), min_size=rows * E, max_size=rows * E))
        allowed = torch.tensor(flags).view(rows, E)
    return name, make(E), x, k, allowed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(restrictions())
def test_restricted_routing_follows_the_rule(case):
    name, spec, x, k, allowed = case
    E = x.shape[1]
    rows = x.shape[0]
    full = reference_route(x, k, spec)
    r = reference_route(x, k, spec, allowed)
    scores = router_scores(x, spec)
    mask = allowed.expand(rows, E)
    shared = spec.num_fused_shared_experts
    assert r.topk_ids.shape == (rows, k + shared) and r.short.shape == (rows,)
    for t in range(rows):
        ids = r.topk_ids[t].long()
        if r.short[t] or mask[t].all():  # short rows, and unrestricted rows: SGLang's routing of the row
            assert torch.equal(r.topk_ids[t], full.topk_ids[t]) and torch.equal(r.topk_weights[t], full.topk_weights[t])
        if shared:
            assert ids[-1] == E
        routed = ids[:k]
        expect = brute_force(scores.choice[t], mask[t], spec, k)
        if r.short[t]:
            assert expect in (None, "tie"), f"{name}: row {t} short but could be filled"
            continue
        assert expect is not None, f"{name}: row {t} should be short"
        assert mask[t][routed].all(), f"{name}: a routed expert is not allowed"
        assert len(set(routed.tolist())) == k
        assert (scores.choice[t][routed] > -math.inf).all()
        if spec.num_expert_group is not None:
            per = E // spec.num_expert_group
            assert len({e // per for e in routed.tolist()}) <= spec.topk_group
        if expect != "tie":
            chosen_groups, chosen = expect
            assert set(routed.tolist()) == chosen, f"{name}: row {t} routes {routed.tolist()}, expected {chosen}"
        torch.testing.assert_close(r.topk_weights[t][:k].double(), expected_weights(scores.affinity[t], routed, spec),
                                   rtol=1e-6, atol=0)


def test_short_rows_fall_back_to_the_unrestricted_gate():
    spec = RouterSpec(scoring="sigmoid", correction_bias=make_bias(16, 11), num_expert_group=4, topk_group=2)
    x = make_logits(8, 16, torch.float32, False, seed=11)
    allowed = torch.zeros(8, 16, dtype=torch.bool)
    allowed[:4, :] = True
    allowed[:4, 0] = False  # rows 0-3: restricted but fillable
    allowed[4:, :2] = True  # rows 4-7: two experts, top_k = 3: short
    r = reference_route(x, 3, spec, allowed)
    full = reference_route(x, 3, spec)
    assert r.short.tolist() == [False] * 4 + [True] * 4
    assert torch.equal(r.topk_ids[4:], full.topk_ids[4:])
    assert not (r.topk_ids[:4] == 0).any()


def test_one_expert_groups_score_alone():
    """DeepSeek's group score (sum of the two best biased scores) over a group reduced to one allowed
    expert is that expert's score: the group is still chosen when it is the best."""
    spec = RouterSpec(scoring="sigmoid", correction_bias=torch.zeros(8), num_expert_group=4, topk_group=1)
    x = torch.full((1, 8), -4.0)
    x[0, 0], x[0, 2], x[0, 3] = 6.0, -1.0, -1.0  # group 0 = {0, 1}: 0.998 alone; group 1 = {2, 3}: 0.54
    allowed = torch.tensor([True, False, True, True, False, False, False, False])
    r = reference_route(x, 1, spec, allowed)
    assert r.topk_ids.tolist() == [[0]] and not r.short.any()
    r2 = reference_route(x, 2, spec, allowed)  # group 0 is best but holds one allowed expert: short
    assert r2.short.tolist() == [True]


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_scores_match_sglang(dtype):
    """reachable holds SGLang's routed experts; affinity/choice are what SGLang weights and ranks."""
    E, G, keep, k = 64, 8, 4, 6  # the compiled configuration of test_biased_grouped_equals_sglang[16-...]
    x = make_logits(T, E, dtype, False, seed=12)
    b = make_bias(E, 12)
    w, i = topk.biased_grouped_topk_impl(hidden(T), x, b, k, True, G, keep, routed_scaling_factor=2.5,
                                         apply_routed_scaling_factor_on_output=True)
    spec = RouterSpec(scoring="sigmoid", correction_bias=b, num_expert_group=G, topk_group=keep,
                      routed_scaling_factor=2.5, scaling_in_weights=True)
    s = router_scores(x, spec)
    assert s.affinity.dtype == s.choice.dtype == torch.float32 and s.reachable.dtype == torch.bool
    assert s.reachable.gather(1, i.long()).all()
    assert (s.reachable.sum(-1) == keep * E // G).all()
    assert torch.equal(s.affinity, x.float().sigmoid().to(dtype).float())
    assert torch.equal(s.choice, (x.float().sigmoid() + b).float()) or dtype == torch.bfloat16
    picked = s.affinity.gather(1, i.long()).double()
    torch.testing.assert_close(w.double(), picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(scoring="relu"), "scoring"),
    (dict(correction_bias=torch.zeros(2, 3)), "correction_bias"),
    (dict(correction_bias=torch.tensor([0.0, float("nan")])), "correction_bias"),
    (dict(num_expert_group=4), "topk_group"),
    (dict(num_expert_group=4, topk_group=5), "topk_group"),
    (dict(num_expert_group=0, topk_group=1), "num_expert_group"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor"),
    (dict(scaling_in_weights=True), "scaling_in_weights"),
    (dict(num_fused_shared_experts=2, num_expert_group=1, topk_group=1), "num_fused_shared_experts"),
    (dict(num_fused_shared_experts=1), "num_fused_shared_experts"),
    (dict(custom="phimoe"), "custom"),
    (dict(custom="llama4", scoring="sigmoid"), "renormalize"),
    (dict(weight_dtype=torch.bfloat16), "weight_dtype"),
    (dict(renormalize=1), "renormalize"),
    (dict(correction_bias=torch.zeros(8), num_expert_group=2, topk_group=1, scoring="softmax"), "scoring"),
])
def test_spec_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RouterSpec(**kwargs)


def test_route_errors_name_the_argument():
    spec = RouterSpec(scoring="sigmoid", correction_bias=torch.zeros(8), num_expert_group=4, topk_group=1)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="router_logits"):
        reference_route(x[0], 2, spec)
    with pytest.raises(ValueError, match="top_k"):
        reference_route(x, 3, spec)  # one group of 2 experts cannot hold 3
    with pytest.raises(ValueError, match="top_k"):
        reference_route(x, 0, spec)
    with pytest.raises(ValueError, match="correction_bias"):
        reference_route(torch.randn(3, 16), 2, spec)
    with pytest.raises(ValueError, match="allowed"):
        reference_route(x, 2, spec, torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="allowed"):
        reference_route(x, 2, spec, torch.ones(8))
    with pytest.raises(ValueError, match="spec"):
        reference_route(x, 2, "deepseek")
    with pytest.raises(ValueError, match="custom_routing_function"):
        RouterSpec.from_topk_config(topk.TopKConfig(top_k=2, custom_routing_function=lambda **kw: None))
