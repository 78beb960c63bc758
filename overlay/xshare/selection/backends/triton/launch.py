"""The served selector's GPU backend: one layer call of any router family in two Triton launches.

:func:`fused_route` runs :mod:`xshare.selection.backends.triton._triton_router` for a call the engine's
:func:`~xshare.selection.decide.decide` hands it and returns what ``decide`` would have computed
with the torch reference, under the same contract:

* plain layers (a :class:`~xshare.selection.call.LayerRouting`: softmax / sigmoid top-k) follow
  :func:`xshare.selection.select` (every row routed by tiers, padding and exact rows as vanilla);
* router specs (:class:`~xshare.selection.routers.spec.RouterSpec`: correction bias, expert groups, routed
  scaling in the weights, sqrtsoftplus, Llama-4's custom function) follow ``decide_router`` (the
  rows the set restricts are routed inside it, every other row keeps the engine's ids, short rows
  counted).

:func:`kernel_problem` says why a call is not for the kernel (None when it is): the caller then uses
another backend and reports the reason. Host work only binds arguments and allocates the outputs
(one zero-filled buffer, five empty ones); every setting the graph must follow is a device tensor
(:class:`~xshare.selection.knobs.SelectorKnobs`), so the two launches are captured and replayed.
On CPU tensors the kernels run in Triton's interpreter (tests, ``xshare bench gpu --cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xshare._triton import interpreted
from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import get_policy
from xshare.selection.routers.spec import RouterSpec
from xshare.selection.types import Placement

MAX_EXPERTS = 1024  # the index field of the ranking keys
MAX_TOP_K = 32
MAX_GROUPS = 64
MAX_GPUS = 256
_GATES = {"plain": 0, "grouped": 1, "biased_grouped": 2, "llama4": 3}
_SCORINGS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_TILE = 2048  # elements of a [rows, experts] tile per program
_PAIR_TILE = 8192  # elements of a [chunk, experts] tile of the set's pairwise ranking


def triton_module() -> Any | None:
    """The kernels' module, or None without Triton (imported on first use: Triton is optional)."""
    try:
        from xshare.selection.backends.triton import _triton_router
    except (ImportError, AttributeError):  # no Triton, or one without the combine functions used
        return None
    return _triton_router


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def kernel_problem(
    router_logits: Tensor, top_k: int, layer: object, config: SelectorConfig, *,
    engine_ids: Tensor | None = None, placement: Placement | None = None, global_mode: bool = False,
    groups: Tensor | None = None,
) -> str | None:
    """None when :func:`fused_route` implements this call, else a short reason (for stats and logs)."""
    if triton_module() is None:
        return "triton_unavailable"
    if "triton" not in get_policy(config.policy).kernels:  # the policies that declare the kernel
        return f"policy_{config.policy}"
    if global_mode:
        return "global_mode"
    if get_policy(config.policy).uses_groups():
        if groups is None:
            return "no_request_groups"
        if groups.shape != router_logits.shape[:1] or groups.device != router_logits.device:
            return "request_groups_shape"
    if router_logits.ndim != 2:
        return "logits_shape"
    if router_logits.dtype not in _ROUND:
        return f"logits_{str(router_logits.dtype).removeprefix('torch.')}"
    num_experts = router_logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        return "experts_out_of_range"
    if not 1 <= top_k <= min(MAX_TOP_K, num_experts):
        return "top_k_out_of_range"
    if config.policy == "xshare_ep":
        if placement is None:
            return "no_placement"
        if placement.num_gpus > MAX_GPUS:
            return "too_many_gpus"
        if placement.primary_gpu.device != router_logits.device:
            return "placement_device"
    if isinstance(layer, RouterSpec):
        if engine_ids is None:
            return "no_engine_ids"
        if layer.num_expert_group is not None and layer.num_expert_group > MAX_GROUPS:
            return "too_many_groups"
        bias = layer.correction_bias
        if bias is not None and (bias.device != router_logits.device or bias.dtype not in _ROUND):
            return "bias_device_or_dtype"
        if layer.weight_dtype is not None and layer.weight_dtype not in _ROUND:
            return "weight_dtype"
    if engine_ids is not None and (engine_ids.ndim != 2 or engine_ids.shape[0] != router_logits.shape[0]
                                   or engine_ids.device != router_logits.device):
        return "engine_ids_shape"
    return None


