"""The routing hook's per-call bookkeeping, added on the device (``xshare.sglang.observe.tally``,
``SelectorStats.record_call``).

* Through the real adapter (``xshare.sglang.layer.route``), the layer sums that ``/xshare/stats`` and the stats
  file report, and the window rows the Prometheus metrics are made of, equal the per-call definitions
  computed independently for every call (``routing_checksum``, ``call_figures``, SGLang's active experts
  and the changed-token sorts): padding rows, exact rows, replicas, plain and router-spec layers, the C
  kernel's calls feeding the same buffers.
* The Triton kernel, run by Triton's interpreter, adds what the torch path adds (integers identical,
  float figures to float32 rounding), and compiles for sm_90 without spilling.
* The buffers are made once, reset in place by the fold, never read in the hot path; the torch path runs
  on meta tensors.
* Operations per ``record_call`` call (B = 16, E = 128, observed), counted with a torch dispatch mode: 86
  kernel-launching aten ops before this bookkeeping moved to the device (96 with views); now at most
  :data:`MAX_TORCH_OPS` on the torch path and one kernel launch on the CUDA path.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xshare.selection import Placement, SelectorConfig
from xshare.selection.common import active_experts, valid_rows
from xshare.sglang import layer as routing
from xshare.sglang import state as rt
from xshare.sglang.observe import stats, tally
from xshare.sglang.observe.figures import call_figures, routing_checksum
from xshare.sglang.observe.metrics import Exporter
from xshare.sglang.observe.stats import WINDOW_FIELDS, SelectorStats
from xshare.sglang.observe.tally import LAYER_SUMS, Target
from xshare.sglang.settings import PluginSettings

E, K, T = 32, 4, 12
NF = len(WINDOW_FIELDS)
MASS, TOP1 = WINDOW_FIELDS.index("mass_kept"), WINDOW_FIELDS.index("top1_kept")  # the float figures
MAX_TORCH_OPS = 42  # the torch path of one observed record_call (B = 16, E = 128); 86 before
VIEW_OPS = {"view", "unsqueeze", "expand", "slice", "select", "alias", "reshape", "t", "transpose", "squeeze",
            "_unsafe_view", "as_strided", "detach", "permute", "unbind", "split", "lift_fresh"}


def topk_config(**kw):
    cfg = dict(top_k=K, num_shared_topk_slots=0, allow_routed_experts_capture=True, scoring_func="softmax",
               renormalize=True, custom_routing_function=None, correction_bias=None, use_grouped_topk=False,
               num_expert_group=None, topk_group=None, routed_scaling_factor=None,
               apply_routed_scaling_factor_on_output=False, fused_shared_experts_scaling_factor=None)
    cfg.update(kw)
    return SimpleNamespace(**cfg)


def _expected(runtime, call, decision, placement):
    """The layer sums and the window row of one call, by the per-call definitions."""
    r = decision.routing
    valid = valid_rows(call.num_rows, call.num_token_non_padded, call.router_logits.device)
    old = call.engine_ids.to(torch.int64)
    vanilla = active_experts(old.clamp_min(0), valid, call.num_experts)
    changed = (torch.sort(old, 1).values != torch.sort(r.topk_ids.to(torch.int64), 1).values).any(1) & valid
    sums = [1, int(r.active.sum()), int(vanilla.sum()), int(valid.sum()), int(changed.sum()),
            int(routing_checksum(r.topk_ids, valid)), 0 if r.cap_bound is None else int(r.cap_bound)]
    mp = placement if placement is not None else \
        runtime.placements.for_layer(call.layer_id, call.num_experts, call.router_logits.device)
    row = call_figures(call.layer_id, call.router_logits, old, r.topk_ids, r.active, vanilla, valid,
                       mp.primary_gpu, mp.num_gpus, decision.config.scoring)
    return sums, row


def _watch(monkeypatch, runtime):
    """Record the expected figures of every applied call next to the real bookkeeping."""
    seen = {"sums": defaultdict(lambda: [0] * len(LAYER_SUMS)), "rows": [], "paths": Counter()}
    original = routing.record_call

    def record(rt_, call, decision, placement):
        sums, row = _expected(rt_, call, decision, placement)
        acc = seen["sums"][call.layer_id]
        for i, v in enumerate(sums):
            acc[i] += v
        seen["rows"].append(row)
        seen["paths"]["c" if decision.cpu is not None else "torch"] += 1
        seen["paths"]["spec"] += decision.replaced is not None
        original(rt_, call, decision, placement)

    monkeypatch.setattr(routing, "record_call", record)
    return seen


def _replicas() -> Placement:
    """40 physical slots of 32 experts on 4 GPUs: 8 experts have a second replica."""
    gen = torch.Generator().manual_seed(3)
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (8,), generator=gen)])
    return Placement.from_physical(p2l[torch.randperm(40, generator=gen)], 4, E)


def _steps():
    """(layer, logits, engine ids, num_token_non_padded, exact rows, topk config) of the calls."""
    gen = torch.Generator().manual_seed(11)
    bias = torch.randn(E, generator=gen) * 0.1
    spec_cfg = topk_config(scoring_func="sigmoid", correction_bias=bias, use_grouped_topk=True, num_expert_group=4,
                           topk_group=2, routed_scaling_factor=2.5)
    out = []
    for i, (layer, nt, exact, spec) in enumerate([
            (3, torch.tensor(9), None, False), (5, 7, None, False), (3, None, None, False),
            (3, torch.tensor(10), [1, 4], False), (5, torch.tensor(12), None, False),
            (7, None, None, True), (7, torch.tensor(8), None, True), (7, torch.tensor(11), [0, 2], True)]):
        logits = torch.randn(T, E, generator=gen) * 2
        logits[i % T, :3] = float("-inf")  # experts a token cannot use
        if spec:
            choice = torch.sigmoid(logits) + bias
            grouped = choice.view(T, 4, E // 4).topk(2, dim=-1).values.sum(-1)  # the groups' top-2 scores
            keep = torch.zeros(T, 4, dtype=torch.bool).scatter_(1, grouped.topk(2, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // 4, 1), float("-inf"))
            ids = torch.topk(choice, K).indices.to(torch.int32)
        else:
            ids = torch.topk(torch.softmax(logits, -1), K).indices
        if nt is not None:  # padding rows hold garbage, as in a replayed CUDA graph
            n = int(nt)
            ids[n:] = torch.randint(-1, E, (T - n, K), generator=gen).to(ids.dtype)
        out.append((layer, logits, ids, nt, exact, topk_config() if not spec else spec_cfg))
    return out


def _route_all(runtime, steps):
    for layer, logits, ids, nt, exact, cfg in steps:
        state = rt.ForwardState(mode="decode")
        if exact is not None:
            state.exact = torch.zeros(T, dtype=torch.bool)
            state.exact[exact] = True
        runtime.push(state)
        w = torch.full(ids.shape, 1.0 / K)
        out = routing.route(runtime, {"topk_ids": ids, "topk_weights": w, "router_logits": logits, "layer_id": layer,
                             "num_token_non_padded": nt}, topk_config=cfg)
        runtime.pop()
        assert out is not None, runtime.stats.fallbacks


@pytest.mark.parametrize("policy", ["xshare", "xshare_ep"])
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_device_figures_match_the_per_call_definitions(policy, cpu_kernel, monkeypatch):
    mass = 0.9 if policy == "xshare" else None  # a mass target the budget of 6 stops short on some calls
    runtime = rt.ProcessState(PluginSettings(enabled=True, cpu_kernel=cpu_kernel, sim_gpus=4, selector=SelectorConfig(
        policy=policy, budget=6, warmup_k=1, target_mass=mass)))
    runtime.enable_observability(Exporter(0, prometheus=False))
    if policy == "xshare_ep":  # SGLang's placement with redundant experts: the policy picks the replicas
        placement = _replicas()
        runtime.placements.source = lambda layer_id, num_experts: placement
    seen = _watch(monkeypatch, runtime)
    steps = _steps()
    _route_all(runtime, steps)
    assert runtime.stats.fallbacks == {}
    assert seen["paths"]["spec"] == 3 and seen["paths"]["c" if cpu_kernel and policy == "xshare" else "torch"] >= 3

    snap = runtime.stats.snapshot()  # what the stats file and /xshare/stats read
    assert snap["applied"] == runtime.stats.applied == len(steps)
    for layer, want in seen["sums"].items():
        got = snap["layers"][str(layer)]
        assert [got[k] for k in LAYER_SUMS] == want, (layer, got, want)
        assert got["mean_activated"] == want[1] / want[0]
    assert sum(v["changed_tokens"] for v in snap["layers"].values()) > 0  # the budget really changed rows
    assert snap["mass_cap_bound"] == sum(v[-1] for v in seen["sums"].values())
    assert (snap["mass_cap_bound"] > 0) == (mass is not None)

    rows = runtime.stats.drain_window()  # what the metrics flush reads
    want_rows = torch.stack(seen["rows"])
    assert rows.shape == want_rows.shape == (len(steps), NF + 2 * 4)
    counts = [i for i in range(rows.shape[1]) if i not in (MASS, TOP1)]
    assert torch.equal(rows[:, counts], want_rows[:, counts])  # counts, peaks, ratio, per-GPU figures
    torch.testing.assert_close(rows, want_rows, atol=2e-6, rtol=0)

    # a second round: the fold took what it read off the device rows, the host totals keep counting
    page = runtime.stats._pages["cpu"][0]
    pointer = page.sums.data_ptr()
    assert not page.sums.any()
    _route_all(runtime, steps)
    again = runtime.stats.snapshot()
    assert page.sums.data_ptr() == pointer and not page.sums.any()
    for layer, want in seen["sums"].items():
        assert [again["layers"][str(layer)][k] for k in LAYER_SUMS] == want  # the oracle summed both rounds
    runtime.flush_metrics()  # the exporter's per-layer summary (GET /xshare/stats) from the same rows
    summary = runtime.metrics.last["layers"]
    for layer in seen["sums"]:
        mine = [r for r in seen["rows"][len(steps):] if int(r[0]) == layer]
        assert summary[str(layer)]["calls"] == len(mine)
        assert summary[str(layer)]["active"] == pytest.approx(sum(float(r[1]) for r in mine) / len(mine))
        assert summary[str(layer)]["mass_kept"] == pytest.approx(sum(float(r[6]) for r in mine) / len(mine))


def _inputs(seed, rows, experts, k, *, dtype=torch.float32, padded=True, shared=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, experts, generator=gen) * 2
    logits[0, : experts // 4] = float("-inf")
    if rows > 3:
        logits[1] = torch.round(logits[1])  # ties: the first highest logit is top-1
    old = torch.topk(logits, k).indices
    new = old.clone()
    swap = torch.rand(rows, generator=gen) < 0.5
    new[swap, 0] = (new[swap, 0] + 1 + torch.randint(0, experts - 1, (int(swap.sum()),), generator=gen)) % experts
    new = new.to(torch.int32)
    if shared:  # SGLang's ids with a shared-expert column after the routed ones: a strided view
        old = torch.cat([old, torch.full((rows, 1), experts)], 1)[:, :k]
    n = max(1, rows - 3) if padded else rows
    if padded:
        logits[n:] = float("nan")  # garbage padding rows
        old[n:] = -1
    active = torch.zeros(experts, dtype=torch.bool)
    active[new[:n].flatten().long()] = True
    return logits.to(dtype), old, new, active, n


def _buffers(gpus):
    return (torch.zeros(3, len(LAYER_SUMS), dtype=torch.int64), torch.zeros(4, NF + 2 * gpus),
            torch.zeros((), dtype=torch.int64))


CASES = [  # rows, experts, k, gpus, scoring, num_tokens kind, dtype, shared column, replicas, cap bound
    (16, 128, 8, 8, "softmax", "tensor", torch.float32, False, False, True),
    (5, 16, 4, 3, "sigmoid", "int", torch.float32, True, False, False),
    (37, 160, 6, 8, "softmax", "none", torch.bfloat16, False, True, None),
    (1, 8, 2, 1, "sigmoid", "tensor", torch.float32, False, False, None),
    (64, 256, 8, 32, "sigmoid", "tensor", torch.bfloat16, True, False, True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("observe", [True, False])
def test_kernel_adds_what_the_torch_path_adds(case, observe):
    rows, experts, k, gpus, scoring, nt_kind, dtype, shared, replicas, bound = CASES[case]
    if not tally.kernel_available():
        pytest.skip("Triton is not installed")
    logits, old, new, active, n = _inputs(case, rows, experts, k, dtype=dtype, padded=nt_kind != "none",
                                          shared=shared)
    nt = {"tensor": torch.tensor(n), "int": n, "none": None}[nt_kind]
    if replicas:
        p2l = torch.cat([torch.arange(experts), torch.arange(gpus) * 3 % experts])
        placement = Placement.from_physical(p2l, gpus, experts)
    else:
        placement = Placement.contiguous(experts, gpus)
    got = {}
    for backend in ("torch", "triton"):
        sums, window, idx = _buffers(gpus)
        target = Target(sums, 1, 9, torch.tensor(9.0), window if observe else None, idx if observe else None)
        for _ in range(3):  # the ring wraps after 4 rows; the sums keep adding
            tally.tally(target, logits=logits, engine_ids=old, chosen_ids=new, active=active, num_tokens=nt,
                        expert_gpu=placement.primary_gpu, num_gpus=gpus, scoring=scoring, backend=backend,
                        cap_bound=None if bound is None else torch.tensor(bound))
        got[backend] = (sums, window, idx)
    (s0, w0, i0), (s1, w1, i1) = got["torch"], got["triton"]
    assert torch.equal(s0, s1), (s0, s1)
    assert s0[1, 0] == 3 and s0[1, 3] == 3 * n and not s0[0].any() and not s0[2].any()
    assert s0[1, LAYER_SUMS.index("mass_cap_bound")] == (3 if bound else 0)
    if observe:
        assert int(i0) == int(i1) == 3
        ints = [c for c in range(w0.shape[1]) if c not in (MASS, TOP1)]
        assert torch.equal(w0[:, ints], w1[:, ints])
        torch.testing.assert_close(w0, w1, atol=1e-6, rtol=0)
        assert w0[0, 0] == 9 and w0[0, 8] == n and 0 < w0[0, 6] <= 1
    else:
        assert int(i0) == int(i1) == 0 and not w0.any() and not w1.any()


def test_window_row_against_its_definition_with_ties_and_padding():
    logits, old, new, active, n = _inputs(7, 16, 128, 8)
    placement = Placement.contiguous(128, 8)
    sums, window, idx = _buffers(8)
    tally.tally_torch(Target(sums, 0, 4, torch.tensor(4.0), window, idx), logits=logits, engine_ids=old,
                      chosen_ids=new, active=active, num_tokens=torch.tensor(n), expert_gpu=placement.primary_gpu,
                      num_gpus=8)
    valid = torch.arange(16) < n
    vanilla = active_experts(old.clamp_min(0), valid, 128)
    want = call_figures(4, logits.nan_to_num(), old, new, active, vanilla, valid, placement.primary_gpu, 8)
    torch.testing.assert_close(window[0], want, atol=1e-6, rtol=0)
    assert 0 < float(window[0, 7]) < 1  # some tokens lost their top-1 expert
    changed = (torch.sort(old, 1).values != torch.sort(new.long(), 1).values).any(1) & valid
    assert sums[0].tolist() == [1, int(active.sum()), int(vanilla.sum()), n, int(changed.sum()),
                                int(routing_checksum(new, valid)), 0]


def test_per_gpu_figures_follow_a_placement_rewritten_in_place():
    """An EPLB rebalance rewrites the device placement in place: the next call sees the new GPUs."""
    logits, old, new, active, _ = _inputs(6, 8, 16, 2, padded=False)
    gpu = Placement.contiguous(16, 2).primary_gpu.clone()
    rows = []
    for _ in range(2):
        sums, window, idx = _buffers(2)
        tally.tally_torch(Target(sums, 0, 1, torch.tensor(1.0), window, idx), logits=logits, engine_ids=old,
                          chosen_ids=new, active=active, expert_gpu=gpu, num_gpus=2)
        rows.append(window[0].clone())
        gpu.copy_(1 - gpu)  # every expert moves to the other GPU
    assert rows[0][NF] != rows[0][NF + 1]  # the two GPUs hold different numbers of selected experts
    assert torch.equal(rows[1][NF:], torch.cat([rows[0][NF:NF + 2].flip(0), rows[0][NF + 2:].flip(0)]))


@pytest.mark.parametrize("observe", [True, False])
def test_torch_path_runs_on_meta_tensors(observe):
    """No data-dependent step: the same ops on shapes only (what CUDA-graph capture needs)."""
    dev = "meta"
    logits = torch.empty(16, 64, device=dev)
    ids = torch.empty(16, 4, dtype=torch.int32, device=dev)
    target = Target(torch.zeros(2, len(LAYER_SUMS), dtype=torch.int64, device=dev), 1, 0,
                    torch.zeros((), device=dev), torch.zeros(8, NF + 8, device=dev) if observe else None,
                    torch.zeros((), dtype=torch.int64, device=dev) if observe else None)
    tally.tally_torch(target, logits=logits, engine_ids=ids, chosen_ids=ids,
                      active=torch.empty(64, dtype=torch.bool, device=dev),
                      num_tokens=torch.empty((), dtype=torch.int64, device=dev),
                      expert_gpu=torch.empty(64, dtype=torch.int64, device=dev), num_gpus=4)
    assert target.sums.device.type == "meta"


_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


class _Launches:
    """Stands in for the compiled kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        return lambda **kw: self.log.append((grid, kw))


