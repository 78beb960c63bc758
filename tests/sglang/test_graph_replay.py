"""The routing hook's path under CUDA-graph capture and replay, emulated on the CPU (tests/sglang/graph_replay.py).

SGLang decodes by replaying graphs it captured at start-up, with the plugin's per-call path inside. A
replay follows only what lives in device memory: the input buffers SGLang rewrites (logits, its own
top-k, the real-row count), the plugin's device knobs and buffers. So after every change an operator
or a batch can make (selector on/off, budget, per-layer budget, target mass, warm-up, exact rows, real
rows), the replayed call must give what an eager call gives in the new state; a change a captured graph
cannot follow (the policy, the backend) must be refused while graphs exist, with the reason, and change
nothing.

Per router family x policy x change: the call is captured in the capturing state the adapter sets
under SGLang's graph capture, the change is made as the adapter makes it (settings through
``ProcessState.set_config``, exact rows through ``ProcessState.exact_rows``, a new batch and row count written
into the same buffers), the graph replayed, and its output compared with an eager ``route`` of the
same buffers (the torch path, as the graph).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from graph_replay import Graph

from conftest import require_module
from xshare.selection import SelectorConfig
from xshare.selection.routers.gate import reference_route
from xshare.selection.routers.spec import RouterSpec
from xshare.sglang import layer
from xshare.sglang import state as rt
from xshare.sglang.hooks import forward as forward_hooks
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from test_sglang_router_families import _cfg  # noqa: E402

T = 12
LAYER = 3
FAMILIES = ["softmax", "deepseek_v3", "deepseek_v2", "glm45"]
POLICIES = ["xshare", "xshare_ep", "topk", "lynx", "des_vote", "oea", "xshare_spec", "des_seq"]
MASS_POLICIES = ("xshare", "xshare_ep")  # the policies with a mass target (the others: a budget change)


def _family(name: str):  # noqa: ANN202
    if name == "softmax":
        return topk.TopKConfig(top_k=4, renormalize=True, torch_native=True, scoring_func="softmax"), 32, 4
    return _cfg(name)


class Call:
    """The hook's persistent argument buffers of one layer (what a captured graph reads)."""

    def __init__(self, cfg, e: int, k: int) -> None:  # noqa: ANN001
        self.cfg, self.e, self.k = cfg, e, k
        self.logits = torch.zeros(T, e)
        self.ids = torch.zeros(T, cfg.top_k, dtype=torch.int32)
        self.weights = torch.zeros(T, cfg.top_k)
        self.rows = torch.full((), T, dtype=torch.int32)  # SGLang's num_token_non_padded buffer
        self.spec = RouterSpec.from_topk_config(cfg) if e != 32 or cfg.correction_bias is not None \
            or cfg.use_grouped_topk else None

    def fill(self, seed: int, rows: int = T) -> None:
        """A new batch written in place: logits, SGLang's own top-k of them, the real-row count."""
        x = torch.randn(T, self.e, generator=torch.Generator().manual_seed(seed)) * 2
        self.logits.copy_(x)
        if self.spec is not None:
            own = reference_route(x, self.k, self.spec)
            ids, w = own.topk_ids, own.topk_weights
        else:
            w, ids = torch.topk(torch.softmax(x, -1), self.k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
        self.ids.copy_(ids)
        self.weights.copy_(w)
        self.rows.fill_(rows)

    def args(self) -> dict:
        return {"topk_ids": self.ids, "topk_weights": self.weights, "topk_config": self.cfg,
                "router_logits": self.logits, "layer_id": LAYER, "num_token_non_padded": self.rows,
                "expert_location_dispatch_info": None, "padded_rows_masked": False}


def _answer(out: dict | None, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:  # SGLang's own routing
        return call.ids.clone(), call.weights.clone()
    return out["topk_ids"].clone(), out["topk_weights"].clone()


def _settings(policy: str, e: int, **kw) -> PluginSettings:  # noqa: ANN003
    enabled = kw.pop("enabled", True)
    base = dict(policy=policy, budget=max(4, e // 4), warmup_k=1)
    base.update(kw)
    return PluginSettings(enabled=enabled, selector=SelectorConfig(**base), sim_gpus=4, cpu_kernel=False)


CHANGES = {
    "new_batch": lambda p, e: {},
    "budget": lambda p, e: {"budget": max(5, e // 2)},
    "per_layer_budget": lambda p, e: {"budget": {"default": max(4, e // 4), str(LAYER): e // 2 + 1}},
    "target_mass": lambda p, e: {"target_mass": 0.8} if p in MASS_POLICIES else {"budget": e},
    "warmup": lambda p, e: {"warmup_k": 2},
    "disable": lambda p, e: {"enabled": False},
    "enable": lambda p, e: {},  # captured disabled, then enabled
    "exact_rows": lambda p, e: {},  # some requests ask for exact routing
    "real_rows": lambda p, e: {},  # fewer real rows, padding after them
}


def _capture(runtime: rt.ProcessState, graph: Graph, fn):  # noqa: ANN001, ANN202
    """``fn`` captured as SGLang captures a decode batch: inside ``DecodeCudaGraphRunner.capture_one_shape``,
    which the plugin's hook wraps (the capturing state, the buffers made before SGLang captures)."""
    runner = SimpleNamespace(model_runner=SimpleNamespace(device="cpu", is_draft_worker=False),
                             capture_forward_mode=ForwardMode.DECODE, captured_req_width=1)
    runtime.scattered_input = False  # the process facts of a single-rank CPU server
    assert rt.get() is runtime  # the hook acts on the process's runtime
    return forward_hooks.capture_one_shape_hook(lambda _self: graph.capture(fn), runner)


def _replay_vs_eager(family: str, policy: str, change: str, *, exact: bool = False, rows: int = T):
    cfg, e, k = _family(family)
    call = Call(cfg, e, k)
    start = _settings(policy, e, enabled=change != "enable")
    runtime = rt.install(start)
    runtime.observe = True
    call.fill(1)
    runtime.push(rt.ForwardState(mode="decode"))  # the warm-up forward before capture
    layer.route(runtime, call.args(), cfg)
    runtime.pop()
    graph = Graph()
    captured = _capture(runtime, graph, lambda: layer.route(runtime, call.args(), cfg))
    new = _settings(policy, e, **CHANGES[change](policy, e))
    runtime.set_config(new, 2)
    call.fill(7, rows)
    flags = [bool(i % 3 == 0) for i in range(T)] if exact else None
    mask = runtime.exact_rows(flags, 1, torch.device("cpu"))
    mask = None if mask is None else mask.clone()  # the flags as the forward set them (the replay must not clear them)
    runtime.sync_knobs()  # what the forward hook does before every forward, replays included
    graph.replay()
    got = _answer(captured, call) if captured is not None else (call.ids.clone(), call.weights.clone())
    runtime.push(rt.ForwardState(mode="decode", exact=mask))
    want = _answer(layer.route(runtime, call.args(), cfg), call)
    runtime.pop()
    return got, want, runtime, call.ids.clone()


@pytest.fixture(autouse=True)
def _no_runtime_left():
    yield
    rt.uninstall()


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_replayed_call_follows_the_change(family, policy, change):
    got, want, runtime, own = _replay_vs_eager(family, policy, change, exact=change == "exact_rows",
                                               rows=T - 5 if change == "real_rows" else T)
    if change == "exact_rows":  # the flagged rows keep SGLang's own experts in the answer compared with
        flagged = torch.tensor([i % 3 == 0 for i in range(T)])
        assert torch.equal(want[0][flagged], own[flagged])
    assert not runtime.stats.fallbacks, dict(runtime.stats.fallbacks)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("field,value", [("policy", "lynx"), ("backend", "torch")])
def test_a_change_a_captured_graph_cannot_follow_is_refused(field, value):
    """After a capture, a policy or backend change is refused on the rank (the admin endpoint answers 409
    with this reason) and changes nothing; a budget change is applied. Before any capture both apply."""
    from xshare.sglang.admin.config import config_of
    from xshare.sglang.admin.scheduler import _try_apply

    cfg, e, k = _family("softmax")
    call = Call(cfg, e, k)
    call.fill(1)
    runtime = rt.install(_settings("xshare", e))
    changed = _settings(value, e) if field == "policy" else _settings("xshare", e, **{field: value})
    assert runtime.capture_refusal(changed) is None  # no graph yet: applied
    _capture(runtime, Graph(), lambda: layer.route(runtime, call.args(), cfg))
    before = runtime.settings
    why = _try_apply(runtime, {"version": 2, "config": config_of(changed)})
    assert field in why and "CUDA graphs" in why and "restart" in why, why
    assert runtime.settings is before and runtime.version == 0
    budget = config_of(_settings("xshare", e, budget=9))
    assert _try_apply(runtime, {"version": 3, "config": budget}) == ""
    assert runtime.settings.selector.budget == 9 and runtime.version == 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["xshare", "xshare_ep", "lynx", "xshare_spec"])
def test_padding_rows_do_not_vote_where_sglang_passes_no_count(family, policy):
    """No EP and no DP gather: SGLang passes no ``num_token_non_padded``, so the plugin keeps the real-row
    count itself (filled by its forward hook before every replay). The replay of a padded batch equals an
    eager call told the real rows: stale padding rows pick no expert into the set."""
    cfg, e, k = _family(family)
    call = Call(cfg, e, k)
    runtime = rt.install(_settings(policy, e))
    call.fill(1)
    args = dict(call.args(), num_token_non_padded=None)
    runtime.push(rt.ForwardState(mode="decode"))
    layer.route(runtime, args, cfg)  # the warm-up forward
    runtime.pop()
    graph = Graph()
    captured = _capture(runtime, graph, lambda: layer.route(runtime, dict(args), cfg))
    assert captured is not None
    call.fill(7)
    real = T - 5
    runner = SimpleNamespace(is_draft_worker=False)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=real, spec_info=None,
                            input_ids=torch.zeros(real, dtype=torch.int64))
    forward_hooks.model_runner_forward_hook(lambda _self, _batch: graph.replay(), runner, batch)
    got = _answer(captured, call)
    runtime.push(rt.ForwardState(mode="decode"))
    want = _answer(layer.route(runtime, dict(args, num_token_non_padded=torch.full((1,), real)), cfg), call)
    vote_all = _answer(layer.route(runtime, dict(args), cfg), call)  # every row counted, as before
    runtime.pop()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0][:real], vote_all[0][:real]) or policy == "xshare_spec"  # padding did vote


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "replayed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_two_batch_overlap_micro_batch_reads_its_own_exact_flags(family, capturing):
    """Two-batch overlap runs each MoE layer once per micro-batch (rows 0..a, then a..T of the forward): the
    second call routes with the flags of its own rows, eager and in a replayed graph, as if it were a
    batch of its own."""
    cfg, e, k = _family(family)
    call = Call(cfg, e, k)
    runtime = rt.install(_settings("xshare", e))
    runtime.two_batch_overlap = True  # what the plugin reads from SGLang's --enable-two-batch-overlap
    call.fill(1)
    split = 5
    halves = [{key: (v[:split] if i == 0 else v[split:]) if isinstance(v, torch.Tensor) and v.ndim == 2 else v
               for key, v in call.args().items()} for i in (0, 1)]
    for half in halves:
        half["num_token_non_padded"] = None

    def forward():  # one forward: the layer on micro-batch a, then on micro-batch b
        return [layer.route(runtime, dict(h), cfg) for h in halves]

    runtime.push(rt.ForwardState(mode="decode"))
    forward()  # warm-up
    runtime.pop()
    flags = [i % 4 == 1 for i in range(T)]
    if capturing:  # SGLang runs the captured shape a few times under one capture: the last run counts
        graph = Graph()
        outs = _capture(runtime, graph, lambda: [forward(), forward()][-1])
        runtime.exact_rows(flags, 1, torch.device("cpu"))  # what the forward hook sets before a replay
        runtime.fill_real_rows(torch.device("cpu"), T)
        graph.replay()
    else:
        mask = runtime.exact_rows(flags, 1, torch.device("cpu"))
        runtime.push(rt.ForwardState(mode="decode", exact=mask))
        outs = forward()
        runtime.pop()
    mask = torch.tensor(flags)
    for i, (half, out) in enumerate(zip(halves, outs, strict=True)):
        own = mask[:split] if i == 0 else mask[split:]
        runtime.push(rt.ForwardState(mode="decode", exact=own.clone()))
        want = layer.route(runtime, dict(half), cfg)  # the micro-batch routed on its own
        runtime.pop()
        assert want is not None and out is not None
        assert torch.equal(out["topk_ids"], want["topk_ids"]), i
        assert torch.equal(out["topk_ids"][own], half["topk_ids"][own])  # flagged rows keep SGLang's experts


def test_sglangs_warm_up_runs_under_a_capture_are_not_counted(monkeypatch):
    """SGLang runs a shape eagerly on dummy inputs before capturing it: those runs (capturing state, no
    stream capturing) route but add nothing to the statistics; the captured run and its replays do."""
    cfg, e, k = _family("softmax")
    call = Call(cfg, e, k)
    call.fill(1)
    runtime = rt.install(_settings("xshare", e))
    runtime.push(rt.ForwardState(mode="decode"))
    layer.route(runtime, call.args(), cfg)  # an eager forward: counted
    runtime.pop()
    assert runtime.stats.snapshot()["applied"] == 1
    capturing = [False]
    monkeypatch.setattr(layer, "stream_capturing", lambda device: capturing[0])

    def shape():  # SGLang's capture of one shape: two warm-up runs, then the run it captures
        layer.route(runtime, call.args(), cfg)
        layer.route(runtime, call.args(), cfg)
        capturing[0] = True
        return layer.route(runtime, call.args(), cfg)

    graph = Graph()
    assert _capture(runtime, graph, shape) is not None
    # the warm-ups added nothing; the captured run adds once here because the emulation runs what it
    # records (a CUDA capture only records)
    assert runtime.stats.snapshot()["applied"] == 2
    graph.replay()  # what the graph recorded: the captured run's bookkeeping, counted on every replay
    graph.replay()
    assert runtime.stats.snapshot()["applied"] == 4


def test_a_settings_change_reaches_the_knobs_at_the_next_forward_boundary():
    """An admin change between forwards is checked at once (a config the knobs cannot take raises and
    changes nothing) but written into the device knobs by the forward hook, before the next forward's
    kernels on its own stream: a replay in flight never switches budgets between its layers, and ranks
    that take the change between the same two steps switch at the same step."""
    cfg, e, k = _family("softmax")
    call = Call(cfg, e, k)
    call.fill(1)
    runtime = rt.install(_settings("xshare", e, budget=8))
    runtime.push(rt.ForwardState(mode="decode"))
    layer.route(runtime, call.args(), cfg)
    runtime.pop()
    knobs = next(iter(runtime._knobs.values()))
    runtime.set_config(_settings("xshare", e, budget=12), 2)
    assert int(knobs.budget) == 8  # not yet: a forward may be running on the device
    seen = []
    runner = SimpleNamespace(is_draft_worker=False)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=T, spec_info=None,
                            input_ids=torch.zeros(T, dtype=torch.int64))
    forward_hooks.model_runner_forward_hook(lambda _self, _batch: seen.append(int(knobs.budget)), runner, batch)
    assert seen == [12]  # written before the model ran
    with pytest.raises(ValueError):  # top_k = 4: a warm-up of 9 cannot be written; nothing changes
        runtime.set_config(_settings("xshare", e, budget=12, warmup_k=9), 3)
    assert runtime.version == 2 and runtime.settings.selector.warmup_k == 1
