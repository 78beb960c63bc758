"""The served selector's fused Triton kernels against the torch reference, on the CPU (Triton's interpreter).

``decide(call, config)`` with ``backend='triton'`` runs, on CPU tensors, the very kernels a GPU compiles
(:mod:`xshare.selection.backends.triton.launch`); with ``backend='torch'`` it runs the torch reference
the project defines each router family by. For every family SGLang serves (plain softmax / sigmoid,
sqrtsoftplus with a bias, biased plain, DeepSeek-V2's grouped softmax, DeepSeek-V3's biased grouped
gate with routed scaling and the shared slot, the one-group biased gates of GLM-4.5 / Kimi-K2,
Llama-4's top-1), fp32 and bf16 logits, every kernel policy (topk, xshare, xshare_ep) and every knob
(budget, warm-up, mass target, GPU caps, exact rows, padding rows as an int or a device tensor, the
on/off switch, the batch-size range) the two must agree: ids identical (ties included), the same
replaced rows, short rows, active experts and cap-bound flag, weights within 1e-6.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import require_module

require_module("triton", "requirements/dev.txt")

from xshare.selection import Placement, SelectorConfig, SelectorKnobs  # noqa: E402
from xshare.selection.backends.reference import prepare_batch  # noqa: E402
from xshare.selection.backends.triton.cases import make_logits  # noqa: E402
from xshare.selection.decide import LayerCall, LayerRouting, choose_backend, decide  # noqa: E402
from xshare.selection.routers.gate import reference_route  # noqa: E402
from xshare.selection.routers.spec import RouterSpec  # noqa: E402


def _bias(gen: torch.Generator, experts: int, tied: bool) -> torch.Tensor:
    if tied:  # a few distinct values: ties between biased scores
        return torch.tensor([0.0, 0.05, -0.05])[torch.randint(0, 3, (experts,), generator=gen)]
    return torch.randn(experts, generator=gen) * 0.1


# family -> (experts, top_k, builder(gen, tied) -> LayerRouting | RouterSpec, grouped)
FAMILIES = {
    "softmax": (40, 6, lambda g, t: LayerRouting("softmax", True), False),
    "sigmoid-no-renorm": (24, 4, lambda g, t: LayerRouting("sigmoid", False), False),
    "sqrtsoftplus-biased": (32, 6, lambda g, t: RouterSpec(scoring="sqrtsoftplus", correction_bias=_bias(g, 32, t),
                                                          routed_scaling_factor=1.5, scaling_in_weights=True), False),
    "sigmoid-biased-unnormalised": (24, 4, lambda g, t: RouterSpec(
        scoring="sigmoid", correction_bias=_bias(g, 24, t), renormalize=False, routed_scaling_factor=2.0,
        scaling_in_weights=True), False),
    "deepseek_v2-grouped-softmax": (40, 6, lambda g, t: RouterSpec(scoring="softmax", num_expert_group=8,
                                                                  topk_group=3), True),
    "deepseek_v3-biased-grouped": (64, 8, lambda g, t: RouterSpec(
        scoring="sigmoid", correction_bias=_bias(g, 64, t), num_expert_group=8, topk_group=4, routed_scaling_factor=2.5,
        scaling_in_weights=True, num_fused_shared_experts=1), True),
    "deepseek_v3-scaling-outside": (64, 8, lambda g, t: RouterSpec(
        scoring="sigmoid", correction_bias=_bias(g, 64, t), num_expert_group=8, topk_group=4,
        routed_scaling_factor=2.5), True),
    "glm45-kimi-one-group": (48, 8, lambda g, t: RouterSpec(
        scoring="sigmoid", correction_bias=_bias(g, 48, t), num_expert_group=1, topk_group=1, routed_scaling_factor=1.8,
        scaling_in_weights=True), False),
    "llama4-top1": (16, 1, lambda g, t: RouterSpec(scoring="sigmoid", custom="llama4", renormalize=False), False),
}


def _engine_ids(logits: torch.Tensor, top_k: int, layer: object) -> torch.Tensor:
    """SGLang's own picks: the family's gate (the reference's bitwise copy), or top-k of the softmax / sigmoid."""
    if isinstance(layer, RouterSpec):
        return reference_route(logits, top_k, layer).topk_ids[:, :top_k]
    scores = torch.softmax(logits.float(), -1) if layer.scoring == "softmax" else torch.sigmoid(logits.float())
    return torch.topk(scores, top_k, dim=-1).indices.to(torch.int32)


def _settings(rng: random.Random, experts: int, top_k: int) -> dict:
    policy = rng.choice(["xshare", "xshare", "xshare_ep", "xshare_spec", "topk"])
    cfg = {"policy": policy}
    if policy == "xshare_spec":
        cfg["group_budget"] = rng.choice([top_k, 2 * top_k, experts // 2])
        cfg["anchor_k"] = rng.choice([None, None, 0, 1, top_k])
    if policy != "topk":
        cfg["budget"] = rng.choice([top_k, experts // 4, experts // 2, experts])
        cfg["warmup_k"] = rng.choice([0, 1, min(2, top_k)])
        if rng.random() < 0.35 and policy != "xshare_spec":
            cfg["target_mass"] = rng.choice([0.5, 0.8, 0.95])
        if policy == "xshare_ep" and rng.random() < 0.5:
            cfg["gpu_cap"] = rng.choice([1, 2, 3])
    else:
        cfg["warmup_k"] = 0
    return cfg


def _call(family: str, seed: int, dtype: torch.dtype, *, kind: str | None = None) -> tuple[LayerCall, SelectorConfig]:
    experts, top_k, build, grouped = FAMILIES[family]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = rng.choice([1, 3, 9, 17])
    # Exact ties between group scores resolve by torch.topk's order in the reference (SGLang's on the CPU)
    # and by the lower group index in the kernel (the same on every device and rank): grouped families
    # draw ties inside groups only.
    kinds = ["normal", "discrete"] if grouped else ["normal", "discrete", "binary", "duplicated"]
    kind = kind or rng.choice(kinds)
    logits = make_logits(gen, rows, experts, kind, masked=False)
    layer = build(gen, rng.random() < 0.5)
    if grouped:  # ties inside groups, none between the groups' scores (distinct offsets a logit apart)
        groups = layer.num_expert_group
        offsets = torch.stack([torch.randperm(groups, generator=gen) for _ in range(rows)]).float()
        logits = logits * 0.1 + offsets.repeat_interleave(experts // groups, dim=1)
    logits = logits.to(dtype)
    cfg = SelectorConfig(**_settings(rng, experts, top_k))
    placement = Placement.contiguous(experts, 4) if cfg.policy == "xshare_ep" else None
    num_tokens: int | torch.Tensor | None = rng.choice([None, rows, max(0, rows - 2)])
    if num_tokens is not None and rng.random() < 0.5:
        num_tokens = torch.tensor(num_tokens)
    exact = (torch.rand(rows, generator=gen) < 0.2) if rng.random() < 0.3 else None
    knobs = None
    if rng.random() < 0.6:
        knobs = SelectorKnobs.create(cfg if not isinstance(layer, LayerRouting) else cfg.replace(
            scoring=layer.scoring, renormalize=layer.renormalize), experts, top_k,
            enabled=rng.random() < 0.9)
        if rng.random() < 0.15:
            knobs.min_tokens.fill_(rows + 1)  # outside the batch-size range: vanilla
    groups = None
    if cfg.policy == "xshare_spec":  # requests of 1-4 draft rows, ids not in row order
        groups = torch.randint(0, max(1, rows // 2), (rows,), generator=gen) * 7 + 3
    call = LayerCall(router_logits=logits, top_k=top_k, layer=layer, engine_ids=_engine_ids(logits, top_k, layer),
                     num_tokens=num_tokens, placement=placement, knobs=knobs, exact=exact, groups=groups)
    return call, cfg


def assert_same(call: LayerCall, cfg: SelectorConfig) -> None:
    ref = decide(call, cfg.replace(backend="torch"))
    got = decide(call, cfg.replace(backend="triton"))
    assert ref.backend == "torch" and got.backend == "triton" and got.reason is None, (got.backend, got.reason)
    assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids), (got.routing.topk_ids, ref.routing.topk_ids)
    assert torch.equal(got.routing.active, ref.routing.active)
    torch.testing.assert_close(got.routing.topk_weights, ref.routing.topk_weights, atol=1e-6, rtol=0)
    assert (got.replaced is None) == (ref.replaced is None)
    if ref.replaced is not None:
        assert torch.equal(got.replaced, ref.replaced)
        assert int(got.short_rows) == int(ref.short_rows)
    assert (got.routing.cap_bound is None) == (ref.routing.cap_bound is None)
    if ref.routing.cap_bound is not None:
        assert bool(got.routing.cap_bound) == bool(ref.routing.cap_bound)
    if ref.routing.physical_ids is not None:
        assert torch.equal(got.routing.physical_ids, ref.routing.physical_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_equals_reference(family, dtype):
    for seed in range(8):
        call, cfg = _call(family, 1000 * seed + len(family), dtype)
        assert_same(call, cfg)


@pytest.mark.parametrize("anchor", [None, 0, 2])
@pytest.mark.parametrize("family", ["softmax", "deepseek_v3-biased-grouped"])
def test_verify_batches_anchor_each_requests_first_row(family, anchor):
    """xshare_spec on verify-shaped batches (requests of 4 rows, one of a single row, ids out of row order,
    padding rows): the kernel equals the reference, and each multi-row request's first valid row keeps its
    own top anchor_k experts (None: its whole top_k, i.e. its own routing) while a single-row request and
    the other rows get only the warm-up (k0 = 0 here)."""
    experts, top_k, build, grouped = FAMILIES[family]
    gen = torch.Generator().manual_seed(7)
    groups = torch.tensor([5, 5, 5, 5, 9, 9, 9, 9, 2, 4, 4, 4, 4, 1, 1, 1])
    logits = make_logits(gen, groups.numel(), experts, "normal", masked=False)
    layer = build(gen, False)
    if grouped:
        offsets = torch.stack([torch.randperm(layer.num_expert_group, generator=gen) for _ in range(groups.numel())])
        logits = logits * 0.1 + offsets.float().repeat_interleave(experts // layer.num_expert_group, dim=1)
    cfg = SelectorConfig(policy="xshare_spec", budget=top_k, group_budget=1, warmup_k=0, anchor_k=anchor)
    call = LayerCall(router_logits=logits, top_k=top_k, layer=layer, engine_ids=_engine_ids(logits, top_k, layer),
                     num_tokens=torch.tensor(13), groups=groups)  # rows 13-15: padding
    assert_same(call, cfg)
    ref = decide(call, cfg.replace(backend="torch")).routing
    keep = top_k if anchor is None else anchor
    if keep == top_k:  # the first rows of the multi-row requests keep their own routing
        own = call.engine_ids.long().sort(dim=1).values
        assert torch.equal(ref.topk_ids[[0, 4, 9]].long().sort(dim=1).values, own[[0, 4, 9]])
    if isinstance(layer, LayerRouting):  # a plain gate: the policy ranks by the batch's own preference order
        kept = prepare_batch(call, cfg).own_topk(keep)  # each row's top-keep
        for first in (0, 4, 9):  # the anchors route over their own top-keep, all in the set
            assert set(kept[first].nonzero().flatten().tolist()) <= set(ref.topk_ids[first].tolist()), first
        assert not (kept[[0, 4, 9]].any(0) & ~ref.active).any()


@pytest.mark.parametrize("family", ["softmax", "deepseek_v3-biased-grouped", "glm45-kimi-one-group"])
def test_budget_at_least_e_keeps_the_engines_routing(family):
    experts, top_k, build, _ = FAMILIES[family]
    gen = torch.Generator().manual_seed(5)
    logits = make_logits(gen, 12, experts, "discrete", masked=False).to(torch.bfloat16)
    layer = build(gen, True)
    engine = _engine_ids(logits, top_k, layer)
    call = LayerCall(router_logits=logits, top_k=top_k, layer=layer, engine_ids=engine)
    got = decide(call, SelectorConfig(policy="xshare", budget=experts, warmup_k=1, backend="triton"))
    assert torch.equal(got.routing.topk_ids, engine.to(torch.int32))  # the engine's own ids, its tie order
    if got.replaced is not None:
        assert not bool(got.replaced.any())


def test_selection_shrinks_the_union_and_padding_rows_do_not_vote():
    experts, top_k, build, _ = FAMILIES["deepseek_v3-biased-grouped"]
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(16, experts, generator=gen)
    layer = build(gen, False)
    engine = _engine_ids(logits, top_k, layer)
    cfg = SelectorConfig(policy="xshare", budget=16, warmup_k=1, backend="triton")
    full = decide(LayerCall(router_logits=logits, top_k=top_k, layer=layer, engine_ids=engine), cfg)
    vanilla = torch.zeros(experts, dtype=torch.bool)
    vanilla[engine.flatten().long()] = True
    assert int(full.routing.active.sum()) < int(vanilla.sum())
    # rows 8.. are padding holding other tokens: the set of the 8 real rows ignores them
    padded = decide(LayerCall(router_logits=logits, top_k=top_k, layer=layer, engine_ids=engine, num_tokens=8), cfg)
    alone = decide(LayerCall(router_logits=logits[:8], top_k=top_k, layer=layer, engine_ids=engine[:8]), cfg)
    assert torch.equal(padded.routing.topk_ids[:8], alone.routing.topk_ids)
    assert torch.equal(padded.routing.active, alone.routing.active)
    assert not bool(padded.replaced[8:].any())


def test_tied_column_sums_resolve_identically():
    """Binary logits: many experts share the same column sum. Fixed-point sums make the order of the
    additions irrelevant, so the kernel (any grid) and the reference pick the same tied experts."""
    for seed in range(6):
        gen = torch.Generator().manual_seed(100_000 + seed)
        logits = make_logits(gen, 9, 32, "binary", masked=False)
        for policy, placement in (("xshare", None), ("xshare_ep", Placement.contiguous(32, 4))):
            cfg = SelectorConfig(policy=policy, budget=8, warmup_k=1)
            call = LayerCall(router_logits=logits, top_k=4, layer=LayerRouting("sigmoid", True),
                             engine_ids=_engine_ids(logits, 4, LayerRouting("sigmoid", True)), placement=placement)
            assert_same(call, cfg)


def test_backend_choice_and_reasons():
    logits = torch.randn(4, 16)
    plain = LayerCall(router_logits=logits, top_k=2, engine_ids=torch.topk(logits, 2).indices)
    assert choose_backend(plain, SelectorConfig(backend="torch")) == ("torch", None)
    assert choose_backend(plain, SelectorConfig(backend="auto"), cpu_kernel=True) == ("c", None)
    assert choose_backend(plain, SelectorConfig(backend="auto"), cpu_kernel=False) == ("torch", "c_unavailable")
    assert choose_backend(plain, SelectorConfig(backend="triton")) == ("triton", None)
    assert choose_backend(plain, SelectorConfig(policy="lynx", backend="triton")) == ("torch", "policy_lynx")
    meta = LayerCall(router_logits=torch.randn(4, 16, device="meta"), top_k=2)
    assert choose_backend(meta, SelectorConfig()) == ("torch", "device_meta")
    spec = RouterSpec(scoring="sigmoid", correction_bias=torch.zeros(16), num_expert_group=4, topk_group=2)
    no_ids = LayerCall(router_logits=logits, top_k=2, layer=spec)
    assert choose_backend(no_ids, SelectorConfig(backend="triton")) == ("torch", "no_engine_ids")
    wide = LayerCall(router_logits=torch.randn(2, 16).double(), top_k=2)
    assert choose_backend(wide, SelectorConfig(backend="triton")) == ("torch", "logits_float64")
    # a call the forced kernel cannot route is still routed (by the reference) and says why
    out = decide(LayerCall(router_logits=logits, top_k=2, layer=spec), SelectorConfig(budget=4, backend="triton"))
    assert out.backend == "torch" and out.reason == "no_engine_ids" and out.routing.topk_ids.shape == (4, 2)


@pytest.mark.parametrize("family", ["softmax", "sigmoid-no-renorm", "glm45-kimi-one-group"])
def test_every_backend_picks_the_same_tied_experts(family):
    """Binary logits tie whole columns: the torch reference, the C kernel and the fused kernels rank
    the tied experts alike because all three rank on the same fixed-point column sums."""
    from xshare.selection.backends.c.kernel import cpu_kernel_available

    assert cpu_kernel_available()  # the C kernel is part of the comparison (it needs a C compiler)
    experts, top_k, build, _ = FAMILIES[family]
    for seed in range(4):
        gen = torch.Generator().manual_seed(200_000 + seed)
        logits = make_logits(gen, 13, experts, "binary", masked=False)
        layer = build(gen, True)
        call = LayerCall(router_logits=logits, top_k=top_k, layer=layer,
                         engine_ids=_engine_ids(logits, top_k, layer))
        cfg = SelectorConfig(policy="xshare", budget=top_k + 2, warmup_k=1)
        ref = decide(call, cfg.replace(backend="torch"))
        c = decide(call, cfg.replace(backend="c"), cpu_kernel=True)
        fused = decide(call, cfg.replace(backend="triton"))
        assert (c.backend, fused.backend) == ("c", "triton")
        for got in (c, fused):
            assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids), (got.backend, seed)
            assert torch.equal(got.routing.active, ref.routing.active), (got.backend, seed)

