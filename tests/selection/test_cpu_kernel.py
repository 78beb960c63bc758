"""The CPU fast path (xshare.selection.backends.c.kernel, _cpu_select.c) against the torch reference.

Same routing as ``select`` with ``prefer`` (ids exactly, weights bit for bit), the same per-call
figures as the adapter's torch path, and the serving adapter's fallback when it cannot be built.
"""

import random
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import missing
from xshare.selection import SelectorConfig
from xshare.selection.backends.c import kernel as K
from xshare.selection.decide import LayerCall, LayerRouting, decide
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.observe.figures import call_figures, cpu_call_figures, routing_checksum
from xshare.sglang.settings import PluginSettings

if not K.cpu_kernel_available():  # it needs a C compiler (CC, cc, gcc or clang)
    missing(f"no CPU kernel: {K.cpu_kernel_problem()}")


def reference(logits, top_k, cfg, prefer, num_tokens):
    call = LayerCall(logits, top_k, LayerRouting(cfg.scoring, cfg.renormalize), engine_ids=prefer,
                            num_tokens=num_tokens)
    return decide(call, cfg).routing


@st.composite
def layer_call(draw):
    t = draw(st.integers(1, 24))
    e = draw(st.integers(2, 40))
    k = draw(st.integers(1, min(8, e)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) * 2
    if draw(st.booleans()):
        logits = logits.round()  # exact ties everywhere
    if draw(st.booleans()):
        logits[torch.rand(t, e, generator=g) < 0.25] = float("-inf")
    special = draw(st.sampled_from(["none", "nan", "posinf", "row_all_masked"]))
    if special == "nan":
        logits[0, 0] = float("nan")
    elif special == "posinf":
        logits[-1, e - 1] = float("inf")
    elif special == "row_all_masked":
        logits[0] = float("-inf")
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    logits = logits.to(dtype)
    prefer = torch.topk(torch.nan_to_num(logits.float(), nan=-1e30), k).indices
    if draw(st.booleans()):
        prefer = prefer[:, torch.randperm(k, generator=g)]  # the engine's column order is its own
    prefer = prefer.to(draw(st.sampled_from([torch.int32, torch.int64])))
    policy = draw(st.sampled_from(["xshare", "xshare", "topk", "lynx", "des_vote", "oea"]))
    cfg = SelectorConfig(policy=policy, budget=draw(st.integers(1, e)),
                         warmup_k=draw(st.integers(1 if policy == "oea" else 0, k)),
                         scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
                         renormalize=draw(st.booleans()), min_tokens=draw(st.sampled_from([1, 1, 6])))
    num_tokens = draw(st.one_of(st.none(), st.integers(0, t)))
    return logits, k, cfg, prefer, num_tokens


@settings(max_examples=600, deadline=None)
@given(layer_call())
def test_cpu_route_is_the_reference(call):
    logits, k, cfg, prefer, num_tokens = call
    ref = reference(logits, k, cfg, prefer, num_tokens)
    out = K.cpu_route(logits, k, cfg, engine_ids=prefer, num_tokens=num_tokens)
    assert torch.equal(out.routing.topk_ids, ref.topk_ids)
    assert torch.equal(out.routing.topk_weights, ref.topk_weights)  # bit for bit, NaN-free
    assert torch.equal(out.routing.active, ref.active)
    n = logits.shape[0] if num_tokens is None else num_tokens
    valid = torch.arange(logits.shape[0]) < n
    old = prefer.long()
    vanilla = torch.zeros(logits.shape[1], dtype=torch.bool)
    vanilla[old[valid].clamp_min(0).flatten()] = True
    assert torch.equal(out.vanilla_active, vanilla)
    changed = (torch.sort(old, 1).values != torch.sort(ref.topk_ids.long(), 1).values).any(1) & valid
    assert out.changed_tokens == int(changed.sum())
    assert out.checksum == int(routing_checksum(ref.topk_ids, valid))
    assert out.num_valid == int(valid.sum())


def test_the_set_is_the_budgeted_union_of_warmup_and_fill():
    # 3 tokens, 6 experts: top-1s are 0, 0, 5 -> W = {0, 5}; fill by column sums -> expert 2
    logits = torch.tensor([[5.0, 1, 3, 0, 0, 0], [5.0, 0, 3, 1, 0, 0], [0.0, 0, 2.9, 0, 0, 5]])
    cfg = SelectorConfig(policy="xshare", budget=3, warmup_k=1)
    out = K.cpu_route(logits, 2, cfg, engine_ids=torch.topk(logits, 2).indices)
    assert out.in_set.nonzero().flatten().tolist() == [0, 2, 5]
    assert out.routing.topk_ids.tolist() == [[0, 2], [0, 2], [5, 2]]
    assert out.routing.active.nonzero().flatten().tolist() == [0, 2, 5]
    assert out.changed_tokens == 0  # everyone's own top-2 already lies inside S
    tight = K.cpu_route(logits, 2, cfg.replace(budget=2), engine_ids=torch.topk(logits, 2).indices)
    assert tight.in_set.nonzero().flatten().tolist() == [0, 5]
    assert tight.routing.topk_ids[:, 0].tolist() == [0, 0, 5]
    assert tight.changed_tokens == 3


def test_figures_match_the_adapter_figures():
    rng = random.Random(0)
    for it in range(60):
        t, e, k, gpus = rng.randint(1, 20), rng.randint(4, 40), rng.randint(1, 4), rng.randint(1, 5)
        logits = torch.randn(t, e, generator=torch.Generator().manual_seed(it)) * 2
        prefer = torch.topk(logits, k).indices.to(torch.int32)
        cfg = SelectorConfig(policy="xshare", budget=rng.randint(1, e), warmup_k=rng.randint(0, k))
        num_tokens = None if it % 2 else rng.randint(0, t)
        out = K.cpu_route(logits, k, cfg, engine_ids=prefer, num_tokens=num_tokens)
        expert_gpu = torch.arange(e) * gpus // e
        valid = torch.arange(t) < out.num_valid
        want = call_figures(3, logits, prefer, out.routing.topk_ids, out.routing.active, out.vanilla_active, valid,
                            expert_gpu, gpus)
        got = cpu_call_figures(out, 3, expert_gpu, gpus)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_ids_raise_instead_of_routing():
    logits = torch.randn(4, 8)
    cfg = SelectorConfig(policy="xshare", budget=3)
    with pytest.raises(RuntimeError, match="id"):
        K.cpu_route(logits, 2, cfg, engine_ids=torch.full((4, 2), 11, dtype=torch.int32))


def test_supports_only_its_policies_on_cpu_tensors():
    logits = torch.randn(4, 8)
    assert K.cpu_kernel_supports(SelectorConfig(policy="xshare", budget=3), logits)
    assert K.cpu_kernel_supports(SelectorConfig(policy="topk"), logits)
    assert K.cpu_kernel_supports(SelectorConfig(policy="lynx", budget=3), logits)  # a set policy
    assert not K.cpu_kernel_supports(SelectorConfig(policy="xshare_ep", budget=3), logits)  # needs a placement
    assert not K.cpu_kernel_supports(SelectorConfig(policy="des_seq", warmup_k=1), logits)  # per-request sets
    assert not K.cpu_kernel_supports(SelectorConfig(policy="xshare", budget=3), logits, groups=torch.zeros(4))
    assert not K.cpu_kernel_supports(SelectorConfig(policy="xshare", budget=3), torch.randn(4, 8, device="meta"))


def test_kernel_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv(K.CACHE_ENV, str(tmp_path))
    cc = K._compiler()
    lib = K._build(cc)
    assert lib.parent == tmp_path / "kernels" and lib.is_file()
    stamp = lib.stat().st_mtime_ns
    assert K._build(cc) == lib and lib.stat().st_mtime_ns == stamp  # built once


def test_a_header_change_rebuilds_the_kernel(tmp_path, monkeypatch):
    # the two C files include _cpu_common.h: an edit there must not load a library built from the old one
    src = tmp_path / "src"
    src.mkdir()
    for path in (*K.SOURCES, K.HEADER):
        shutil.copy(path, src / path.name)
    monkeypatch.setattr(K, "SOURCES", tuple(src / path.name for path in K.SOURCES))
    monkeypatch.setattr(K, "HEADER", src / K.HEADER.name)
    monkeypatch.setenv(K.CACHE_ENV, str(tmp_path / "cache"))
    cc = K._compiler()
    before = K._build(cc)
    with open(src / K.HEADER.name, "a") as f:
        f.write("/* edited */\n")
    after = K._build(cc)
    assert after != before and after.is_file() and before.is_file()


def test_broken_compiler_is_reported_not_raised(tmp_path, monkeypatch):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: no' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv(K.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(K, "_loaded", False)
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_problem", None)
    assert not K.cpu_kernel_available()
    assert "failed" in K.cpu_kernel_problem()
    # the adapter then routes with the torch reference, and says so once
    runtime = rt.ProcessState(PluginSettings(enabled=True,
                                             selector=SelectorConfig(policy="xshare", budget=3, warmup_k=0)))
    runtime.push(rt.ForwardState(mode="decode"))
    logits = torch.randn(6, 8)
    ids, w = _vanilla(logits, 2)
    out = layer.route(runtime, {"topk_ids": ids, "topk_weights": w, "router_logits": logits, "layer_id": 0,
                         "num_token_non_padded": None}, topk_config=_topk_config(2))
    assert out is not None and torch.unique(out["topk_ids"]).numel() <= 3
    assert runtime.stats.snapshot()["fallbacks_total"] == 0


def _vanilla(logits, k):
    w, ids = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)
    return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def _topk_config(k):
    from types import SimpleNamespace

    return SimpleNamespace(top_k=k, num_shared_topk_slots=0, allow_routed_experts_capture=True,
                           scoring_func="softmax", renormalize=True, custom_routing_function=None,
                           correction_bias=None, use_grouped_topk=False, num_expert_group=None, topk_group=None,
                           routed_scaling_factor=None)


