"""DeepEP 'global' mode: the per-layer all-reduce of the batch statistics, on 2 CPU processes over
gloo (real torch.distributed, no sglang). Each rank routes only its own rows; with the group's
statistics the result must equal one selection over all ranks' rows together, also when a rank has
zero tokens (it joins the all-reduce with zeros) and over several layers in a row."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import require_module
from xshare.selection import Placement, SelectorConfig, select
from xshare.selection.backends.global_mode import join_empty
from xshare.selection.decide import LayerCall, decide

E, K, LAYERS = 16, 4, 3


def _logits(layer: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + layer)
    return torch.randn(rows, E, generator=g) * 2


def _recording_all_reduce(calls: list):
    """A gloo all-reduce (sum, in place) that records the shape of each call in ``calls``."""
    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        dist.all_reduce(t)
        return t
    return all_reduce


def _worker(rank: int, world: int, init_file: str, rows: list[int], policy: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = SelectorConfig(policy=policy, budget=5, warmup_k=1)
        placement = Placement.contiguous(E, 2) if policy == "xshare_ep" else None
        calls: list = []
        all_reduce = _recording_all_reduce(calls)

        results = []
        for layer in range(LAYERS):
            if rows[rank] == 0:
                join_empty(E, all_reduce)  # the TopK.empty_topk_output path
                results.append(None)
            else:
                call = LayerCall(_logits(layer, rows[rank], rank), K, placement=placement, all_reduce=all_reduce)
                r = decide(call, config).routing
                results.append((r.topk_ids, r.topk_weights))
        torch.save({"results": results, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, rows, policy):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), rows, policy, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize(("rows", "policy"), [([7, 5], "xshare"), ([6, 0], "xshare"), ([5, 4], "xshare_ep")])
def test_global_mode_equals_one_selection_over_all_ranks(tmp_path, rows, policy):
    outs = _run(tmp_path, rows, policy)
    config = SelectorConfig(policy=policy, budget=5, warmup_k=1)
    placement = Placement.contiguous(E, 2) if policy == "xshare_ep" else None
    for out in outs:  # one all-reduce of 2E floats per layer on every rank, zero-token ranks included
        assert out["calls"] == [(2 * E,)] * LAYERS
    for layer in range(LAYERS):
        parts = [_logits(layer, n, r) for r, n in enumerate(rows) if n]
        ref = select(torch.cat(parts), K, config, placement=placement)
        start = 0
        for r, n in enumerate(rows):
            got = outs[r]["results"][layer]
            if n == 0:
                assert got is None
                continue
            assert torch.equal(got[0], ref.topk_ids[start:start + n]), (layer, r)
            assert torch.allclose(got[1], ref.topk_weights[start:start + n], atol=1e-6)
            start += n
        # the group activates at most max(budget, |warm-up|): the warm-up (every token's top-1) is global
        warmup = torch.unique(torch.cat(parts).argmax(-1)).numel()
        assert ref.active.sum() <= max(5, warmup)
        # and local selection differs: each rank would pick its own set
        if all(rows):
            local = [select(p, K, config, placement=placement) for p in parts]
            union = torch.stack([x.active for x in local]).any(0).sum()
            assert union >= ref.active.sum()


# A biased, grouped router (DeepSeek-V3's: sigmoid + correction bias, 4 groups keep 2, routed scaling):
# the same claim through the engine's router-spec path.
def _spec():
    from xshare.selection.routers.spec import RouterSpec

    bias = torch.randn(E, generator=torch.Generator().manual_seed(9)) * 0.1
    return RouterSpec(scoring="sigmoid", correction_bias=bias, num_expert_group=4, topk_group=2,
                      routed_scaling_factor=2.5)


def _router_worker(rank: int, world: int, init_file: str, rows: list[int], out_dir: str) -> None:
    from xshare.selection.decide import LayerCall, decide

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = SelectorConfig(policy="xshare", budget=5, warmup_k=1)
        calls: list = []
        all_reduce = _recording_all_reduce(calls)

        results = []
        for layer in range(LAYERS):
            d = decide(LayerCall(_logits(layer, rows[rank], rank), K, _spec(), all_reduce=all_reduce), config)
            results.append((d.routing.topk_ids, d.routing.topk_weights, d.replaced))
        torch.save({"results": results, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rows", [[7, 5], [6, 0]])
def test_global_mode_on_a_biased_grouped_router(tmp_path, rows):
    from xshare.selection.decide import LayerCall, decide

    mp.start_processes(_router_worker, args=(2, str(tmp_path / "init"), rows, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    config = SelectorConfig(policy="xshare", budget=5, warmup_k=1)
    for out in outs:
        assert out["calls"] == [(2 * E,)] * LAYERS
    changed = 0
    for layer in range(LAYERS):
        parts = [_logits(layer, n, r) for r, n in enumerate(rows) if n]
        ref = decide(LayerCall(torch.cat(parts), K, _spec()), config)
        start = 0
        for r, n in enumerate(rows):
            ids, weights, replaced = outs[r]["results"][layer]
            assert ids.shape == (n, K)
            assert torch.equal(ids, ref.routing.topk_ids[start:start + n]), (layer, r)
            assert torch.allclose(weights, ref.routing.topk_weights[start:start + n], atol=1e-6)
            changed += int(replaced.sum())
            start += n
    assert changed > 0  # the budget restricted rows: the set really came from the group


@pytest.mark.parametrize("bad", ["policy", "top_k"])
def test_a_failing_router_layer_still_joins_the_group_all_reduce(bad):
    """A rank whose own part fails (a policy global mode cannot run, a layer the spec does not fit)
    raises (the adapter falls back) but still joins the all-reduce once, so its peers do not hang."""
    from xshare.selection.decide import LayerCall, decide
    from xshare.selection.registry import all_policies

    calls = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t

    policy = next(p.name for p in all_policies() if not p.global_stats) if bad == "policy" else "xshare"
    top_k = K if bad == "policy" else 2 * E  # more experts than the groups can hold
    with pytest.raises(ValueError):
        decide(LayerCall(_logits(0, 6, 0), top_k, _spec(), all_reduce=all_reduce),
               SelectorConfig(policy=policy, budget=5, warmup_k=1))
    assert calls == [(2 * E,)]


class _Batch:
    """The fields of SGLang's ForwardBatch the forward hook reads, for one DP rank's decode batch of ``rows``
    rows in a group of ``world`` such ranks. ``local_fails``: reading this rank's own forward mode raises (a
    rank-local fact; the group's facts, its forward mode and the gathered row counts, still read)."""

    def __init__(self, rows: int, world: int, local_fails: bool) -> None:
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self.global_forward_mode = self._mode = ForwardMode.DECODE
        self.global_num_tokens_cpu = [rows] * world
        self.batch_size = rows
        self.input_ids = torch.zeros(rows, dtype=torch.int64)
        self.spec_info = self.rids = self.positions = None
        self._fails = local_fails

    @property
    def forward_mode(self):  # noqa: ANN201
        if self._fails:
            raise RuntimeError("injected: this rank cannot read its own forward mode")
        return self._mode