@dataclass(frozen=True)
class FusedRouting:
    """The kernel's outputs for one call (all on the logits' device).

    topk_ids    int32 [T, top_k]; topk_weights float32 [T, top_k] (renormalised and, for router
                specs with scaling in the weights, scaled as the engine's gate does).
    active      bool [E]: experts routed by a valid row.
    in_set      bool [E]: the batch's set S.
    replaced    bool [T] (router specs: rows whose routing the set changed) or None.
    short_rows  int64 0-d (router specs: restricted rows that kept the engine's routing) or None.
    cap_bound   bool 0-d: the policy applied with a mass target and the budget stopped S short of it.
    """

    topk_ids: Tensor
    topk_weights: Tensor
    active: Tensor
    in_set: Tensor
    replaced: Tensor | None
    short_rows: Tensor | None
    cap_bound: Tensor


def _gate_constants(layer: object, config: SelectorConfig, logits: Tensor) -> dict[str, int]:
    if not isinstance(layer, RouterSpec):
        return {"MODE": 0, "SCORING": _SCORINGS[config.scoring], "GATE": 0, "HAS_BIAS": False, "AFF_ROUND": 0,
                "CHOICE_ROUND": 0, "NUM_GROUPS": 1, "TOPK_GROUP": 1, "GROUP_SIZE": 1, "BLOCK_G": 1,
                "RENORM": bool(config.renormalize), "SCALE": False, "SCALE_ROUND": 0, "SP_ROUND": 0}
    gate = layer.gate
    bias = layer.correction_bias
    dtype = logits.dtype
    if gate == "plain":
        aff = dtype if bias is not None else torch.float32
    elif gate == "llama4":
        aff = layer.weight_dtype or dtype
    else:
        aff = dtype
    choice = torch.promote_types(dtype, bias.dtype) if bias is not None else torch.float32
    groups = layer.num_expert_group or 1
    scale_round = _ROUND[aff] if gate in ("plain", "llama4") and not layer.renormalize else 0
    # the eager plain gate computes sqrt(softplus(x)) in the logits' dtype: two roundings
    sp_round = _ROUND[dtype] if gate == "plain" and bias is not None and layer.scoring == "sqrtsoftplus" else 0
    return {"MODE": 1, "SCORING": _SCORINGS[layer.scoring], "GATE": _GATES[gate], "HAS_BIAS": bias is not None,
            "AFF_ROUND": _ROUND[aff], "CHOICE_ROUND": _ROUND.get(choice, 0), "NUM_GROUPS": groups,
            "TOPK_GROUP": layer.topk_group or 1, "GROUP_SIZE": logits.shape[1] // groups,
            "BLOCK_G": _next_pow2(groups), "RENORM": bool(layer.renormalize),
            "SCALE": bool(layer.scaling_in_weights), "SCALE_ROUND": scale_round, "SP_ROUND": sp_round}


@dataclass
class FusedLaunch:
    """Both launches of one call, bound: keyword arguments (constexprs included), the grid, the warps,
    and the outputs they write (:class:`FusedRouting`). A CUDA graph replays exactly these."""

    gate_args: dict[str, Any]
    route_args: dict[str, Any]
    grid: tuple[int]
    num_warps: int
    out: FusedRouting
    zero: Tensor  # the zero-filled accumulators (a replay that re-launches by hand zeroes it first)


