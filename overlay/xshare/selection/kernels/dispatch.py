"""``fused_select``: the selector's fast path (the fused Triton kernel) behind the ``select`` API.

``fused_select`` takes exactly the arguments of :func:`xshare.selection.select` plus ``backend``:

* ``"auto"``    the Triton kernel when ``router_logits`` is on CUDA, Triton is importable and the policy
                is one the kernel implements (``xshare``, ``xshare_ep``); otherwise ``select`` (torch).
* ``"torch"``   always :func:`xshare.selection.select` (the reference, and the CPU path).
* ``"triton"``  always the kernel; on CPU tensors it runs in Triton's interpreter (slow: for tests).

The kernel reproduces ``select`` exactly (same ids, same tie-breaking, weights to float32 rounding).
The hot path allocates its outputs and launches two kernels; it never synchronises with the host.
Under CUDA-graph capture pass ``knobs`` (device tensors, read by the kernels at replay) and a
:class:`Placement` already on the device; without ``knobs`` the settings are baked into the
launch as scalars (a replay then keeps the values of the capture, as with ``select``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xshare._triton import interpreted
from xshare.selection.api import check_inputs, select
from xshare.selection.common import assign_replicas
from xshare.selection.config import SelectorConfig
from xshare.selection.knobs import _NO_MAX, SelectorKnobs
from xshare.selection.registry import all_policies, get_policy
from xshare.selection.types import Placement, Routing

BACKENDS = ("auto", "torch", "triton")
MAX_EXPERTS = 1024  # the index part of the int64 ranking keys; larger layers use the torch path

_TILE_A = 4096  # elements of a [rows, experts] tile in the single-program set kernel
_TILE_B = 2048  # elements of a tile in each program of the routing kernel
_RADIX_TILE = 8192  # elements of a [groups, 2^D, experts] counting tile of the radix select


def _triton() -> Any | None:
    try:
        from xshare.selection.kernels import _triton_select
    except (ImportError, AttributeError):  # no Triton, or one without the combine functions used: torch serves
        return None
    return _triton_select


def triton_available() -> bool:
    """Whether Triton (and so the fused kernel) can be imported here."""
    return _triton() is not None


def kernel_policies() -> tuple[str, ...]:
    """The policies the fused kernel implements (``'triton' in Policy.kernels``): XShare's set, with
    the per-GPU cap for the policies that need a placement."""
    return tuple(p.name for p in all_policies() if "triton" in p.kernels)


def kernel_supports(config: SelectorConfig, num_experts: int) -> bool:
    """Whether the fused kernel implements this policy at this layer size (not with a mass target:
    the kernel's set is the budget fill; ``target_mass`` routes through the torch reference)."""
    return config.policy in kernel_policies() and 1 <= num_experts <= MAX_EXPERTS and config.target_mass is None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Static (compile-time) parameters of the two launches for one layer shape."""

    set_constexprs: dict[str, int | bool]
    route_constexprs: dict[str, int | bool]
    set_warps: int
    route_warps: int
    route_block_t: int


def launch_config(
    num_rows: int, num_experts: int, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
    num_gpus: int | None = None, nt_mode: int = 0, knobs: bool = True,
) -> LaunchConfig:
    """The constexprs of both kernels (``num_gpus`` set = the capped ``xshare_ep`` variant)."""
    block_e = _next_pow2(num_experts)
    idx_bits = max(1, (num_experts - 1).bit_length())
    key_bits = -(-(31 + idx_bits) // 4) * 4  # a multiple of every digit width used below
    rows = _next_pow2(max(1, num_rows))
    block_g = _next_pow2(num_gpus or 1)

    def digit(groups: int) -> int:
        for d in (4, 2):
            if groups * (1 << d) * block_e <= _RADIX_TILE:
                return d
        return 1

    block_t_a = min(rows, max(1, _TILE_A // block_e))
    block_t_b = min(rows, max(1, _TILE_B // block_e))
    common = {"E": num_experts, "BLOCK_E": block_e, "IDX_BITS": idx_bits, "NT_MODE": nt_mode, "KNOBS": bool(knobs)}
    set_c = dict(common, BLOCK_T=block_t_a, KEY_BITS=key_bits, D_FILL=digit(1), D_CAP=digit(block_g),
                 SIGMOID=scoring == "sigmoid", CAPPED=num_gpus is not None, NUM_GPUS=num_gpus or 1, BLOCK_G=block_g)
    route_c = dict(common, BLOCK_T=block_t_b, TOP_K=top_k, BLOCK_K=_next_pow2(top_k), RENORMALIZE=bool(renormalize))
    return LaunchConfig(set_c, route_c, set_warps=8 if block_e >= 512 else 4, route_warps=4, route_block_t=block_t_b)


def _kernels(interpret: bool) -> tuple[Any, Any]:
    mod = _triton()
    if mod is None:
        raise ValueError("backend='triton' needs Triton (pip install triton)")
    kernels = (mod._batch_set_kernel, mod._route_kernel)
    if not interpret:
        return kernels
    set_kernel, route_kernel = interpreted(*kernels)
    return set_kernel, route_kernel


def _knob_args(config: SelectorConfig, knobs: SelectorKnobs | None, num_experts: int) -> dict[str, Any]:
    """Each knob as a (pointer, value) pair: device tensors when ``knobs`` is given, else host ints."""
    if knobs is not None:
        ptrs = {"enabled": knobs.enabled, "budget": knobs.budget, "warmup": knobs.warmup_k, "cap": knobs.gpu_cap,
                "min": knobs.min_tokens, "max": knobs.max_tokens}
        out: dict[str, Any] = {f"{k}_ptr": v for k, v in ptrs.items()}
        out.update({f"{k}_val": 0 for k in ptrs})
        return out
    vals = {"enabled": 1, "budget": config.budget_for(num_experts), "warmup": config.warmup_k,
            "cap": 0 if config.gpu_cap is None else config.gpu_cap, "min": config.min_tokens,
            "max": _NO_MAX if config.max_tokens is None else config.max_tokens}
    out = {f"{k}_ptr": None for k in vals}
    out.update({f"{k}_val": v for k, v in vals.items()})
    return out


@dataclass
class KernelLaunch:
    """Everything the two launches of one call need: outputs, keyword arguments, grids."""

    ids: Tensor
    weights: Tensor
    active: Tensor  # int8 [E]
    set_args: dict[str, Any]
    route_args: dict[str, Any]
    set_grid: tuple[int]
    route_grid: tuple[int]
    set_warps: int
    route_warps: int


def prepare_launch(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    placement: Placement | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
) -> KernelLaunch:
    """Allocate the outputs and bind the kernels' arguments (host work only, no synchronisation).

    Arguments are already checked; ``placement`` is a :class:`Placement` on the logits' device.
    """
    num_rows, num_experts = router_logits.shape
    device = router_logits.device
    if num_tokens is None:
        nt_mode, nt_ptr, nt_val = 0, None, 0
    elif isinstance(num_tokens, Tensor):
        nt_mode, nt_ptr, nt_val = 2, num_tokens.to(device).reshape(()), 0
    else:
        nt_mode, nt_ptr, nt_val = 1, None, max(-1, min(int(num_tokens), num_rows))
    capped = get_policy(config.policy).needs_placement
    cfg = launch_config(num_rows, num_experts, top_k, scoring=config.scoring, renormalize=config.renormalize,
                        num_gpus=placement.num_gpus if capped and placement is not None else None,
                        nt_mode=nt_mode, knobs=knobs is not None)
    k = _knob_args(config, knobs, num_experts)
    scores = torch.empty((num_rows, num_experts), dtype=torch.float32, device=device)
    in_set = torch.empty(num_experts, dtype=torch.int8, device=device)
    active = torch.empty(num_experts, dtype=torch.int8, device=device)
    ids = torch.empty((num_rows, top_k), dtype=torch.int32, device=device)
    weights = torch.empty((num_rows, top_k), dtype=torch.float32, device=device)
    group = placement.primary_gpu.contiguous() if capped and placement is not None else None
    set_args = {
        "logits_ptr": router_logits, "stride_t": router_logits.stride(0), "stride_e": router_logits.stride(1),
        "scores_ptr": scores, "set_ptr": in_set, "active_ptr": active, "group_ptr": group,
        "nt_ptr": nt_ptr, "nt_val": nt_val,
        **{f"{n}_{w}": k[f"{n}_{w}"] for n in ("budget", "warmup", "cap") for w in ("ptr", "val")},
        "T": num_rows, **cfg.set_constexprs,
    }
    route_args = {
        "scores_ptr": scores, "set_ptr": in_set, "ids_ptr": ids, "weights_ptr": weights, "active_ptr": active,
        "nt_ptr": nt_ptr, "nt_val": nt_val,
        **{f"{n}_{w}": k[f"{n}_{w}"] for n in ("enabled", "min", "max") for w in ("ptr", "val")},
        "T": num_rows, **cfg.route_constexprs,
    }
    return KernelLaunch(ids, weights, active, set_args, route_args, (1,), (-(-num_rows // cfg.route_block_t),),
                        cfg.set_warps, cfg.route_warps)


def _resolve_backend(backend: str, router_logits: Tensor, config: SelectorConfig) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    num_experts = router_logits.shape[1] if router_logits.ndim == 2 else 0
    if backend == "auto":
        ok = router_logits.is_cuda and kernel_supports(config, num_experts) and triton_available()
        return "triton" if ok else "torch"
    if config.policy not in kernel_policies():
        raise ValueError(f"backend='triton' implements policies {kernel_policies()}, not {config.policy!r}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"backend='triton' supports 1..{MAX_EXPERTS} experts, got E = {num_experts}")
    if config.target_mass is not None:
        raise ValueError("backend='triton' has no mass target (target_mass): use backend='torch' or 'auto'")
    return "triton"


def fused_select(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> Routing:
    """:func:`xshare.selection.select` through the fused Triton kernel where it applies (see module doc).

    Raises ValueError naming the bad argument, like ``select``.
    """
    if not isinstance(config, SelectorConfig):
        raise ValueError(f"config must be a SelectorConfig, got {type(config).__name__}")
    chosen = _resolve_backend(backend, router_logits, config) if isinstance(router_logits, Tensor) else "torch"
    if chosen == "torch":
        return select(router_logits, top_k, config, groups=groups, placement=placement, num_tokens=num_tokens,
                      knobs=knobs, validate=validate)
    placement = check_inputs(router_logits, top_k, config, groups=groups, placement=placement,
                             num_tokens=num_tokens, knobs=knobs, validate=validate)
    num_rows = router_logits.shape[0]
    policy = get_policy(config.policy)
    if num_rows == 0:  # nothing to launch
        return select(router_logits, top_k, config, groups=groups, placement=placement, num_tokens=num_tokens,
                      knobs=knobs, validate=False)

    launch = prepare_launch(router_logits, top_k, config, placement=placement, num_tokens=num_tokens, knobs=knobs)
    set_kernel, route_kernel = _kernels(interpret=not router_logits.is_cuda)
    # FP contraction off: the scores are computed as written (the same rounding as the interpreter's).
    set_kernel[launch.set_grid](**launch.set_args, num_warps=launch.set_warps, enable_fp_fusion=False)
    route_kernel[launch.route_grid](**launch.route_args, num_warps=launch.route_warps, enable_fp_fusion=False)
    active_mask = launch.active.view(torch.bool)
    physical = None
    if placement is not None and placement.has_replicas:
        if num_tokens is None and knobs is None and not config.applies_to(num_rows):
            strategy = get_policy("topk").replica_strategy  # select() decides on the host here
        else:
            strategy = policy.replica_strategy
        physical = assign_replicas(launch.ids, active_mask, placement, strategy)
    return Routing(topk_ids=launch.ids, topk_weights=launch.weights, active=active_mask, physical_ids=physical)