def _runtime_call(cpu_kernel=False, rows=16, experts=128, k=8):
    runtime = rt.ProcessState(PluginSettings(enabled=True, cpu_kernel=cpu_kernel, sim_gpus=8,
                                        selector=SelectorConfig(policy="xshare", budget=32, warmup_k=1)))
    runtime.enable_observability(Exporter(0, prometheus=False))
    logits, old, _new, _active, n = _inputs(1, rows, experts, k, padded=False)
    args = {"topk_ids": old.to(torch.int32), "topk_weights": torch.full((rows, k), 1.0 / k), "router_logits": logits,
            "layer_id": 3, "num_token_non_padded": torch.tensor(n - 3)}
    captured = {}
    original = routing.record_call

    def keep(rt_, call, decision, placement):
        captured.update(call=call, decision=decision, placement=placement)
        original(rt_, call, decision, placement)

    routing.record_call = keep
    try:
        runtime.push(rt.ForwardState(mode="decode"))
        assert routing.route(runtime, args, topk_config=topk_config(top_k=k)) is not None
    finally:
        routing.record_call = original
    return runtime, captured


def _count_ops(fn):
    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return sum(n for op, n in c.ops.items() if op not in VIEW_OPS), c.ops


def test_record_op_counts(monkeypatch):
    """Ops of one observed record_call (B = 16, E = 128, top-8, 8 GPUs) on each path, no value read back."""
    runtime, c = _runtime_call()
    again = lambda: routing.record_call(runtime, c["call"], c["decision"], c["placement"])  # noqa: E731
    with monkeypatch.context() as m:  # nothing reads a value back to the host
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, lambda *a, _n=name, **kw: pytest.fail(f"Tensor.{_n}() in record_call"))
        torch_ops, ops = _count_ops(again)
    print(f"torch path: {torch_ops} ops besides views: {dict(ops)}")
    assert torch_ops <= MAX_TORCH_OPS
    assert ops["sort"] == 0 and ops["index_add_"] == 0

    launches = _Launches()  # the CUDA path, its launch recorded instead of run
    monkeypatch.setattr(tally, "_use_kernel", lambda backend, logits, num_gpus: True)
    monkeypatch.setattr(tally, "_kernel", lambda: launches)
    monkeypatch.setattr(tally, "interpreted", lambda k: (k,))
    kernel_ops, ops = _count_ops(again)
    print(f"kernel path: 1 launch and {kernel_ops} ops besides views: {dict(ops)}")
    assert len(launches.log) == 1 and launches.log[0][0] == (1,)
    args = launches.log[0][1]
    assert kernel_ops == 0  # views only: the arguments are the tensors as they are
    assert args["sums_ptr"] is runtime.stats._pages["cpu"][0].sums and args["window_ptr"] is runtime.stats._window
    assert args["widx_ptr"] is runtime.stats._window_idx and args["OBSERVE"] and args["NT_MODE"] == 2
    assert args["HAS_BOUND"] and args["bound_ptr"].data_ptr() == c["decision"].routing.cap_bound.data_ptr()
    assert args["nt_ptr"].data_ptr() == c["call"].num_token_non_padded.data_ptr()  # read on the device

    monkeypatch.undo()
    runtime, c = _runtime_call(cpu_kernel=True)  # the C kernel's call: host numbers into the same buffers
    if c["decision"].cpu is None:
        pytest.skip(f"the C kernel is unavailable: {runtime.cpu_kernel_ready()}")
    c_ops, ops = _count_ops(lambda: routing.record_call(runtime, c["call"], c["decision"], c["placement"]))
    print(f"C path: {c_ops} ops besides views: {dict(ops)}")
    assert c_ops <= 4


