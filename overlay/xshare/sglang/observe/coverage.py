"""The start-up coverage report: for every MoE layer of a loaded model, whether the selector will
select there, is skipped (why) or is bypassed (the runner backend computes its routing without
``select_experts``, so the routing hook never sees it), before the first request.

Statuses (the values of ``Stats.coverage``, also the metric's ``state`` labels):

* ``ready``: the layer's routing passes the routing hook and its router is one the selector routes;
  it becomes ``selects`` once the policy was applied there;
* ``unsupported_<reason>``: the hook sees the layer but leaves it to SGLang (a custom routing
  function the project does not recognise, a scoring function it does not know, a router
  configuration that does not fit the layer); ``draft_layer``: a speculative draft model's layer;
* ``bypassed_<backend>``: the routing never passes the hook: SGLang's ``triton_kernel`` runner
  (GPT-OSS MXFP4 on Hopper) where the plugin could not hook its routing function (the
  ``triton_kernels`` package does not import, so that runner cannot run either), the
  ``flashinfer_trtllm`` / ``flashinfer_mxfp4`` runners that route inside the MoE kernel
  (Blackwell), hash-routed layers (DeepSeek-V4's first layers).

:data:`WHAT_TO_SET` says, per bypassing backend, which SGLang option makes the routing visible. The
one module that reads SGLang's TopK modules for this.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from typing import Any

from xshare.sglang.topk_call import is_draft_layer, router_spec

log = logging.getLogger("xshare.sglang")

READY = "ready"
SELECTS = "selects"

#: What makes a bypassed layer's routing visible to the plugin (docs/routers.md, the support matrix).
WHAT_TO_SET = {
    "bypassed_triton_kernel": "--moe-runner-backend triton",
    "bypassed_flashinfer_trtllm": "XSHARE_ROUTED_TOPK=1 (the default with the selector on at start-up) or "
                                  "--moe-runner-backend flashinfer_trtllm_routed",
    "bypassed_flashinfer_mxfp4": "--moe-runner-backend triton",
    "bypassed_hash_routing": "nothing: these layers route by token id, there is no gate to restrict",
}


def state_of(status: str) -> str:
    """'selects' | 'ready' | 'skipped' | 'bypassed': the kind of a coverage status."""
    if status in (SELECTS, READY):
        return status
    return "bypassed" if status.startswith("bypassed_") else "skipped"


def triton_routing_available() -> bool:
    """Whether SGLang's ``triton_kernel`` runner can run here (the ``triton_kernels`` package imports),
    so that its routing function exists and the plugin hooks it."""
    try:
        return importlib.util.find_spec("triton_kernels") is not None
    except (ImportError, ValueError):
        return False


def layer_status(topk: Any, device_type: str) -> str:
    """The coverage status of one SGLang ``TopK`` module (duck-typed) on a ``device_type`` device."""
    cfg = getattr(topk, "topk_config", None)
    if cfg is None:
        return "unsupported_no_topk_config"
    if getattr(topk, "is_draft", False) or is_draft_layer(cfg):
        return "draft_layer"
    fmt = getattr(getattr(cfg, "output_format", None), "name", None)
    # forward_cpu / forward_native always call select_experts; forward_cuda honours the output format
    if device_type == "cuda" and fmt in ("TRITON_KERNEL", "BYPASSED"):
        backend = getattr(cfg, "runner_backend", None)
        name = getattr(backend, "value", None) or str(backend or "unknown").lower()
        if fmt == "TRITON_KERNEL":
            # the plugin hooks this runner's routing function wherever it can run
            return READY if triton_routing_available() else "bypassed_triton_kernel"
        return "bypassed_flashinfer_mxfp4" if "mxfp4" in name else "bypassed_flashinfer_trtllm"
    _, why = router_spec(cfg)
    return READY if why is None else f"unsupported_{why}"


def survey(model: Any, device_type: str) -> dict[int, str]:
    """{layer id: status} for every top-k module of ``model`` (an ``nn.Module``), in layer order."""
    out: dict[int, str] = {}
    for index, module in enumerate(m for m in model.modules() if _is_topk(m)):
        layer_id = getattr(module, "layer_id", None)
        layer_id = int(layer_id) if isinstance(layer_id, int) else index
        if type(module).__name__ == "HashTopK":
            out[layer_id] = "bypassed_hash_routing"
        else:
            out[layer_id] = layer_status(module, device_type)
    return dict(sorted(out.items()))


def _is_topk(module: Any) -> bool:
    name = type(module).__name__
    return name in ("TopK", "HashTopK") and type(module).__module__.startswith("sglang.srt.layers.moe")


def summary(statuses: dict[int, str]) -> str:
    """One line: how many layers in each status, and what to set for bypassed ones."""
    if not statuses:
        return "no MoE layer found (no SGLang TopK module in the model)"
    counts = Counter(statuses.values())
    parts = [f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    hints = [f"{s}: set {WHAT_TO_SET[s]}" for s in sorted(counts) if s in WHAT_TO_SET]
    text = f"{len(statuses)} MoE layers: " + ", ".join(parts)
    return text + ("; " + "; ".join(hints) if hints else "")


def reaches_no_layer(statuses: dict[int, str]) -> bool:
    """Whether no layer will select (the selector, if enabled, would do nothing)."""
    return not any(state_of(s) in (SELECTS, READY) for s in statuses.values())
