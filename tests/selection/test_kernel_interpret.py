"""The fused Triton selection kernel against the torch reference, on the CPU (Triton's interpreter).

``select(..., backend='triton')`` on CPU tensors runs the very kernels a GPU would compile, in
Triton's interpreter. Every case compares with :func:`xshare.selection.select`: identical ids,
identical ``active``, identical physical slots, weights within 1e-6. Inputs are randomised, with
exact ties (discrete logits, duplicated experts and tokens), ``-inf`` entries, padding rows holding
garbage, knob changes, both scorings, renormalisation on and off, and placements over 1..8 GPUs.
The case generator lives in :mod:`xshare.selection.backends.triton.cases`, so that ``xshare bench gpu``
replays the same cases on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_module

require_module("triton", "requirements/dev.txt")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from xshare.selection import Placement, SelectorConfig, SelectorKnobs, select  # noqa: E402
from xshare.selection.backends.triton import route  # noqa: E402
from xshare.selection.backends.triton.cases import compare, make_logits, random_case  # noqa: E402
from xshare.selection.backends.triton.route import kernel_supports  # noqa: E402


def assert_same(kw: dict) -> None:
    ref = select(**kw)
    got = select(**kw, backend="triton")
    assert not compare(ref, got), compare(ref, got)
    assert torch.equal(got.topk_ids, ref.topk_ids), (got.topk_ids, ref.topk_ids)
    torch.testing.assert_close(got.topk_weights, ref.topk_weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_reference(policy, scoring, renormalize, seed):
    assert_same(random_case(1000 * seed + 7, policy, scoring, renormalize))


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep"])
def test_all_tied_batch_takes_lowest_indices(policy):
    logits = torch.zeros(6, 32)
    kw = {"router_logits": logits, "top_k": 4, "config": SelectorConfig(policy=policy, budget=8, warmup_k=1)}
    if policy == "xshare_ep":
        kw["placement"] = Placement.contiguous(32, 4)
    got = select(**kw, backend="triton")
    assert_same(kw)
    # every token ties everywhere: W = {0}; the fill takes the lowest indices (per GPU at most 2 for ep)
    expected = [0, 1, 2, 3] if policy == "xshare" else [0, 1, 8, 9]
    assert got.topk_ids.tolist() == [expected] * 6


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("cap", [None, 1, 2, 5])
def test_gpu_caps_over_placements(gpus, cap):
    gen = torch.Generator().manual_seed(gpus * 10 + (cap or 0))
    logits = make_logits(gen, 16, 64, "duplicated", masked=False)
    config = SelectorConfig(policy="xshare_ep", budget=12, warmup_k=1, gpu_cap=cap)
    placement = Placement.from_expert_gpu(torch.randint(0, gpus, (64,), generator=gen), gpus)
    assert_same({"router_logits": logits, "top_k": 8, "config": config, "placement": placement})


def test_replicated_experts_get_the_same_physical_slots():
    gen = torch.Generator().manual_seed(3)
    p2l = torch.cat([torch.arange(32), torch.randint(0, 32, (8,), generator=gen)])
    placement = Placement.from_physical(p2l[torch.randperm(40, generator=gen)], 4, 32)
    assert placement.has_replicas
    logits = make_logits(gen, 12, 32, "normal", masked=False)
    for policy in ("xshare", "xshare_ep"):
        for max_tokens in (None, 4):  # out of range: routed like topk, with topk's replica spreading
            config = SelectorConfig(policy=policy, budget=10, max_tokens=max_tokens)
            assert_same({"router_logits": logits, "top_k": 4, "config": config, "placement": placement})


def test_knob_changes_in_place_are_followed():
    gen = torch.Generator().manual_seed(11)
    logits = make_logits(gen, 16, 64, "discrete", masked=True)
    base = SelectorConfig(policy="xshare_ep", budget=16, warmup_k=1)
    knobs = SelectorKnobs.create(base, 64, 6)
    placement = Placement.contiguous(64, 4)
    num_tokens = torch.tensor(13)
    seen = set()
    for change, enabled in [({}, True), ({"budget": 4}, True), ({"warmup_k": 0, "budget": 2}, True),
                            ({"warmup_k": 3}, True), ({"gpu_cap": 1}, True), ({}, False),
                            ({"min_tokens": 14}, True), ({"max_tokens": 12}, True), ({"budget": 1.0}, True)]:
        config = base.replace(**change)
        knobs.update(config, enabled=enabled)
        kw = {"router_logits": logits, "top_k": 6, "config": base, "placement": placement,
              "num_tokens": num_tokens, "knobs": knobs, "validate": False}
        assert_same(kw)
        seen.add(tuple(map(tuple, select(**kw, backend="triton").topk_ids.tolist())))
    assert len(seen) >= 5  # the knobs really change the routing


def test_disabled_or_out_of_range_batches_route_like_topk():
    gen = torch.Generator().manual_seed(5)
    logits = make_logits(gen, 8, 32, "normal", masked=True)
    vanilla = select(logits, 4, SelectorConfig(policy="topk"))
    for config in (SelectorConfig(policy="xshare", budget=2, min_tokens=9),
                   SelectorConfig(policy="xshare", budget=2, max_tokens=7)):
        got = select(logits, 4, config, backend="triton")
        assert torch.equal(got.topk_ids, vanilla.topk_ids)
        torch.testing.assert_close(got.topk_weights, vanilla.topk_weights, atol=1e-6, rtol=0)
    knobs = SelectorKnobs.create(SelectorConfig(policy="xshare", budget=2), 32, 4, enabled=False)
    got = select(logits, 4, SelectorConfig(policy="xshare", budget=2), knobs=knobs, backend="triton")
    assert torch.equal(got.topk_ids, vanilla.topk_ids)
    # and enabled, the budget really bites
    knobs.update(SelectorConfig(policy="xshare", budget=2, warmup_k=0))
    got = select(logits, 4, SelectorConfig(policy="xshare"), knobs=knobs, backend="triton")
    assert not torch.equal(got.topk_ids, vanilla.topk_ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_dtypes_and_strides(dtype):
    gen = torch.Generator().manual_seed(2)
    logits = make_logits(gen, 40, 24, "normal", masked=True).to(dtype)
    config = SelectorConfig(policy="xshare", budget=6, warmup_k=2)
    assert_same({"router_logits": logits, "top_k": 6, "config": config})
    transposed = logits.t().contiguous().t()  # same values, column-major strides
    assert not transposed.is_contiguous()
    assert_same({"router_logits": transposed, "top_k": 6, "config": config})


def test_float64_logits_are_not_for_the_kernels():
    # the kernels read fp32 / bf16 / fp16 logits (kernel_problem); forcing them on float64 names the reason
    gen = torch.Generator().manual_seed(2)
    logits = make_logits(gen, 40, 24, "normal", masked=True).to(torch.float64)
    config = SelectorConfig(policy="xshare", budget=6, warmup_k=2)
    with pytest.raises(ValueError, match="backend='triton'.*logits_float64"):
        select(logits, 6, config, backend="triton")
    auto = select(logits, 6, config, backend="auto")  # the torch reference routes them
    assert torch.equal(auto.topk_ids, select(logits, 6, config).topk_ids)


def test_bigger_layer_in_several_row_blocks():
    # 300 tokens x 256 experts: several row blocks in both kernels
    gen = torch.Generator().manual_seed(8)
    logits = make_logits(gen, 300, 256, "discrete", masked=False)
    config = SelectorConfig(policy="xshare_ep", budget=64, warmup_k=1)
    assert_same({"router_logits": logits, "top_k": 8, "config": config, "placement": Placement.contiguous(256, 8),
                 "num_tokens": torch.tensor(290), "validate": False})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), policy=st.sampled_from(["xshare", "xshare_ep"]),
       scoring=st.sampled_from(["softmax", "sigmoid"]), renormalize=st.booleans())
def test_hypothesis_cases_match_reference(seed, policy, scoring, renormalize):
    assert_same(random_case(seed, policy, scoring, renormalize))


# -- dispatch -----------------------------------------------------------------------------------

def test_auto_backend_on_cpu_is_the_torch_reference(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(route, "fused_route", no_kernel)
    logits = torch.randn(4, 16)
    config = SelectorConfig(policy="xshare", budget=4)
    got = select(logits, 2, config, backend="auto")
    assert torch.equal(got.topk_ids, select(logits, 2, config).topk_ids)
    got = select(logits, 2, SelectorConfig(policy="lynx"), backend="auto")  # not a kernel policy
    assert got.topk_ids.shape == (4, 2)


def test_bad_arguments_are_named():
    logits = torch.randn(4, 16)
    config = SelectorConfig(policy="xshare", budget=4)
    with pytest.raises(ValueError, match="backend"):
        select(logits, 2, config, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton'.*lynx"):
        select(logits, 2, SelectorConfig(policy="lynx"), backend="triton")
    with pytest.raises(ValueError, match="top_k"):
        select(logits, 17, config, backend="triton")
    with pytest.raises(ValueError, match="NaN"):
        select(torch.full((2, 16), float("nan")), 2, config, backend="triton")
    with pytest.raises(ValueError, match="placement"):
        select(logits, 2, SelectorConfig(policy="xshare_ep", budget=4), backend="triton")
    with pytest.raises(ValueError, match="num_tokens"):
        select(logits, 2, config, num_tokens=torch.tensor(2.0), backend="triton")
    with pytest.raises(ValueError, match="knobs"):
        select(logits, 2, config, knobs=SelectorKnobs.create(config, 16, 2, "meta"), backend="triton")
    assert kernel_supports(config, 256) and not kernel_supports(config, 100_000)
    assert not kernel_supports(SelectorConfig(policy="oea"), 64)


def test_empty_batch():
    got = select(torch.empty(0, 16), 2, SelectorConfig(policy="xshare", budget=4), backend="triton")
    assert got.topk_ids.shape == (0, 2) and not bool(got.active.any())
