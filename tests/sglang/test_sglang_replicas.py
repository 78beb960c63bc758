"""SGLang's own EPLB objects on the CPU: its expert-distribution recorder counts the routing the selector
produced, and a predictive replica plan goes through its rebalance entry point
(``EPLBManager._compute_expert_location_metadata``) into its ``ExpertLocationMetadata``.

SGLang's CPU path cannot run expert parallelism (its torch-native MoE leaves non-local experts at -1), so
the weight moves of a rebalance (``ExpertLocationUpdater``, P2P between EP ranks) are not run here; the
metadata SGLang would install, and its in-place update, are. The recorder and EPLB manager are SGLang's
real classes, under a configuration published with SGLang's own ``override_server_args``, SGLang's CPU
platform and a one-process gloo group (the recorder's dump all-reduces)."""

import json
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import require_module
from xshare.eval.predict import plan_layers
from xshare.selection import Placement, SelectorConfig
from xshare.sglang import state as rt
from xshare.sglang.hooks import model as model_hooks
from xshare.sglang.hooks import routing as routing_hooks
from xshare.sglang.placement import sglang_placement
from xshare.sglang.settings import PluginSettings, SettingError, load_settings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.eplb import eplb_manager, expert_distribution, expert_location  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.platforms.cpu import CpuSRTPlatform  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType  # noqa: E402
from sglang.srt.runtime_context import get_context, get_parallel  # noqa: E402

E, K, LAYERS = 32, 4, 3


def _model_dir(tmp_path):
    """A Qwen3-MoE config (SGLang reads the expert layout from it; no weights are loaded)."""
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "intermediate_size": 128, "moe_intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "num_hidden_layers": LAYERS, "num_experts": E, "num_experts_per_tok": K,
           "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": 64,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.fixture
def sglang_ep(tmp_path, monkeypatch, request):
    """SGLang's context for EP size ``request.param`` (default 4) with 4 redundant experts: (model config,
    the live ExpertLocationMetadata, the live recorder)."""
    import sglang.srt.utils.common as common

    ep = getattr(request, "param", 4)
    monkeypatch.setattr(common, "current_platform", CpuSRTPlatform())  # SGLang's own CPU platform
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)  # the recorder's first dump calls it
    override = get_context().override_server_args(
        device="cpu", ep_size=ep, tp_size=ep, ep_num_redundant_experts=4, expert_distribution_recorder_mode="stat",
        expert_distribution_recorder_buffer_size=8, eplb_rebalance_num_iterations=8, enable_eplb=True)
    override.install()
    own_group = not torch.distributed.is_initialized()
    if own_group:
        fd, store = tempfile.mkstemp(prefix="xshare-gloo-")
        os.close(fd)
        os.unlink(store)
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        stack = get_parallel().override(moe_ep_rank=0)  # this process is EP rank 0
        stack.__enter__()
        request.addfinalizer(lambda: stack.__exit__(None, None, None))
        config = ModelConfig(_model_dir(tmp_path))
        meta = expert_location.ExpertLocationMetadata.init_trivial(config, moe_ep_rank=0)
        resources = expert_location.get_resources()
        monkeypatch.setattr(resources, "expert_location_metadata", meta)
        recorder = expert_distribution.ExpertDistributionRecorder.init_new(meta, rank=0)
        monkeypatch.setattr(resources, "expert_distribution_recorder", recorder)
        yield config, meta, recorder
    finally:
        if own_group:
            torch.distributed.destroy_process_group()
        override.restore()


def _hook(monkeypatch, target, fn):
    """Apply one AROUND hook the way SGLang's HookRegistry applies a plugin's (undone after the test)."""
    owner, name = target.rsplit(".", 1)
    import pkgutil

    obj = pkgutil.resolve_name(owner)
    monkeypatch.setattr(obj, name, getattr(obj, name))  # restored afterwards
    HookRegistry._apply_target(target, [(HookType.AROUND, fn, HookSource("xshare", None))])


def test_sglang_recorder_counts_the_selected_routing(sglang_ep, monkeypatch):
    _, meta, recorder = sglang_ep
    assert type(recorder).__name__ == "_ExpertDistributionRecorderReal"
    _hook(monkeypatch, routing_hooks.POST_PROCESS_TARGET, routing_hooks.post_process_topk_ids_hook)
    budget = 6
    runtime = rt.install(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=budget,
                                                                               warmup_k=0)))
    try:
        runtime.push(rt.ForwardState(mode="decode"))
        cfg = topk.TopKConfig(top_k=K, renormalize=True, torch_native=True)
        logits = torch.randn(16, E, generator=torch.Generator().manual_seed(0)) * 2
        vanilla = torch.topk(logits, K, dim=-1).indices
        recorder.start_record()
        with recorder.with_forward_pass(0, SimpleNamespace(forward_mode=ForwardMode.DECODE, extend_num_tokens=0)):
            with recorder.with_current_layer(1):
                out = topk.select_experts(torch.zeros(16, 8), logits, cfg, layer_id=1)
        counts = recorder.dump_record(output_mode="object")["logical_count"].sum(0)  # [layers, E]
    finally:
        rt.uninstall()
    selected = torch.bincount(out.topk_ids.flatten().long(), minlength=meta.num_physical_experts)[:E]
    assert torch.equal(counts[1].long(), selected)  # SGLang's recorder saw the selector's routing ...
    assert int((counts[1] > 0).sum()) <= budget < torch.unique(vanilla).numel()
    assert not torch.equal(counts[1].long(), torch.bincount(vanilla.flatten(), minlength=E))  # ... not its top-k
    assert int(counts[0].sum()) == 0 and int(counts[2].sum()) == 0


