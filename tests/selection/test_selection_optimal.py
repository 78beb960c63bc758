"""Property tests: the XShare sets are EXACT optima (brute force on small instances, E <= 10),
and the refinement routes each token to its best experts inside the set."""

import itertools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xshare.selection import Placement, SelectorConfig, select
from xshare.selection.backends.reference import prepare_batch
from xshare.selection.call import LayerCall
from xshare.selection.policies.xshare import xshare_set
from xshare.selection.policies.xshare_ep import xshare_ep_set
from xshare.selection.policies.xshare_spec import xshare_spec_sets

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw, max_e=10):
    e = draw(st.integers(2, max_e))
    t = draw(st.integers(1, 8))
    top_k = draw(st.integers(1, min(e, 4)))
    warmup_k = draw(st.integers(0, top_k))
    budget = draw(st.integers(1, e))
    if draw(st.booleans()):  # many exact ties
        vals = draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=t * e, max_size=t * e))
    else:
        vals = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=t * e, max_size=t * e))
    logits = torch.tensor(vals, dtype=torch.float32).reshape(t, e)
    holes = draw(st.lists(st.booleans(), min_size=t * e, max_size=t * e))
    if draw(st.booleans()):
        logits[torch.tensor(holes).reshape(t, e)] = float("-inf")
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    return logits, top_k, warmup_k, budget, scoring


def _subsets(e):
    for r in range(e + 1):
        for combo in itertools.combinations(range(e), r):
            mask = torch.zeros(e, dtype=torch.bool)
            mask[list(combo)] = True
            yield mask


def _brute_force(gain, forced, limit, feasible=lambda s: True, allowed=None):
    best = None
    for s in _subsets(gain.numel()):
        if (forced & ~s).any() or int(s.sum()) > limit or not feasible(s):
            continue
        if allowed is not None and (s & ~allowed).any():
            continue
        v = float(gain[s].sum())
        best = v if best is None else max(best, v)
    return best


def _check_routing(batch, routing, preferred_sets):
    """Token t's ids are the first top_k of its order by (tier, score desc, index asc)."""
    for t in range(batch.num_tokens):
        def key(e, t=t):
            usable = bool(batch.usable[t, e])
            tier = 0
            if usable:
                tier = 1
                for i, s in enumerate(preferred_sets):
                    row = s[t] if s.ndim == 2 else s
                    if bool(row[e]):
                        tier = len(preferred_sets) + 1 - i
                        break
            return (-tier, -float(batch.scores[t, e]), e)
        want = sorted(range(batch.num_experts), key=key)[: batch.top_k]
        assert routing.topk_ids[t].tolist() == want


@SETTINGS
@given(instances())
def test_xshare_set_is_exact_optimum(inst):
    logits, top_k, warmup_k, budget, scoring = inst
    cfg = SelectorConfig(policy="xshare", budget=budget, warmup_k=warmup_k, scoring=scoring)
    batch = prepare_batch(LayerCall(logits, top_k), cfg)
    s = xshare_set(batch)
    w = batch.warmup()
    gain = batch.column_sums()
    limit = max(budget, int(w.sum()))
    assert not (w & ~s).any() and int(s.sum()) <= limit
    best = _brute_force(gain, w, limit)
    assert abs(float(gain[s].sum()) - best) <= 1e-5 * max(1.0, best)
    _check_routing(batch, select(logits, top_k, cfg), [s])