def test_buffers_are_made_once_and_not_under_capture(monkeypatch):
    st = SelectorStats()
    logits, old, new, active, n = _inputs(2, 8, 16, 2, padded=False)
    placement = Placement.contiguous(16, 2)
    kw = {"logits": logits, "engine_ids": old, "chosen_ids": new, "active": active, "placement": placement}
    st.record_call(1, **kw)
    page, window = st._pages["cpu"][0], st._window
    pointers = (page.sums.data_ptr(), window.data_ptr(), st._window_idx.data_ptr())
    layers = stats.LAYER_PAGE + 1
    for layer in range(2, layers + 1):
        st.record_call(layer, **kw)
    assert len(st._pages["cpu"]) == 2  # one layer more than a page holds: a second page, the first one kept
    assert (page.sums.data_ptr(), st._window.data_ptr(), st._window_idx.data_ptr()) == pointers
    assert int(st._window_idx) == layers
    monkeypatch.setattr(stats, "capturing", lambda device: True)  # a graph being captured: make nothing
    st.record_call(999, **kw)
    assert st.unrecorded == 1 and ("cpu", 999) not in st._slots
    st.record_call(1, **kw)  # a layer that has its row: recorded (the capture records the launch)
    monkeypatch.undo()
    snap = st.snapshot()
    assert snap["layers"]["1"]["calls"] == 2 and "999" not in snap["layers"]
    assert snap["applied"] == layers + 1 and st.applied == layers + 2  # the unrecorded call: host count only


