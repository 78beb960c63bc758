"""select(): bad input, vanilla equivalence, and the invariants every policy keeps."""

import dataclasses

import pytest
import torch
from torch import Tensor

from xshare.selection import Placement, SelectorConfig, SelectorKnobs, available_policies, select
from xshare.selection.backends.reference import prepare_batch
from xshare.selection.call import LayerCall
from xshare.selection.common import preference_rank

POLICIES = available_policies()


def _kwargs(policy, t, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if policy == "xshare_ep":
        kw["placement"] = Placement.contiguous(e, 4)
    if policy in ("xshare_spec", "des_seq"):
        kw["groups"] = torch.randint(0, max(1, t // 3), (t,), generator=g)
    return kw


def _logits(t, e, seed=0, ninf=0.0, discrete=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g) * 2
    if discrete:  # many exact ties
        x = torch.randint(0, 3, (t, e), generator=g).float()
    if ninf:
        x[torch.rand(t, e, generator=g) < ninf] = float("-inf")
    return x


def sglang_torch_native_topk(logits, top_k, renormalize, scoring="softmax"):
    """SGLang 0.5.23 fused_topk_torch_native (no correction bias), restated for the comparison."""
    w = logits.float().softmax(dim=-1) if scoring == "softmax" else logits.float().sigmoid()
    w, ids = torch.topk(w, top_k, dim=-1)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True, dtype=torch.float32) + 1e-20)
    return w, ids


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda c: select(torch.randn(4), 2, c), "router_logits"),
        (lambda c: select(torch.randn(2, 4, 8), 2, c), "router_logits"),
        (lambda c: select(torch.ones(4, 8, dtype=torch.int64), 2, c), "router_logits"),
        (lambda c: select([[0.0] * 8], 2, c), "router_logits"),
        (lambda c: select(torch.full((4, 8), float("nan")), 2, c), "NaN"),
        (lambda c: select(torch.full((4, 8), float("inf")), 2, c), r"\+inf"),
        (lambda c: select(torch.randn(4, 8), 9, c), "top_k"),
        (lambda c: select(torch.randn(4, 8), 0, c), "top_k"),
        (lambda c: select(torch.randn(4, 8), 2.0, c), "top_k"),
        (lambda c: select(torch.randn(4, 8), 2, c.replace(warmup_k=3)), "warmup_k"),
        (lambda c: select(torch.randn(4, 8), 2, {"policy": "xshare"}), "config"),
        (lambda c: select(torch.randn(4, 8), 2, c, placement=torch.zeros(7, dtype=torch.long)), "placement"),
        (lambda c: select(torch.randn(4, 8), 2, c, placement=torch.zeros(8)), "placement"),
        (lambda c: select(torch.randn(4, 8), 2, c, groups=torch.zeros(3, dtype=torch.long)), "groups"),
        (lambda c: select(torch.randn(4, 8), 2, c, groups=torch.zeros(4)), "groups"),
        (lambda c: select(torch.randn(4, 8), 2, c.replace(policy="xshare_ep")), "placement"),
        (lambda c: select(torch.randn(4, 8), 2, c,
                          knobs=SelectorKnobs.create(c, 16, 2)), "knobs"),
    ],
)
def test_bad_input_names_the_argument(call, name):
    cfg = SelectorConfig(policy="xshare", budget=4, warmup_k=1)
    with pytest.raises(ValueError, match=name):
        call(cfg)


def test_placement_errors():
    with pytest.raises(ValueError, match="placement"):
        Placement.from_physical(torch.tensor([0, 1, 2]), num_gpus=2)
    with pytest.raises(ValueError, match="expert 2"):
        Placement.from_physical(torch.tensor([0, 1, 3, 0]), num_gpus=2, num_experts=4)
    with pytest.raises(ValueError, match="placement"):
        Placement.from_expert_gpu(torch.tensor([0, -1]))


def test_empty_batch():
    r = select(torch.empty(0, 16), 4, SelectorConfig(budget=4))
    assert r.topk_ids.shape == (0, 4) and r.topk_weights.shape == (0, 4)
    assert not r.active.any()