def _ep_case(logits, top_k, warmup_k, budget, scoring, gpus, data, **cfg_kw):
    """An xshare_ep instance: a drawn expert -> GPU map and cap; (config, placement, batch, its set, its
    warm-up, the feasibility test of a set under the per-GPU caps)."""
    e = logits.shape[1]
    expert_gpu = torch.tensor(data.draw(st.lists(st.integers(0, gpus - 1), min_size=e, max_size=e)))
    cap = data.draw(st.one_of(st.none(), st.integers(1, e)))
    cfg = SelectorConfig(policy="xshare_ep", budget=budget, warmup_k=warmup_k, gpu_cap=cap, scoring=scoring,
                         **cfg_kw)
    placement = Placement.from_expert_gpu(expert_gpu, num_gpus=gpus)
    batch = prepare_batch(LayerCall(logits, top_k, placement=placement), cfg)
    s = xshare_ep_set(batch)
    w = batch.warmup()
    c = cap if cap is not None else -(-budget // gpus)
    caps = [max(c, int((w & (expert_gpu == g)).sum())) for g in range(gpus)]

    def feasible(sel):
        return all(int((sel & (expert_gpu == g)).sum()) <= caps[g] for g in range(gpus))

    return cfg, placement, batch, s, w, feasible


@SETTINGS
@given(instances(), st.integers(1, 4), st.data())
def test_xshare_ep_set_is_exact_optimum(inst, gpus, data):
    logits, top_k, warmup_k, budget, scoring = inst
    cfg, placement, batch, s, w, feasible = _ep_case(logits, top_k, warmup_k, budget, scoring, gpus, data)

    limit = max(budget, int(w.sum()))
    assert not (w & ~s).any() and int(s.sum()) <= limit and feasible(s)
    gain = batch.column_sums()
    best = _brute_force(gain, w, limit, feasible)
    assert abs(float(gain[s].sum()) - best) <= 1e-5 * max(1.0, best)
    _check_routing(batch, select(logits, top_k, cfg, placement=placement), [s])


@SETTINGS
@given(instances(max_e=8), st.data())
def test_xshare_spec_sets_are_exact_optima(inst, data):
    logits, top_k, warmup_k, budget, scoring = inst
    t, e = logits.shape
    groups = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=t, max_size=t)))
    m_r = data.draw(st.integers(1, e))
    anchor = data.draw(st.one_of(st.none(), st.integers(0, top_k)))
    cfg = SelectorConfig(policy="xshare_spec", budget=budget, group_budget=m_r, warmup_k=warmup_k, scoring=scoring,
                         anchor_k=anchor)
    batch = prepare_batch(LayerCall(logits, top_k, groups=groups), cfg)
    s_r, s = xshare_spec_sets(batch)
    own = batch.own_topk(warmup_k)  # W_r: the rows' top-k0, and a multi-row request's first row its top anchor_k
    for g in groups.unique().tolist():
        rows = (groups == g).nonzero().flatten()
        if rows.numel() > 1:
            own[rows[0]] = batch.own_topk(max(top_k if anchor is None else anchor, warmup_k))[rows[0]]
    for g in groups.unique().tolist():
        rows = groups == g
        assert (s_r[rows] == s_r[rows][0]).all()  # one set per request
        w_g = own[rows].any(0)
        gain = batch.scores[rows].sum(0)
        limit = max(m_r, int(w_g.sum()))
        sel = s_r[rows][0]
        assert not (w_g & ~sel).any() and int(sel.sum()) <= limit
        best = _brute_force(gain, w_g, limit)
        assert abs(float(gain[sel].sum()) - best) <= 1e-5 * max(1.0, best)
    union = s_r.any(0)
    w = own.any(0)
    limit = max(budget, int(w.sum()))
    assert not (w & ~s).any() and not (s & ~union).any() and int(s.sum()) <= limit
    gain = batch.column_sums()
    best = _brute_force(gain, w, limit, allowed=union)
    assert abs(float(gain[s].sum()) - best) <= 1e-5 * max(1.0, best)
    _check_routing(batch, select(logits, top_k, cfg, groups=groups), [s_r & s.unsqueeze(0), s])


def test_xshare_ep_lowers_peak_gpu_load():
    torch.manual_seed(0)
    logits = torch.randn(16, 64) * 2
    placement = Placement.contiguous(64, 8)
    gpu = placement.primary_gpu

    def peak(r):
        return max(int((r.active & (gpu == g)).sum()) for g in range(8))

    vanilla = select(logits, 6, SelectorConfig(policy="topk", budget=1))
    plain = select(logits, 6, SelectorConfig(policy="xshare", budget=32))
    ep = select(logits, 6, SelectorConfig(policy="xshare_ep", budget=32, gpu_cap=4), placement=placement)
    assert peak(ep) <= 4 < peak(vanilla)
    assert peak(ep) <= peak(plain)


