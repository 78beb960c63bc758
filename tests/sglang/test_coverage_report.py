"""The start-up coverage report (xshare.sglang.observe.coverage) on SGLang's own TopKConfig, output formats and
runner backends: which layers the selector will select on, skip (why) or never see (bypassed by the
runner backend, and what to set), and what the runtime does with the report."""

import logging
from types import SimpleNamespace

import pytest
import torch

from conftest import require_module
from xshare.selection import SelectorConfig
from xshare.sglang import state as rt
from xshare.sglang.observe import coverage, report
from xshare.sglang.settings import PluginSettings

topk = require_module("sglang.srt.layers.moe.topk", "scripts/install_sglang_cpu.sh")
utils = require_module("sglang.srt.layers.moe.utils", "scripts/install_sglang_cpu.sh")


def _layer(fmt=None, backend=None, **cfg_kw):
    cfg = topk.TopKConfig(top_k=2, renormalize=True, **cfg_kw)
    if backend is not None:
        cfg.runner_backend = getattr(utils.MoeRunnerBackend, backend)
    if fmt is not None:
        cfg.output_format = getattr(topk.TopKOutputFormat, fmt)
    return SimpleNamespace(topk_config=cfg, is_draft=False)


@pytest.mark.parametrize(("fmt", "backend", "device", "expected"), [
    (None, None, "cpu", "ready"),
    ("STANDARD", "TRITON", "cuda", "ready"),
    ("STANDARD", "FLASHINFER_TRTLLM_ROUTED", "cuda", "ready"),
    ("TRITON_KERNEL", "TRITON_KERNELS", "cuda", "bypassed_triton_kernel"),
    ("BYPASSED", "FLASHINFER_TRTLLM", "cuda", "bypassed_flashinfer_trtllm"),
    ("BYPASSED", "FLASHINFER_MXFP4", "cuda", "bypassed_flashinfer_mxfp4"),
    ("TRITON_KERNEL", "TRITON_KERNELS", "cpu", "ready"),  # forward_cpu always calls select_experts
])
def test_layer_status_follows_the_output_format_sglang_bound(fmt, backend, device, expected):
    assert coverage.layer_status(_layer(fmt, backend), device) == expected


def test_routers_the_selector_leaves_to_sglang_are_skipped_with_their_reason():
    custom = _layer(custom_routing_function=lambda **kw: None)
    assert coverage.layer_status(custom, "cuda") == "unsupported_custom_routing_function"
    biased = _layer(use_grouped_topk=True, num_expert_group=4, topk_group=2, correction_bias=torch.zeros(16))
    assert coverage.layer_status(biased, "cuda") == "ready"  # biased grouped routers are selected
    draft = _layer()
    draft.is_draft = True
    assert coverage.layer_status(draft, "cuda") == "draft_layer"


def test_packed_top_k_outputs_are_left_to_sglang_and_reported():
    """A gate that also writes FlashInfer's packed ids (the runner reads those, not topk_ids) is left to
    SGLang: the coverage report names it, and the routing hook neither replaces nor counts the call as
    applied."""
    from xshare.sglang import layer as routing

    layer = _layer(use_grouped_topk=True, num_expert_group=4, topk_group=2, correction_bias=torch.zeros(16),
                   fused_gate_packed_ids=True)
    assert coverage.layer_status(layer, "cuda") == "unsupported_packed_topk_ids"
    assert coverage.layer_status(_layer(use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                        correction_bias=torch.zeros(16)), "cuda") == "ready"
    runtime = rt.ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=4)))
    runtime.push(rt.ForwardState(mode="decode"))
    logits = torch.randn(6, 16)
    ids = torch.topk(logits, 2, dim=-1).indices.to(torch.int32)
    args = {"topk_ids": ids, "topk_weights": torch.full((6, 2), 0.5), "router_logits": logits, "layer_id": 1,
            "num_token_non_padded": None}
    assert routing.route(runtime, args, layer.topk_config) is None
    assert runtime.stats.skipped == {"unsupported_packed_topk_ids": 1} and runtime.stats.applied == 0
    assert runtime.stats.coverage == {1: "unsupported_packed_topk_ids"}