def test_a_further_layer_counter_takes_its_own_column(monkeypatch):
    monkeypatch.setattr(stats, "LAYER_COLUMNS", (*LAYER_SUMS, "extra"))
    st = SelectorStats()
    logits, old, new, active, _ = _inputs(4, 6, 16, 2, padded=False)
    st.record_call(2, logits=logits, engine_ids=old, chosen_ids=new, active=active)
    st.count_layer(2, "extra", torch.tensor(5))
    st.count_layer(2, "extra", torch.tensor(True))
    got = st.snapshot()["layers"]["2"]
    assert got["extra"] == 6 and got["calls"] == 1 and got["tokens"] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_captured_record_keeps_adding_on_every_replay(backend):
    if backend == "triton" and not tally.kernel_available():
        pytest.skip("Triton is not installed")
    dev = torch.device("cuda")
    st = SelectorStats()
    logits, old, new, active, n = (t.to(dev) if isinstance(t, torch.Tensor) else t
                                   for t in _inputs(5, 16, 128, 8))
    nt = torch.tensor(n, device=dev)
    placement = Placement.contiguous(128, 8).to(dev)
    kw = {"logits": logits, "engine_ids": old, "chosen_ids": new, "active": active, "num_tokens": nt,
          "placement": placement, "backend": backend}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        st.record_call(3, **kw)  # the warm-up makes the buffers (SGLang warms up before it captures)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        st.record_call(3, **kw)
    for _ in range(5):
        graph.replay()
    nt.fill_(n - 2)  # the next replay reads the new count on the device
    graph.replay()
    torch.cuda.synchronize()
    snap = st.snapshot()["layers"]["3"]
    assert snap["calls"] == 7 and snap["tokens"] == 6 * n + n - 2
    rows = st.drain_window()
    assert rows.shape[0] == 7 and rows[:, 8].tolist() == [n] * 6 + [n - 2]