def test_replicas_go_to_least_loaded_gpu():
    # 4 experts on 2 GPUs; expert 3 has a second replica on GPU 1
    placement = Placement.from_replica_gpus(torch.tensor([[0, -1], [0, -1], [1, -1], [0, 1]]))
    assert placement.has_replicas and placement.num_gpus == 2
    logits = torch.tensor([[5.0, 4.0, -9.0, 3.0], [4.0, 5.0, -9.0, 3.0]])
    cfg = SelectorConfig(policy="xshare_ep", budget=4, gpu_cap=4)
    r = select(logits, 3, cfg, placement=placement)
    assert r.physical_ids is not None
    slot_gpu = placement.slot_gpu[r.physical_ids.long()]
    expert3 = r.topk_ids == 3
    # GPU 0 holds experts 0 and 1 (active, single replica); GPU 1 holds nothing active: expert 3 goes there
    assert (slot_gpu[expert3] == 1).all()
    assert torch.equal(placement.slot_expert[r.physical_ids.long()], r.topk_ids.long())
    # vanilla spreads a replicated expert's tokens over its replicas (row modulo), like SGLang
    v = select(logits, 3, SelectorConfig(policy="topk", budget=1), placement=placement)
    assert set(placement.slot_gpu[v.physical_ids.long()][v.topk_ids == 3].tolist()) == {0, 1}


def test_placement_from_sglang_physical_layout():
    phy2log = torch.tensor([0, 1, 2, 3, 0, 1, 4, 5])  # 6 logical experts, 2 redundant, 2 GPUs
    p = Placement.from_physical(phy2log, num_gpus=2)
    assert p.num_experts == 6 and p.num_slots == 8
    assert p.replicas[0].tolist() == [0, 4] and p.replica_gpu[0].tolist() == [0, 1]
    assert p.replicas[2].tolist() == [2, -1] and p.primary_gpu.tolist() == [0, 0, 0, 0, 1, 1]