# --- vanilla ----------------------------------------------------------------------------------
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_identical_to_sglang_torch_native(renorm, scoring, dtype):
    logits = _logits(64, 128, seed=3).to(dtype)
    r = select(logits, 8, SelectorConfig(policy="topk", budget=1, renormalize=renorm, scoring=scoring))
    w, ids = sglang_torch_native_topk(logits, 8, renorm, scoring)
    # compare as sets per token (torch.topk's order among exact ties is unspecified)
    assert torch.equal(torch.sort(r.topk_ids.long(), -1).values, torch.sort(ids, -1).values)
    order = torch.argsort(ids, -1)
    mine = torch.argsort(r.topk_ids.long(), -1)
    assert torch.equal(r.topk_weights.gather(1, mine), w.gather(1, order))
    assert r.topk_ids.dtype == torch.int32 and r.topk_weights.dtype == torch.float32


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_at_least_e_is_vanilla_for_budgeted_policies(policy):
    logits = _logits(16, 32, seed=1)
    # budget-free policies take their set from the warm-up: with k0 = top_k they are vanilla too.
    # xshare_ep: cap ceil(32 / 4) = 8 = experts per GPU; xshare_spec: per-request budget E too.
    cfg = SelectorConfig(policy=policy, budget=32, group_budget=32,
                         warmup_k=4 if policy in ("oea", "des_seq") else 1)
    r = select(logits, 4, cfg, **_kwargs(policy, 16, 32))
    v = select(logits, 4, SelectorConfig(policy="topk", budget=1))
    assert torch.equal(r.topk_ids, v.topk_ids)
    assert torch.equal(r.topk_weights, v.topk_weights)


# --- invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", range(6))
def test_invariants(policy, case):
    t, e, k = [(16, 64, 6), (5, 12, 3), (33, 128, 8), (1, 8, 2), (64, 32, 4), (16, 16, 4)][case]
    scoring = "sigmoid" if case % 2 else "softmax"
    renorm = case != 4
    logits = _logits(t, e, seed=case, ninf=0.2 if case in (1, 2) else 0.0, discrete=case == 5)
    budget = max(1, e // 4)
    cfg = SelectorConfig(policy=policy, budget=budget, warmup_k=1, scoring=scoring, renormalize=renorm)
    kw = _kwargs(policy, t, e, seed=case)
    r = select(logits, k, cfg, **kw)
    ids = r.topk_ids.long()
    usable = torch.isfinite(logits)
    n_usable = usable.sum(-1)
    # exactly top_k distinct experts per token
    assert ids.shape == (t, k)
    assert all(len(set(row.tolist())) == k for row in ids)
    # unusable experts only when a token has fewer than top_k usable ones
    picked_usable = usable.gather(1, ids).sum(-1)
    assert torch.equal(picked_usable, torch.clamp(n_usable, max=k))
    # warm-up kept: every token keeps its own top-1 (all policies but des_vote/lynx guarantee it)
    if policy not in ("des_vote", "lynx", "topk"):
        top1 = preference_rank(torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits),
                               usable).argmin(-1)
        assert (ids == top1.unsqueeze(1)).any(-1).all()
    # active = union of routed ids
    union = torch.zeros(e, dtype=torch.bool)
    union[ids.flatten()] = True
    assert torch.equal(r.active, union)
    # weights: the gate scores of the chosen experts, renormalised when configured
    p = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    p = torch.where(usable, p, torch.zeros_like(p))
    raw = p.gather(1, ids)
    if renorm:
        torch.testing.assert_close(r.topk_weights, raw / (raw.sum(-1, keepdim=True) + 1e-20))
    else:
        torch.testing.assert_close(r.topk_weights, raw)
    # each token's ids are in its preference order within the set it prefers (tier, score, index)
    assert (r.topk_weights.sum(-1) > 0).all() or not renorm or (n_usable == 0).any()


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "xshare_spec", "des_vote", "lynx"])
def test_budget_respected(policy):
    logits = _logits(32, 64, seed=7)
    vanilla = int(select(logits, 4, SelectorConfig(policy="topk", budget=1)).active.sum())
    for budget in (4, 8, 16, 24):
        cfg = SelectorConfig(policy=policy, budget=budget, group_budget=64, warmup_k=0, anchor_k=0)
        r = select(logits, 4, cfg, **_kwargs(policy, 32, 64))
        if policy == "lynx":  # confident tokens' top-1 experts are kept on top of the budget
            forced = int(torch.topk(logits, 1, -1).indices.unique().numel())
            assert int(r.active.sum()) <= max(budget, forced) < vanilla
        else:
            assert int(r.active.sum()) <= budget


def test_warmup_kept_even_above_budget():
    logits = _logits(32, 64, seed=11)
    cfg = SelectorConfig(policy="xshare", budget=2, warmup_k=2)
    r = select(logits, 4, cfg)
    top2 = torch.topk(logits, 2, -1).indices
    w = torch.zeros(64, dtype=torch.bool)
    w[top2.flatten()] = True
    assert int(w.sum()) > 2
    assert torch.equal(r.active, w)  # |W| > m: S = W exactly
    assert all(set(top2[i].tolist()) <= set(r.topk_ids[i].tolist()) for i in range(32))


