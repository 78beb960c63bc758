"""The selector's hot path never synchronises with the host (what CUDA-graph capture requires).

Two independent proofs on the CPU:
* on ``device='meta'`` tensors (shapes, no data) any data-dependent step — ``.item()``, ``bool(t)``,
  ``nonzero()``, boolean-mask indexing, a host copy — raises, so running every policy there end to end
  shows the path is data-independent;
* on real CPU tensors, the Tensor methods that read values back to Python are patched to raise while
  the selector runs.
The fused kernel's host side (argument binding and launch) is checked the same way, with the two
kernel launches recorded instead of run (there is no GPU here; the kernels themselves are checked
against the reference in test_kernel_interpret.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from xshare.selection import Placement, SelectorConfig, SelectorKnobs, available_policies, get_policy, select
from xshare.selection.backends.triton import launch
from xshare.selection.backends.triton.route import kernel_supports

T, E, TOP_K, G = 12, 16, 4, 4


def _config(policy: str) -> SelectorConfig:
    return SelectorConfig(policy=policy, budget=6, warmup_k=1)


def _inputs(policy: str, device: str, *, replicas: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=gen).to(device)
    cfg = _config(policy)
    kw = {
        "knobs": SelectorKnobs.create(cfg, E, TOP_K, device),
        "num_tokens": torch.tensor(T - 3, device=device),
        "validate": False,
    }
    if policy == "xshare_spec":
        kw["groups"] = (torch.arange(T) // 3).to(device)
    if get_policy(policy).needs_placement or replicas:
        if replicas:  # 20 slots on 4 GPUs: 4 experts have a second replica
            p2l = torch.cat([torch.arange(E), torch.tensor([0, 5, 9, 13])])
            kw["placement"] = Placement.from_physical(p2l, G, E).to(device)
        else:
            kw["placement"] = Placement.contiguous(E, G).to(device)
    return {"router_logits": logits, "top_k": TOP_K, "config": cfg, **kw}


_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


@contextlib.contextmanager
def _forbid_host_sync(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    def make(name: str):
        def forbidden(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host synchronisation: Tensor.{name}() called in the hot path")
        return forbidden

    with monkeypatch.context() as m:
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, make(name))
        m.setattr(torch, "nonzero", make("torch.nonzero"))
        yield calls


@pytest.mark.parametrize("policy", available_policies())
def test_every_policy_runs_on_meta_tensors(policy):
    kw = _inputs(policy, "meta")
    routing = select(**kw)
    assert routing.topk_ids.device.type == "meta"
    assert routing.topk_ids.shape == (T, TOP_K) and routing.topk_ids.dtype == torch.int32
    assert routing.topk_weights.shape == (T, TOP_K) and routing.topk_weights.dtype == torch.float32
    assert routing.active.shape == (E,) and routing.active.dtype == torch.bool


def test_replica_assignment_runs_on_meta_tensors():
    kw = _inputs("xshare_ep", "meta", replicas=True)
    routing = select(**kw)
    assert routing.physical_ids is not None and routing.physical_ids.device.type == "meta"


def test_meta_tensors_do_catch_a_host_sync():
    # the proof above only means something if meta tensors refuse value reads
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(torch.ones(2, device="meta").any())
    with pytest.raises((RuntimeError, NotImplementedError)):
        select(**{**_inputs("xshare", "meta"), "validate": True})  # validation reads values: not the hot path


@pytest.mark.parametrize("policy", available_policies())
def test_no_value_reads_on_cpu(policy, monkeypatch):
    kw = _inputs(policy, "cpu", replicas=policy == "xshare_ep")
    expected = select(**kw)
    with _forbid_host_sync(monkeypatch) as calls:
        routing = select(**kw)
    assert calls == []
    assert torch.equal(routing.topk_ids, expected.topk_ids)


def test_the_sync_guard_fires(monkeypatch):
    kw = _inputs("xshare", "cpu")
    with _forbid_host_sync(monkeypatch) as calls, pytest.raises(AssertionError, match="host synchronisation"):
        select(**{**kw, "validate": True})
    assert calls and calls[0] == "__bool__"


class _Recorder:
    """Stands in for a compiled kernel: records each launch (grid, arguments) instead of running it
    (and writes valid expert ids, so the replica assignment after the launches has something to read)."""

    def __init__(self, log: list):
        self.log = log

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.log.append((grid, kwargs))
            if "ids_ptr" in kwargs:
                kwargs["ids_ptr"].zero_()
        return launch


def _check_launches(log: list, knobs: SelectorKnobs, device: str, rows: int) -> None:
    assert len(log) == 2  # exactly two launches: the gate grid, then the set-and-route grid
    (gate_grid, gate_args), (route_grid, route_args) = log
    assert gate_grid == route_grid and gate_grid[0] == -(-rows // gate_args["BT"])
    # every runtime knob reaches the kernels as a device tensor (read at replay), never as a host value
    assert gate_args["warmup_ptr"] is knobs.warmup_k
    assert route_args["budget_ptr"] is knobs.budget and route_args["cap_ptr"] is knobs.gpu_cap
    assert route_args["tau_ptr"] is knobs.target_mass and route_args["enabled_ptr"] is knobs.enabled
    assert route_args["min_ptr"] is knobs.min_tokens and route_args["max_ptr"] is knobs.max_tokens
    assert gate_args["NT_MODE"] == 2 and gate_args["nt_ptr"].device.type == device
    tensors = [v for args in (gate_args, route_args) for v in args.values() if isinstance(v, torch.Tensor)]
    assert all(t.device.type == device for t in tensors)


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep"])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_fused_host_path_is_sync_free(policy, device, monkeypatch):
    kw = _inputs(policy, device, replicas=policy == "xshare_ep")
    log: list = []
    monkeypatch.setattr(launch, "kernels", lambda interpret: (_Recorder(log), _Recorder(log)))
    with _forbid_host_sync(monkeypatch) as calls:
        routing = select(**kw, backend="triton")
    assert calls == []
    _check_launches(log, kw["knobs"], device, T)
    assert routing.topk_ids.device.type == device and routing.topk_ids.shape == (T, TOP_K)
    if policy == "xshare_ep":
        assert routing.physical_ids is not None and routing.physical_ids.shape == (T, TOP_K)


# Router families (biased / grouped gates, routed by SGLang's gate restricted to the set): the same two
# proofs, so these layers can route inside captured CUDA graphs too.
def _specs(device: str) -> dict:
    from xshare.selection.routers.spec import RouterSpec

    gen = torch.Generator().manual_seed(3)
    bias = (torch.randn(E, generator=gen) * 0.1).to(device)
    return {
        "biased_grouped": RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=4, topk_group=2,
                                     routed_scaling_factor=2.5, num_fused_shared_experts=1,
                                     fused_shared_experts_scaling_factor=1.0),
        "one_group_bias": RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=1, topk_group=1,
                                     routed_scaling_factor=2.5, scaling_in_weights=True),
        "grouped_softmax": RouterSpec(scoring="softmax", num_expert_group=4, topk_group=2, renormalize=False,
                                      routed_scaling_factor=16.0),
        "plain_bias": RouterSpec(scoring="sigmoid", correction_bias=bias),
        "sqrtsoftplus": RouterSpec(scoring="sqrtsoftplus"),
        "llama4": RouterSpec(scoring="sigmoid", renormalize=False, custom="llama4"),
    }


def _router_call(family: str, policy: str, device: str):
    from xshare.selection.decide import LayerCall
    from xshare.selection.routers.gate import reference_route

    kw = _inputs(policy, device)
    spec = _specs(device)[family]
    top_k = 1 if family == "llama4" else TOP_K
    logits = kw["router_logits"]
    if device == "meta":
        engine_ids = torch.empty(T, top_k, dtype=torch.int32, device=device)
    else:
        engine_ids = reference_route(logits, top_k, spec, exact=False).topk_ids[:, :top_k]
    knobs = SelectorKnobs.create(kw["config"], E, top_k, device)
    return LayerCall(router_logits=logits, top_k=top_k, layer=spec, engine_ids=engine_ids,
                     num_tokens=kw["num_tokens"], groups=kw.get("groups"), placement=kw.get("placement"),
                     knobs=knobs), kw["config"]


ROUTER_FAMILIES = ["biased_grouped", "one_group_bias", "grouped_softmax", "plain_bias", "sqrtsoftplus", "llama4"]


@pytest.mark.parametrize("family", ROUTER_FAMILIES)
@pytest.mark.parametrize("policy", available_policies())
def test_router_families_run_on_meta_tensors(family, policy):
    from xshare.selection.decide import decide

    call, config = _router_call(family, policy, "meta")
    decision = decide(call, config)
    assert decision.replaced is not None  # the router-spec path, not the plain one
    assert decision.routing.topk_ids.device.type == "meta"
    assert decision.routing.topk_ids.shape == (T, call.top_k)
    assert decision.routing.topk_weights.shape == (T, call.top_k)
    assert decision.short_rows.device.type == "meta"


@pytest.mark.parametrize("family", ROUTER_FAMILIES)
@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "xshare_spec", "lynx", "topk"])
def test_router_families_read_no_values_on_cpu(family, policy, monkeypatch):
    from xshare.selection.decide import decide

    call, config = _router_call(family, policy, "cpu")
    expected = decide(call, config)
    with _forbid_host_sync(monkeypatch) as calls:
        got = decide(call, config)
    assert calls == []
    assert torch.equal(got.routing.topk_ids, expected.routing.topk_ids)
    assert torch.equal(got.replaced, expected.replaced)
    if policy != "topk" and family != "llama4":  # the budget (6 of 16) really restricted some rows
        assert bool(expected.replaced.any())


@pytest.mark.parametrize("policy", [p for p in available_policies() if "target_mass" in get_policy(p).knobs])
def test_target_mass_is_sync_free_and_read_from_its_knob(policy, monkeypatch):
    """tau lives in a device tensor: the meta run is data-independent, the CPU run reads no value back,
    and an in-place knob update changes the next call (what a captured graph replays)."""
    cfg = SelectorConfig(policy=policy, budget=E, warmup_k=1, target_mass=0.95)
    meta = {**_inputs(policy, "meta"), "config": cfg, "knobs": SelectorKnobs.create(cfg, E, TOP_K, "meta")}
    assert select(**meta).active.device.type == "meta"
    kw = {**_inputs(policy, "cpu"), "config": cfg}
    kw["knobs"] = knobs = SelectorKnobs.create(cfg, E, TOP_K, "cpu")
    assert knobs.target_mass.dtype == torch.float32 and float(knobs.target_mass) == pytest.approx(0.95)
    with _forbid_host_sync(monkeypatch) as calls:
        wide = select(**kw)
    assert calls == []
    pointer = knobs.target_mass.data_ptr()
    knobs.update(cfg.replace(target_mass=0.3))
    assert knobs.target_mass.data_ptr() == pointer  # in place
    with _forbid_host_sync(monkeypatch) as calls:
        narrow = select(**kw)  # same config object: only the knob changed
    assert calls == []
    assert int(narrow.active.sum()) < int(wide.active.sum())
    knobs.update(cfg.replace(target_mass=None))  # off: the budget alone (E) keeps every token's own top-k
    assert float(knobs.target_mass) == 0.0
    assert int(select(**kw).active.sum()) >= int(wide.active.sum())


def test_the_fused_kernel_reads_the_mass_target_from_its_knob():
    cfg = SelectorConfig(policy="xshare", target_mass=0.95)  # no budget given: the mass target alone
    assert kernel_supports(cfg, E)  # backend='auto' on CUDA routes tau through the kernels too
    kw = _inputs("xshare", "cpu")
    kw["config"] = cfg
    kw["knobs"] = knobs = SelectorKnobs.create(cfg, E, TOP_K, "cpu")
    wide = select(**kw, backend="triton")
    assert torch.equal(wide.topk_ids, select(**kw).topk_ids)
    knobs.update(cfg.replace(target_mass=0.3))  # in place: what a replayed graph would read
    narrow = select(**kw, backend="triton")
    assert torch.equal(narrow.topk_ids, select(**kw).topk_ids)
    assert int(narrow.active.sum()) < int(wide.active.sum())


@pytest.mark.parametrize("family", ROUTER_FAMILIES)
@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "topk"])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_router_families_fused_host_path_is_sync_free(family, policy, device, monkeypatch):
    """decide(backend='triton') for every router family: argument binding and the two launches only
    (recorded, not run), no value read back, every knob a device tensor."""
    from xshare.selection.decide import decide

    call, config = _router_call(family, policy, device)
    log: list = []
    monkeypatch.setattr(launch, "kernels", lambda interpret: (_Recorder(log), _Recorder(log)))
    with _forbid_host_sync(monkeypatch) as calls:
        decision = decide(call, config.replace(backend="triton"))
    assert calls == []
    assert decision.backend == "triton" and decision.reason is None
    _check_launches(log, call.knobs, device, T)
    assert log[0][1]["MODE"] == 1 and log[0][1]["bias_ptr"] is call.layer.correction_bias
    assert decision.replaced is not None and decision.replaced.device.type == device