def _adapter_worker(rank: int, world: int, init_file: str, fault: str, out_dir: str) -> None:
    """One rank of a DeepEP global-mode group running SGLang's forward through the plugin's forward hook (a
    real ProcessState; the model: a few MoE layers, each calling the routing hook's path), with ``fault``
    injected on rank 1."""
    from datetime import timedelta
    from types import SimpleNamespace

    from xshare.sglang import layer as routing
    from xshare.sglang import state as rt
    from xshare.sglang.hooks import forward as forward_hooks
    from xshare.sglang.settings import PluginSettings

    topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        runtime = rt.install(PluginSettings(enabled=True, deepep_mode="global",
                                            selector=SelectorConfig(policy="xshare", budget=5, warmup_k=1)))
        runtime.scattered_input = True  # the process facts the hook reads from SGLang once (a2a backend)
        calls: list = []
        runtime.all_reduce = _recording_all_reduce(calls)
        if rank == 1 and fault == "diverged":  # off the group's config: it keeps SGLang's routing
            runtime.diverged = True
        if rank == 1 and fault == "raises":  # fails before its part of the all-reduce

            def broken(*_a, **_k):
                raise RuntimeError("injected before the all-reduce")
            runtime.layer_config = broken
        if rank == 1 and fault == "fault":  # fails after its part (XSHARE_FAULT_INJECT's checkpoint)
            runtime.settings = PluginSettings(enabled=True, deepep_mode="global", fault_inject="always",
                                              selector=runtime.settings.selector)
        cfg = topk.TopKConfig(top_k=K, renormalize=True)

        def model(_runner, _batch) -> list[bool]:  # the layers' routing calls of one forward
            applied = []
            for layer in range(LAYERS):
                x = _logits(layer, 6, rank)
                w, ids = torch.topk(torch.softmax(x, -1), K, dim=-1)
                args = {"topk_ids": ids.to(torch.int32), "topk_weights": w / w.sum(-1, keepdim=True),
                        "router_logits": x, "layer_id": layer, "num_token_non_padded": None}
                applied.append(routing.route(runtime, args, cfg) is not None)
            return applied

        runner = SimpleNamespace(is_draft_worker=False, device="cpu")
        batch = _Batch(6, world, local_fails=rank == 1 and fault == "forward_state")
        applied = forward_hooks.model_runner_forward_hook(model, runner, batch)
        torch.save({"calls": calls, "applied": applied, "skipped": dict(runtime.stats.skipped),
                    "fallbacks": dict(runtime.stats.fallbacks)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fault", ["none", "diverged", "raises", "fault", "forward_state"])
def test_every_rank_joins_every_layers_all_reduce_whatever_its_own_path(tmp_path, fault):
    """SGLang's forward through the forward hook and the routing hook in DeepEP global mode on 2 gloo ranks:
    a rank off its group's config, one whose own part fails before or after the all-reduce, or one that
    cannot read its own part of the forward batch keeps SGLang's routing but still joins each layer's
    all-reduce exactly once, so its peer completes (a missing part would hang it until the timeout)."""
    mp.start_processes(_adapter_worker, args=(2, str(tmp_path / "init"), fault, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for out in outs:
        assert out["calls"] == [(2 * E,)] * LAYERS
    assert outs[0]["applied"] == [True] * LAYERS
    assert outs[1]["applied"] == [fault == "none"] * LAYERS
    assert outs[0]["skipped"] == {} and outs[0]["fallbacks"] == {}
    if fault == "forward_state":  # the rank could not decide: counted per call, and the failed reading once
        assert outs[1]["skipped"] == {"forward_state_failed": LAYERS}
        assert outs[1]["fallbacks"] == {"forward_state": 1}


@pytest.mark.parametrize("in_graphs", [True, False])
def test_captured_forwards_over_a_group_that_cannot_all_reduce_in_graphs_select_per_rank(in_graphs):
    """An EP group without pynccl or the custom all-reduce (SGLang's ``moe_ep`` group when ep != tp) cannot
    all-reduce inside a CUDA-graph capture: captured forwards then select over the rank's own rows (no
    collective, alike on every rank, since every rank has the same group); eager ones over the group."""
    from types import SimpleNamespace

    from xshare.sglang import layer as routing
    from xshare.sglang import state as rt
    from xshare.sglang.hooks.forward import graph_capable
    from xshare.sglang.settings import PluginSettings

    topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
    assert graph_capable(SimpleNamespace(world_size=2, pynccl_comm=object(), ca_comm=None))
    assert graph_capable(SimpleNamespace(world_size=1, pynccl_comm=None, ca_comm=None))
    assert not graph_capable(SimpleNamespace(world_size=2, pynccl_comm=None, ca_comm=None))
    runtime = rt.ProcessState(PluginSettings(enabled=True, deepep_mode="global",
                                             selector=SelectorConfig(policy="xshare", budget=5, warmup_k=1)))
    runtime.scattered_input = True
    calls: list = []
    runtime.all_reduce = lambda t: calls.append(tuple(t.shape)) or t
    runtime.all_reduce_in_graphs = in_graphs
    cfg = topk.TopKConfig(top_k=K, renormalize=True)
    for capturing in (True, False):
        runtime.push(rt.ForwardState(mode="decode", capturing=capturing, global_mode="decode",
                                     global_applies=True, global_rows=8))
        logits = _logits(0, 8, 3)
        ids = torch.topk(logits, K).indices
        before = len(calls)
        out = routing.route(runtime, {"topk_ids": ids, "topk_weights": torch.ones(8, K), "router_logits": logits,
                                      "layer_id": 0, "num_token_non_padded": None}, cfg)
        runtime.pop()
        assert out is not None  # selected either way
        assert len(calls) - before == (1 if in_graphs or not capturing else 0), (capturing, calls)
    assert calls == [(2 * E,)] * (2 if in_graphs else 1)  # the captured call all-reduced only where it can