def test_minus_inf_rows_and_columns():
    logits = _logits(8, 16, seed=2)
    logits[0, :] = float("-inf")  # a token that can use nothing
    logits[1, 3:] = float("-inf")  # a token that can use 3 experts < top_k
    logits[:, 5] = float("-inf")  # an expert nobody can use
    for policy in POLICIES:
        r = select(logits, 4, SelectorConfig(policy=policy, budget=4), **_kwargs(policy, 8, 16))
        assert torch.isfinite(r.topk_weights).all()
        assert (r.topk_weights[0] == 0).all()
        assert set(range(3)) <= set(r.topk_ids[1].tolist())
        torch.testing.assert_close(r.topk_weights[1].sum(), torch.tensor(1.0))
        assert not (r.topk_ids[2:] == 5).any()


def test_batch_size_gate_is_exactly_topk():
    logits = _logits(16, 64, seed=5)
    v = select(logits, 6, SelectorConfig(policy="topk", budget=1))
    for cfg in (SelectorConfig(budget=8, min_tokens=17), SelectorConfig(budget=8, max_tokens=15)):
        r = select(logits, 6, cfg)
        assert torch.equal(r.topk_ids, v.topk_ids) and torch.equal(r.topk_weights, v.topk_weights)
        # the device-side gate (padding / knobs) decides the same way
        r2 = select(logits, 6, cfg, num_tokens=torch.tensor(16))
        assert torch.equal(r2.topk_ids, v.topk_ids)
    inside = select(logits, 6, SelectorConfig(budget=8, min_tokens=16, max_tokens=16))
    assert int(inside.active.sum()) < int(v.active.sum())


def test_padding_rows_do_not_count():
    logits = _logits(16, 64, seed=6)
    cfg = SelectorConfig(budget=12)
    real = select(logits[:10], 6, cfg)
    padded = select(logits, 6, cfg, num_tokens=torch.tensor(10))
    assert torch.equal(padded.topk_ids[:10], real.topk_ids)
    assert torch.equal(padded.active, real.active)
    vanilla = select(logits, 6, SelectorConfig(policy="topk", budget=1))
    assert torch.equal(padded.topk_ids[10:], vanilla.topk_ids[10:])


@pytest.mark.parametrize("policy", POLICIES)
def test_knobs_follow_in_place_updates(policy):
    logits = _logits(24, 64, seed=8)
    kw = _kwargs(policy, 24, 64)
    base = SelectorConfig(policy=policy, budget=32, warmup_k=1)
    knobs = SelectorKnobs.create(base, 64, 6)
    for change in ({"budget": 8}, {"budget": 0.25, "warmup_k": 2}, {"gpu_cap": 3, "budget": 12},
                   {"group_budget": 7}, {"min_tokens": 30}, {"max_tokens": 10}):
        cfg = base.replace(**change)
        knobs.update(cfg)
        got = select(logits, 6, cfg, knobs=knobs, **kw)
        want = select(logits, 6, cfg, **kw)
        assert torch.equal(got.topk_ids, want.topk_ids), change
        assert torch.equal(got.topk_weights, want.topk_weights), change
    knobs.update(base, enabled=False)
    off = select(logits, 6, base, knobs=knobs, **kw)
    assert torch.equal(off.topk_ids, select(logits, 6, base.replace(policy="topk")).topk_ids)


def test_knobs_update_is_all_or_nothing():
    cfg = SelectorConfig(budget=16, warmup_k=1)
    knobs = SelectorKnobs.create(cfg, 64, 4)
    values = [getattr(knobs, f.name) for f in dataclasses.fields(knobs) if isinstance(getattr(knobs, f.name), Tensor)]
    before = [v.item() for v in values]
    with pytest.raises(ValueError, match="warmup_k"):
        knobs.update(cfg.replace(budget=8, warmup_k=5))
    assert [v.item() for v in values] == before


def test_prepare_batch_rank_is_preference_order():
    logits = torch.tensor([[0.0, 2.0, 2.0, float("-inf"), 1.0]])
    b = prepare_batch(LayerCall(logits, 2), SelectorConfig(policy="topk", budget=1))
    assert b.rank.tolist() == [[3, 0, 1, 4, 2]]  # ties: lower index first; unusable last


def test_prefer_breaks_exact_ties_in_the_given_order():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 1.0]])
    cfg = SelectorConfig(policy="topk", budget=1)
    assert select(logits, 2, cfg).topk_ids.tolist() == [[0, 1], [0, 1]]  # default: lower index
    prefer = torch.tensor([[2, 1], [0, 3]])
    r = select(logits, 2, cfg, engine_ids=prefer)
    assert r.topk_ids.tolist() == [[2, 1], [0, 3]]
    # a preference never overrides a strictly higher score
    assert select(logits, 2, cfg, engine_ids=torch.tensor([[3, -1], [3, 2]])).topk_ids.tolist() == [[0, 1], [0, 3]]
    with pytest.raises(ValueError, match="engine_ids"):
        select(logits, 2, cfg, engine_ids=torch.tensor([1, 2]))