def prepare_fused(
    router_logits: Tensor,
    top_k: int,
    layer: object,
    config: SelectorConfig,
    *,
    engine_ids: Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    placement: Placement | None = None,
    exact: Tensor | None = None,
    groups: Tensor | None = None,
) -> FusedLaunch:
    """Allocate the outputs and bind both kernels' arguments for one call (host work only, no sync).

    router_logits  float32 / bfloat16 / float16 [T, E] on the device the kernels run on (CPU: Triton's
                   interpreter).
    layer          a ``LayerRouting`` (plain) or a :class:`RouterSpec`; ``config`` already carries the
                   layer's scoring (:func:`~xshare.selection.call.layer_config`).
    engine_ids     int [T, >= top_k]: the engine's own picks (their order breaks exact ties); required
                   for router specs.
    knobs          the layer's device knobs (read by the kernels at every replay); None: made from
                   ``config`` here (a host-to-device copy: eager calls only).
    placement      on the logits' device; required by ``xshare_ep`` (its per-GPU caps).
    exact          bool [T]: rows that keep the engine's routing.
    groups         int [T]: the request of each row (``xshare_spec``: per-request sets first).

    Callers check :func:`kernel_problem` first; arguments are not validated again here.
    """
    num_rows, num_experts = router_logits.shape
    if knobs is None:
        knobs = SelectorKnobs.create(config, num_experts, top_k, router_logits.device)
    const = _gate_constants(layer, config, router_logits)
    spec = config.policy == "xshare_spec"
    buf = _outputs(num_rows, num_experts, top_k, router_logits.device, spec)
    common = _common_args(router_logits, top_k, engine_ids, num_tokens, exact, const["MODE"])
    per_request = {k: buf[k] for k in ("leader", "lead", "racc", "rwarm")}
    shared = {"aff_ptr": buf["aff"], "key_ptr": buf["key"], "acc_ptr": buf["acc"], "warm_ptr": buf["warm"],
              **{f"{k}_ptr": v for k, v in per_request.items()}, "SPEC": spec}
    gate_args = dict(
        common, **shared, logits_ptr=router_logits, stride_lt=router_logits.stride(0),
        stride_le=router_logits.stride(1), bias_ptr=layer.correction_bias if isinstance(layer, RouterSpec) else None,
        warmup_ptr=knobs.warmup_k, anchor_ptr=knobs.anchor_k, PREF_W=_pref_width(engine_ids, top_k),
        groups_ptr=groups if spec else None,
        BLOCK_T=_next_pow2(num_rows) if spec else 1,
        **{k: const[k] for k in ("SCORING", "GATE", "HAS_BIAS", "AFF_ROUND", "CHOICE_ROUND", "NUM_GROUPS",
                                 "TOPK_GROUP", "GROUP_SIZE", "BLOCK_G", "SP_ROUND")})
    capped = config.policy == "xshare_ep"
    rsf = layer.routed_scaling_factor if isinstance(layer, RouterSpec) else None
    route_args = dict(
        common, **shared, gpu_ptr=placement.primary_gpu if capped else None, enabled_ptr=knobs.enabled,
        budget_ptr=knobs.budget, tau_ptr=knobs.target_mass, cap_ptr=knobs.gpu_cap, min_ptr=knobs.min_tokens,
        max_ptr=knobs.max_tokens, rsf=float(rsf or 1.0), ids_ptr=buf["ids"], w_ptr=buf["weights"],
        repl_ptr=buf["replaced"], set_ptr=buf["in_set"], active_ptr=buf["active"], short_ptr=buf["short"],
        bound_ptr=buf["bound"], gbud_ptr=knobs.group_budget, BLOCK_K=_next_pow2(top_k),
        CH=max(1, min(common["BLOCK_E"], _PAIR_TILE // common["BLOCK_E"])),
        VANILLA=config.policy == "topk", CAPPED=capped, NUM_GPUS=placement.num_gpus if capped else 1,
        BLOCK_G=_next_pow2(placement.num_gpus) if capped else 1,
        **{k: const[k] for k in ("RENORM", "SCALE", "SCALE_ROUND")})
    router = const["MODE"] == 1
    out = FusedRouting(topk_ids=buf["ids"], topk_weights=buf["weights"], active=buf["active"].view(torch.bool),
                       in_set=buf["in_set"].view(torch.bool),
                       replaced=buf["replaced"].view(torch.bool) if router else None,
                       short_rows=buf["short"].reshape(()) if router else None,
                       cap_bound=buf["bound"].view(torch.bool).reshape(()))
    grid = (max(1, -(-num_rows // common["BT"])),)
    return FusedLaunch(gate_args, route_args, grid, 4, out, buf["zero"])


def _pref_width(engine_ids: Tensor | None, top_k: int) -> int:
    """Columns of the engine's picks the kernels read (0: none)."""
    return 0 if engine_ids is None else min(int(engine_ids.shape[1]), top_k)


def _common_args(router_logits: Tensor, top_k: int, engine_ids: Tensor | None, num_tokens: int | Tensor | None,
                 exact: Tensor | None, mode: int) -> dict[str, Any]:
    """The arguments both kernels take: the engine's picks, exact rows, the valid-row count (none, a host
    int, or a 0-d device tensor), the layer's sizes and the row-block shape."""
    num_rows, num_experts = router_logits.shape
    if num_tokens is None:
        nt_mode, nt_ptr, nt_val = 0, None, 0
    elif isinstance(num_tokens, Tensor):
        nt_mode, nt_ptr, nt_val = 2, num_tokens.reshape(()), 0
    else:
        nt_mode, nt_ptr, nt_val = 1, None, max(-1, min(int(num_tokens), num_rows))
    eids = engine_ids if engine_ids is not None else router_logits.new_empty((0, 1), dtype=torch.int32)
    block_e = _next_pow2(num_experts)
    return {"eids_ptr": eids, "stride_it": eids.stride(0), "stride_ie": eids.stride(1),
            "exact_ptr": None if exact is None else exact.view(torch.int8), "nt_ptr": nt_ptr, "nt_val": nt_val,
            "T": num_rows, "E": num_experts, "BLOCK_E": block_e,
            "BT": min(_next_pow2(max(1, num_rows)), max(1, _TILE // block_e)), "TOP_K": top_k,
            "IB": max(1, (num_experts - 1).bit_length()),
            "PB": max(1, _pref_width(engine_ids, top_k).bit_length()), "MODE": mode,
            "NT_MODE": nt_mode, "HAS_EXACT": exact is not None}


def _outputs(num_rows: int, num_experts: int, top_k: int, device: torch.device,
             spec: bool) -> dict[str, Tensor | None]:
    """The kernels' scratch and outputs: affinities float32 [T, E] and ranking keys int64 [T, E]; one
    zero-filled buffer holding the column sums, warm-up union, short-row count, cap-bound flag and active
    experts (and for xshare_spec, per request by its leading row: sums int64 [T, E], warm-up int32 [T, E],
    a flag); ids int32 / weights float32 [T, top_k], replaced int8 [T], the set int8 [E]."""
    base = 2 * num_experts + 1 + (num_experts + 8) // 8
    cells = num_rows * num_experts
    spec_words = cells + (cells + 1) // 2 + (num_rows + 7) // 8 if spec else 0
    zero = torch.zeros(base + spec_words, dtype=torch.int64, device=device)
    flags = zero[2 * num_experts + 1:].view(torch.int8)
    buf: dict[str, Tensor | None] = {
        "aff": torch.empty((num_rows, num_experts), dtype=torch.float32, device=device),
        "key": torch.empty((num_rows, num_experts), dtype=torch.int64, device=device),
        "zero": zero, "acc": zero[:num_experts], "warm": zero[num_experts:2 * num_experts],
        "short": zero[2 * num_experts:2 * num_experts + 1],
        "active": flags[:num_experts], "bound": flags[num_experts:num_experts + 1],
        "ids": torch.empty((num_rows, top_k), dtype=torch.int32, device=device),
        "weights": torch.empty((num_rows, top_k), dtype=torch.float32, device=device),
        "replaced": torch.empty(num_rows, dtype=torch.int8, device=device),
        "in_set": torch.empty(num_experts, dtype=torch.int8, device=device),
        "leader": None, "lead": None, "racc": None, "rwarm": None}
    if spec:
        rz = zero[base:]
        buf.update(racc=rz[:cells], rwarm=rz[cells:cells + (cells + 1) // 2].view(torch.int32)[:cells],
                   lead=rz[cells + (cells + 1) // 2:].view(torch.int8)[:num_rows],
                   leader=torch.empty(num_rows, dtype=torch.int32, device=device))
    return buf


def kernels(interpret: bool) -> tuple[Any, Any]:
    """(gate kernel, route kernel), wrapped for Triton's interpreter when ``interpret``."""
    mod = triton_module()
    if mod is None:
        raise ValueError("the fused kernels need Triton (pip install triton)")
    pair = (mod._gate_kernel, mod._route_kernel)
    return interpreted(*pair) if interpret else pair


def run_launch(launch: FusedLaunch, *, interpret: bool) -> None:
    """Launch both kernels with the bound arguments (FP contraction off: the same rounding as the
    interpreter's and the torch reference's)."""
    gate_kernel, route_kernel = kernels(interpret)
    gate_kernel[launch.grid](**launch.gate_args, num_warps=launch.num_warps, enable_fp_fusion=False)
    route_kernel[launch.grid](**launch.route_args, num_warps=launch.num_warps, enable_fp_fusion=False)


def fused_route(
    router_logits: Tensor,
    top_k: int,
    layer: object,
    config: SelectorConfig,
    **kwargs: Any,
) -> FusedRouting:
    """Route one MoE layer call with the fused kernels (arguments: :func:`prepare_fused`; the contract:
    the module doc). On CPU tensors the kernels run in Triton's interpreter."""
    launch = prepare_fused(router_logits, top_k, layer, config, **kwargs)
    run_launch(launch, interpret=router_logits.device.type == "cpu")
    return launch.out