def _skewed_window(passes=8, hot=(3, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 4, (passes, LAYERS, E), generator=g)
    w[:, :, list(hot)] += 40
    return w.int()


def _manager(config):
    return eplb_manager.EPLBManager(model_config=config, get_model=lambda: None,
                                    get_expert_location_updater=lambda: None, get_expert_backup_client=lambda: None,
                                    get_weight_updater=lambda: None)


def test_a_predictive_plan_goes_through_sglangs_rebalance_entry_point(sglang_ep, monkeypatch):
    config, meta, _ = sglang_ep
    _hook(monkeypatch, model_hooks.COMPUTE_METADATA_TARGET, model_hooks.compute_metadata_hook)
    runtime = rt.install(PluginSettings(enabled=True, replica_plan="predictive", replica_planner="greedy",
                                        replica_alpha=0.5))
    try:
        runtime.placements.source = lambda layer, e: sglang_placement(runtime.placements, layer, e)
        manager = _manager(config)
        before = meta.physical_to_logical_map_cpu.clone()
        window = _skewed_window()
        new = manager._compute_expert_location_metadata(window, broadcast_over_world=False)
        assert isinstance(new, expert_location.ExpertLocationMetadata)
        want = plan_layers(window.sum(0).double().numpy(), 4, 1, "greedy", previous=before.numpy())
        assert np.array_equal(new.physical_to_logical_map_cpu.numpy(), want)
        for layer in range(LAYERS):
            row = new.physical_to_logical_map_cpu[layer].view(4, 9)
            assert torch.equal(row[:, :8], torch.arange(E).view(4, 8))  # greedy: the home slots stay
            assert {3, 17} <= set(row[:, 8].tolist())  # the hot experts got the spare slots
        # SGLang's own in-place update (what its ExpertLocationUpdater does once the weights moved) ...
        meta.update(new, update_layer_ids=list(range(LAYERS)))
        model_hooks.expert_location_update_hook(None, meta, new, update_layer_ids=list(range(LAYERS)))
        # ... and the GPU-aware policies' placement follows it
        placement = sglang_placement(runtime.placements, 1, E)
        ref = Placement.from_physical(torch.from_numpy(want[1]), 4)
        assert torch.equal(placement.replicas, ref.replicas) and placement.has_replicas
        # the next window is folded into the forecast: alpha 0.5 of it, 0.5 of the last one
        second = _skewed_window(hot=(5, 30), seed=1)
        again = manager._compute_expert_location_metadata(second, broadcast_over_world=False)
        forecast = 0.5 * second.sum(0).double().numpy() + 0.5 * window.sum(0).double().numpy()
        assert np.array_equal(again.physical_to_logical_map_cpu.numpy(),
                              plan_layers(forecast, 4, 1, "greedy", previous=want))
        assert runtime.replicas.plans == 2 and runtime.replicas.refused == 0
    finally:
        rt.uninstall()


def test_with_replica_plan_eplb_sglangs_own_plan_is_untouched(sglang_ep, monkeypatch):
    config, _, _ = sglang_ep
    window = _skewed_window()
    own = _manager(config)._compute_expert_location_metadata(window, broadcast_over_world=False)
    _hook(monkeypatch, model_hooks.COMPUTE_METADATA_TARGET, model_hooks.compute_metadata_hook)
    runtime = rt.install(PluginSettings(enabled=True, replica_plan="eplb"))
    try:
        via_hook = _manager(config)._compute_expert_location_metadata(window, broadcast_over_world=False)
    finally:
        rt.uninstall()
    assert torch.equal(own.physical_to_logical_map_cpu, via_hook.physical_to_logical_map_cpu)
    assert runtime.replicas.plans == 0


@pytest.mark.parametrize("sglang_ep", [3], indirect=True)
def test_a_plan_that_does_not_fit_the_slots_changes_nothing(sglang_ep, monkeypatch, caplog):
    """EP size 3 with 4 redundant experts: the spare slots do not split evenly over the GPUs."""
    config, meta, _ = sglang_ep
    _hook(monkeypatch, model_hooks.COMPUTE_METADATA_TARGET, model_hooks.compute_metadata_hook)
    runtime = rt.install(PluginSettings(enabled=True, replica_plan="predictive"))
    try:
        before = meta.physical_to_logical_map_cpu.clone()
        new = _manager(config)._compute_expert_location_metadata(_skewed_window(), broadcast_over_world=False)
        assert torch.equal(new.physical_to_logical_map_cpu, before)  # the map in force: no weight moves
        planner = runtime.replicas
        assert planner.refused == 1 and planner.plans == 0 and "--replica-slots" in planner.last_error
        assert "no predictive replica plan" in caplog.text
    finally:
        rt.uninstall()


@pytest.mark.parametrize("env, needle", [
    ({"XSHARE_REPLICA_PLAN": "lstm"}, "XSHARE_REPLICA_PLAN='lstm'"),
    ({"XSHARE_REPLICA_PLANNER": "best"}, "XSHARE_REPLICA_PLANNER='best'"),
    ({"XSHARE_REPLICA_ALPHA": "0"}, "XSHARE_REPLICA_ALPHA='0'"),
])
def test_bad_replica_settings_name_the_variable(env, needle):
    with pytest.raises(SettingError, match=needle):
        load_settings(env)


def test_the_settings_name_the_planners_and_default_of_the_forecasts():
    from xshare.eval import predict
    from xshare.sglang import settings

    assert settings.REPLICA_PLANNERS == predict.PLANNERS and settings.REPLICA_ALPHA == predict.DEFAULT_ALPHA
