"""Per-request exact routing in the selection core: rows flagged ``exact`` keep the engine's own top-k
(ids, column order and weights), their experts are forced into the policy's set, and the other rows
share what is left of the budget. Plain and biased (router-spec) layers, sync-free on meta tensors."""

import pytest
import torch

from xshare.selection import SelectorConfig, SelectorKnobs, select
from xshare.selection.backends.reference import prepare_batch
from xshare.selection.decide import LayerCall, LayerRouting, decide, uses_cpu_kernel
from xshare.selection.policies.xshare import xshare_set
from xshare.selection.routers.spec import RouterSpec

T, E, K = 12, 32, 4


def _logits(seed=0):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2


def _engine_ids(logits):
    return torch.topk(torch.softmax(logits, -1), K).indices.to(torch.int32)


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "oea", "lynx", "des_vote"])
def test_exact_rows_keep_the_engine_routing_and_the_others_share_the_budget(policy):
    logits = _logits()
    ids = _engine_ids(logits)
    exact = torch.zeros(T, dtype=torch.bool)
    exact[[2, 7]] = True
    cfg = SelectorConfig(policy=policy, budget=6, warmup_k=1)
    placement = torch.arange(E) // 8 if policy == "xshare_ep" else None
    base = select(logits, K, cfg, engine_ids=ids, placement=placement)
    got = select(logits, K, cfg, engine_ids=ids, placement=placement, exact=exact)
    vanilla = select(logits, K, SelectorConfig(policy="topk"), engine_ids=ids)
    assert torch.equal(got.topk_ids[exact], ids[exact])  # the engine's ids, in its order
    assert torch.equal(got.topk_weights[exact], vanilla.topk_weights[exact])
    changed = (torch.sort(got.topk_ids[~exact].long(), 1).values != torch.sort(ids[~exact].long(), 1).values).any(1)
    assert changed.any(), "the other rows still share a small budget"
    assert not torch.equal(base.topk_ids[exact], ids[exact])  # without the flag they would have changed


def test_exact_rows_are_forced_into_the_set_and_count_in_its_budget():
    logits = _logits(1)
    exact = torch.zeros(T, dtype=torch.bool)
    exact[0] = True
    cfg = SelectorConfig(policy="xshare", budget=8, warmup_k=0)
    batch = prepare_batch(LayerCall(logits, K, exact=exact), cfg)
    s = xshare_set(batch)
    own = torch.topk(logits[0], K).indices
    assert s[own].all() and int(s.sum()) == 8
    # under a mass target too: the forced experts are in, and tau is counted with them
    tau = prepare_batch(LayerCall(logits, K, exact=exact), cfg.replace(budget=E, target_mass=0.3))
    assert xshare_set(tau)[own].all()


def test_router_spec_layers_keep_exact_rows_verbatim():
    logits = _logits(2)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(9)) * 0.1
    spec = RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=4, topk_group=2)
    ids = torch.topk(torch.sigmoid(logits) + bias, K).indices.to(torch.int32)
    exact = torch.zeros(T, dtype=torch.bool)
    exact[[1, 5]] = True
    call = LayerCall(logits, K, spec, engine_ids=ids, exact=exact)
    d = decide(call, SelectorConfig(policy="xshare", budget=5, warmup_k=1))
    assert not d.replaced[exact].any()
    assert torch.equal(d.routing.topk_ids[exact], ids[exact])
    assert d.replaced[~exact].any()


def test_exact_rows_skip_the_cpu_kernel_and_are_checked():
    logits = _logits()
    exact = torch.zeros(T, dtype=torch.bool)
    call = LayerCall(logits, K, LayerRouting(), exact=exact)
    cfg = SelectorConfig(policy="xshare", budget=6)
    assert not uses_cpu_kernel(call, cfg) and uses_cpu_kernel(LayerCall(logits, K, LayerRouting()), cfg)
    for bad in (torch.zeros(T), torch.zeros(T + 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="exact"):
            select(logits, K, cfg, exact=bad)


def test_exact_mask_runs_on_meta_tensors_with_knobs():
    cfg = SelectorConfig(policy="xshare", budget=6, target_mass=0.9)
    logits = _logits().to("meta")
    routing = select(logits, K, cfg, knobs=SelectorKnobs.create(cfg, E, K, "meta"), num_tokens=torch.tensor(T - 2,
                     device="meta"), validate=False, exact=torch.zeros(T, dtype=torch.bool, device="meta"))
    assert routing.topk_ids.device.type == "meta" and routing.topk_ids.shape == (T, K)