def _ptxas_dir() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return d if (d / "ptxas").exists() and (d / "cuobjdump").exists() else None


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(16, 128, 8, 8, torch.bfloat16, True), (64, 256, 8, 32, torch.bfloat16, True),
                                   (64, 384, 8, 64, torch.float32, True), (4, 1024, 8, 256, torch.bfloat16, True),
                                   (64, 128, 8, 1, torch.bfloat16, False)])
def test_kernel_compiles_for_sm90_without_spills(shape, tmp_path, monkeypatch):
    bin_dir = _ptxas_dir()
    if bin_dir is None or not tally.kernel_available():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from xshare.sglang.observe._triton_tally import _tally_kernel as kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    rows, experts, k, gpus, dtype, observe = shape
    logits = torch.randn(rows, experts).to(dtype)
    ids = torch.zeros(rows, k, dtype=torch.int32)
    sums, window, idx = _buffers(gpus)
    target = Target(sums, 1, 3, torch.tensor(3.0), window if observe else None, idx if observe else None)
    args = tally.kernel_args(target, logits=logits, engine_ids=ids, chosen_ids=ids,
                             active=torch.zeros(experts, dtype=torch.bool), num_tokens=torch.tensor(rows),
                             expert_gpu=Placement.contiguous(experts, gpus).primary_gpu, num_gpus=gpus,
                             scoring="softmax")
    num_warps = args.pop("num_warps")
    keep = {p.name for p in kernel.params if p.do_not_specialize}
    names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs = {}, {}
    for name in kernel.arg_names:  # as a launch specialises: None and (unless kept) an int 1 become constants
        value = args[name]
        one = isinstance(value, int) and not isinstance(value, bool) and value == 1 and name not in keep
        if name in names or value is None or one:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = mangle_type(value)
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "enable_fp_fusion": False})
    cubin = tmp_path / "tally.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([os.fspath(bin_dir / "cuobjdump"), "--dump-resource-usage", os.fspath(cubin)],
                           capture_output=True, text=True, check=True).stdout
    local = re.search(r"LOCAL:(\d+)", usage)
    assert local is not None and int(local.group(1)) == 0, usage