@pytest.mark.parametrize("policy", ["xshare", "topk", "lynx", "des_vote", "oea"])
@pytest.mark.parametrize("padded", [False, True])
def test_adapter_paths_agree(policy, padded):
    """The serving adapter with the fast path on and off: same routing, counters and metric rows."""
    runtimes = []
    for fast in (True, False):
        r = rt.ProcessState(PluginSettings(enabled=True, cpu_kernel=fast, sim_gpus=4,
                                      selector=SelectorConfig(policy=policy, budget=5, warmup_k=1)))
        r.observe = True
        r.push(rt.ForwardState(mode="decode"))
        runtimes.append(r)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        logits = (torch.randn(16, 24, generator=g) * 2).round(decimals=1)
        ids, w = _vanilla(logits, 4)
        nt = torch.tensor(11) if padded else None
        outs = [layer.route(r, {"topk_ids": ids, "topk_weights": w, "router_logits": logits, "layer_id": step % 3,
                         "num_token_non_padded": nt}, topk_config=_topk_config(4)) for r in runtimes]
        assert torch.equal(outs[0]["topk_ids"], outs[1]["topk_ids"])
        assert outs[0]["topk_ids"].dtype == ids.dtype
        assert torch.equal(outs[0]["topk_weights"], outs[1]["topk_weights"])
    snaps = [r.stats.snapshot() for r in runtimes]
    assert snaps[0]["layers"] == snaps[1]["layers"] and snaps[0]["applied"] == 25
    assert snaps[0]["fallbacks_total"] == snaps[1]["fallbacks_total"] == 0
    torch.testing.assert_close(runtimes[0].stats.drain_window(), runtimes[1].stats.drain_window(),
                               rtol=1e-5, atol=1e-6)