def test_summary_names_what_to_set_for_bypassed_layers():
    statuses = {0: "bypassed_triton_kernel", 1: "bypassed_triton_kernel", 2: "ready"}
    text = coverage.summary(statuses)
    assert text.startswith("3 MoE layers: 2 bypassed_triton_kernel, 1 ready")
    assert "--moe-runner-backend triton" in text
    assert not coverage.reaches_no_layer(statuses)
    assert coverage.reaches_no_layer({0: "bypassed_triton_kernel", 1: "unsupported_router_config"})
    assert [coverage.state_of(s) for s in ("selects", "ready", "draft_layer", "bypassed_hash_routing")] == \
        ["selects", "ready", "skipped", "bypassed"]


def _runtime(**kw):
    return rt.ProcessState(PluginSettings(enabled=True, selector=SelectorConfig(policy="xshare", budget=4), **kw))


def test_an_enabled_selector_that_reaches_no_layer_warns_at_start_up(caplog):
    runtime = _runtime()
    with caplog.at_level(logging.INFO, logger="xshare.sglang"):
        msg = report.startup_coverage(runtime, {0: "bypassed_triton_kernel", 1: "bypassed_triton_kernel"})
    assert msg is not None and "will select on no MoE layer" in msg
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--moe-runner-backend triton" in warnings[0].getMessage()
    snap = runtime.stats.snapshot()
    assert snap["startup_coverage"] == {"0": "bypassed_triton_kernel", "1": "bypassed_triton_kernel"}
    assert snap["coverage"] == snap["startup_coverage"]


def test_a_selector_that_reaches_a_layer_only_logs_the_report(caplog):
    runtime = _runtime()
    with caplog.at_level(logging.INFO, logger="xshare.sglang"):
        assert report.startup_coverage(runtime, {0: "ready", 1: "draft_layer"}) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("coverage at start-up" in r.getMessage() for r in caplog.records)
    runtime.stats.note_layer(0, "selects")  # the first applied call upgrades "ready"
    assert runtime.stats.snapshot()["coverage"] == {"0": "selects", "1": "draft_layer"}


def test_require_coverage_refuses_to_start_when_no_layer_will_select():
    runtime = _runtime(require_coverage=True)
    with pytest.raises(report.CoverageRefused, match="XSHARE_REQUIRE_COVERAGE"):
        report.startup_coverage(runtime, {0: "unsupported_custom_routing_function"})
    assert report.startup_coverage(_runtime(require_coverage=True), {0: "ready"}) is None


def test_a_disabled_selector_reports_but_never_warns(caplog):
    runtime = rt.ProcessState(PluginSettings(enabled=False))
    with caplog.at_level(logging.INFO, logger="xshare.sglang"):
        assert report.startup_coverage(runtime, {0: "bypassed_triton_kernel"}) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _bound(backend, fmt):
    cfg = topk.TopKConfig(top_k=2, renormalize=True)
    cfg.runner_backend = getattr(utils.MoeRunnerBackend, backend)
    cfg.output_format = getattr(topk.TopKOutputFormat, fmt)
    return SimpleNamespace(topk_config=cfg, is_draft=False)


@pytest.mark.parametrize(("backend", "fmt", "enabled", "routed", "expected"), [
    ("FLASHINFER_TRTLLM", "BYPASSED", True, True, "STANDARD"),  # Blackwell's default: made visible
    ("FLASHINFER_TRTLLM", "BYPASSED", True, False, "BYPASSED"),  # XSHARE_ROUTED_TOPK=0
    ("FLASHINFER_TRTLLM", "BYPASSED", False, True, "BYPASSED"),  # selector off: SGLang's choice kept
    ("FLASHINFER_MXFP4", "BYPASSED", True, True, "BYPASSED"),  # GPT-OSS: no STANDARD for its activation
    ("TRITON_KERNELS", "TRITON_KERNEL", True, True, "TRITON_KERNEL"),
    ("TRITON", "STANDARD", True, True, "STANDARD"),
])
def test_flashinfer_trtllm_layers_are_switched_to_routed_top_k(monkeypatch, backend, fmt, enabled, routed, expected):
    from xshare.sglang.hooks import routing as routing_hooks

    runtime = rt.ProcessState(PluginSettings(enabled=enabled, routed_topk=routed))
    monkeypatch.setattr(rt, "get", lambda: runtime)
    layer = _bound(backend, fmt)
    routing_hooks.bind_runner_backend_hook(None, layer, layer.topk_config.runner_backend)
    assert layer.topk_config.output_format.name == expected
    status = coverage.layer_status(layer, "cuda")
    if expected == "STANDARD":
        assert status == "ready"
    else:  # triton_kernels is not installed here, so its runner's routing is not hooked either
        assert status.startswith("bypassed_"), status