# Biased and grouped routers (DeepSeek-V3 / GLM-4.5 / DeepSeek-V2): the set objective is the batch's
# affinity over each token's reachable experts (docs/selection.md, "Router families"), the warm-up is
# each token's top-k0 by the router's own choice score; the set is still the exact optimum.
@st.composite
def router_instances(draw):
    from xshare.selection.routers.spec import RouterSpec

    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.sampled_from([2, 3]) if groups > 1 else st.sampled_from([4, 6, 8]))
    e = groups * per_group
    keep = draw(st.integers(1, groups))
    top_k = draw(st.integers(1, min(4, keep * per_group)))
    biased = draw(st.booleans())
    t = draw(st.integers(1, 8))
    vals = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=t * e, max_size=t * e))
    logits = torch.tensor(vals, dtype=torch.float32).reshape(t, e)
    if biased:
        bias = torch.tensor(draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=e, max_size=e)))
        spec = RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=groups, topk_group=keep,
                          routed_scaling_factor=2.5)
    else:
        spec = RouterSpec(scoring="softmax", num_expert_group=groups, topk_group=keep, renormalize=False)
    warmup_k = draw(st.integers(0, top_k))
    budget = draw(st.integers(1, e))
    return logits, spec, top_k, warmup_k, budget


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(router_instances())
def test_xshare_set_is_exact_optimum_on_biased_and_grouped_routers(inst):
    from xshare.selection.backends.reference_router import router_batch
    from xshare.selection.decide import LayerCall, decide
    from xshare.selection.routers.gate import router_scores

    logits, spec, top_k, warmup_k, budget = inst
    cfg = SelectorConfig(policy="xshare", budget=budget, warmup_k=warmup_k)
    call = LayerCall(logits, top_k, spec)
    batch = router_batch(call, cfg)
    s = xshare_set(batch)
    # the objective and the warm-up, computed here from the router's own scores
    gs = router_scores(logits, spec)
    gain = torch.where(gs.reachable, gs.affinity, torch.zeros_like(gs.affinity)).sum(0)
    forced = torch.zeros(logits.shape[1], dtype=torch.bool)
    if warmup_k:
        choice = torch.where(gs.reachable, gs.choice, torch.full_like(gs.choice, float("-inf")))
        order = torch.argsort(choice, dim=1, descending=True, stable=True)  # ties: the lower index first
        forced[order[:, :warmup_k].flatten()] = True
    assert torch.equal(batch.warmup(), forced)
    limit = max(budget, int(forced.sum()))
    assert not (forced & ~s).any() and int(s.sum()) <= limit
    best = _brute_force(gain, forced, limit)
    assert abs(float(gain[s].sum()) - best) <= 1e-5 * max(1.0, best)
    # and the routing stays inside the set and the token's groups, or keeps the router's own (counted)
    d = decide(call, cfg)
    per_group = logits.shape[1] // spec.num_expert_group
    for row, ids in enumerate(d.routing.topk_ids.long()):
        assert bool(gs.reachable[row, ids].all())
        assert len({int(i) // per_group for i in ids}) <= spec.topk_group
        if d.replaced[row]:
            assert bool(s[ids].all())
    assert int(d.short_rows) == int((~d.replaced & ~s[d.routing.topk_ids.long()].all(1)).sum())


def _fewest_reaching(gain, forced, limit, target, feasible=lambda s: True):
    """Brute force: (size, mass) of the smallest feasible S ⊇ forced with mass >= target (ties: the
    most mass), or of the best-mass set at the cap when none reaches it."""
    best = None
    for s in _subsets(gain.numel()):
        if (forced & ~s).any() or int(s.sum()) > limit or not feasible(s):
            continue
        mass = float(gain[s].double().sum())
        key = (mass < target, int(s.sum()) if mass >= target else -mass)
        best = key if best is None or key < best else best
    return best


def _check_fewest(gain, s, w, limit, tau, feasible=lambda s: True):
    from xshare.selection.common import MASS_RTOL

    target = tau * float(gain.double().sum()) * (1 - MASS_RTOL)
    mass = float(gain[s].double().sum())
    assert not (w & ~s).any() and int(s.sum()) <= limit and feasible(s)
    reached, value = _fewest_reaching(gain, w, limit, target, feasible)
    if not reached:  # the target is reachable under the cap: S reaches it with the fewest experts
        assert mass >= target * (1 - 1e-6) and int(s.sum()) == value
    else:  # unreachable under the cap: S is the budget's optimum
        assert abs(mass - (-value)) <= 1e-5 * max(1.0, -value)


@SETTINGS
@given(instances(), st.floats(0.05, 1.0))
def test_target_mass_set_is_the_fewest_experts_reaching_tau(inst, tau):
    logits, top_k, warmup_k, budget, scoring = inst
    cfg = SelectorConfig(policy="xshare", budget=budget, warmup_k=warmup_k, scoring=scoring, target_mass=tau)
    batch = prepare_batch(LayerCall(logits, top_k), cfg)
    s = xshare_set(batch)
    w = batch.warmup()
    _check_fewest(batch.column_sums(), s, w, max(budget, int(w.sum())), tau)
    _check_routing(batch, select(logits, top_k, cfg), [s])


@SETTINGS
@given(instances(), st.integers(1, 4), st.floats(0.05, 1.0), st.data())
def test_target_mass_with_gpu_caps_is_the_fewest_experts_reaching_tau(inst, gpus, tau, data):
    logits, top_k, warmup_k, budget, scoring = inst
    cfg, placement, batch, s, w, feasible = _ep_case(logits, top_k, warmup_k, budget, scoring, gpus, data,
                                                     target_mass=tau)

    _check_fewest(batch.column_sums(), s, w, max(budget, int(w.sum())), tau, feasible)


def test_target_mass_stops_early_and_one_keeps_every_expert_with_mass():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 32, generator=gen) * 2
    sizes = {}
    for tau in (0.5, 0.8, 0.95, 1.0):
        cfg = SelectorConfig(policy="xshare", budget=32, warmup_k=0, target_mass=tau)
        sizes[tau] = int(xshare_set(prepare_batch(LayerCall(logits, 4), cfg)).sum())
    assert sizes[0.5] < sizes[0.8] < sizes[0.95] <= sizes[1.0] == 32
    capped = SelectorConfig(policy="xshare", budget=5, warmup_k=0, target_mass=0.95)
    assert int(xshare_set(prepare_batch(LayerCall(logits, 4), capped)).sum()) == 5  # the budget still caps


def test_rows_of_one_request_get_one_set_even_on_exact_ties():
    """Exact ties (all-equal gate scores): a request's set is computed once for all its rows (a
    per-row matrix product summed in another order broke the tie differently on some rows)."""
    cfg = SelectorConfig(policy="xshare_spec", budget=1, group_budget=1, warmup_k=0)
    for groups in (torch.zeros(8, dtype=torch.long), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])):
        batch = prepare_batch(LayerCall(torch.zeros(8, 5), 1, groups=groups), cfg)
        s_r, _ = xshare_spec_sets(batch)
        for g in groups.unique():
            rows = s_r[groups == g]
            assert bool((rows == rows[0]).all()), (groups.tolist(), s_r.int().tolist())