def test_a_mass_target_is_chosen_in_torch_and_routed_in_c(monkeypatch):
    """The C set is XShare's budget fill; with target_mass the set comes from the torch policy (its
    batch_set is called) and C only routes inside it, giving the reference's routing exactly."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 32, generator=g) * 2
    prefer = torch.topk(torch.softmax(logits, -1), 4).indices.to(torch.int32)
    cfg = SelectorConfig(policy="xshare", budget=32, warmup_k=1, target_mass=0.6)
    assert K.cpu_kernel_supports(cfg, logits)
    from xshare.selection.policies import xshare as xshare_policy

    seen = []
    original = xshare_policy.XShare.batch_set
    monkeypatch.setattr(xshare_policy.XShare, "batch_set", lambda self, b: seen.append(1) or original(self, b))
    got = K.cpu_route(logits, 4, cfg, engine_ids=prefer)
    assert seen, "the torch set was not used"
    want = reference(logits, 4, cfg, prefer, None)
    assert torch.equal(got.routing.topk_ids, want.topk_ids)
    assert torch.equal(got.routing.topk_weights, want.topk_weights)
    full = K.cpu_route(logits, 4, cfg.replace(target_mass=None), engine_ids=prefer)
    assert int(got.routing.active.sum()) < int(full.routing.active.sum())
