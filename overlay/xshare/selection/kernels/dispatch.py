"""``fused_select``: :func:`xshare.selection.select` through the fused Triton kernels.

``fused_select`` takes exactly the arguments of :func:`xshare.selection.select` plus ``backend``:

* ``"auto"``    the kernels when ``router_logits`` is on CUDA, Triton is importable and the policy is
                one they implement (``Policy.kernels`` holds ``'triton'``: ``topk``, ``xshare``,
                ``xshare_ep``); otherwise ``select`` (torch).
* ``"torch"``   always :func:`xshare.selection.select` (the reference, and the CPU path).
* ``"triton"``  always the kernels; on CPU tensors they run in Triton's interpreter (slow: for tests).

The kernels are the served selector's (:mod:`xshare.selection.kernels.fused_router`, every router
family; here the plain softmax / sigmoid gate of ``select``). They reproduce ``select`` exactly (same
ids, same tie-breaking, weights to float32 rounding); the hot path allocates its outputs and launches
two kernels; it never synchronises with the host. Under CUDA-graph capture pass ``knobs`` (device
tensors, read by the kernels at replay) and a :class:`Placement` already on the device; without
``knobs`` they are made from ``config`` (a host-to-device copy: eager calls only).
"""

from __future__ import annotations

from torch import Tensor

from xshare.selection.api import check_inputs, select
from xshare.selection.common import assign_replicas
from xshare.selection.config import SelectorConfig
from xshare.selection.kernels.fused_router import MAX_EXPERTS, FusedLaunch, fused_route, prepare_fused
from xshare.selection.kernels.fused_router import _triton as _triton_module
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.registry import all_policies, get_policy
from xshare.selection.types import Placement, Routing

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton (and so the fused kernels) can be imported here."""
    return _triton_module() is not None


def kernel_policies() -> tuple[str, ...]:
    """The policies the fused kernels implement (``'triton' in Policy.kernels``)."""
    return tuple(p.name for p in all_policies() if "triton" in p.kernels)


def kernel_supports(config: SelectorConfig, num_experts: int) -> bool:
    """Whether the fused kernels implement this policy at this layer size."""
    return config.policy in kernel_policies() and 1 <= num_experts <= MAX_EXPERTS


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
    return "triton"


def prepare_select(router_logits: Tensor, top_k: int, config: SelectorConfig, *, placement: Placement | None = None,
                   num_tokens: int | Tensor | None = None, knobs: SelectorKnobs | None = None) -> FusedLaunch:
    """The bound launches of one ``select`` call (checked arguments, ``placement`` on the device): what a
    CUDA graph captures (``xshare bench gpu`` re-launches them on the CPU; the compile test builds them)."""
    return prepare_fused(router_logits, top_k, None, config, placement=placement, num_tokens=num_tokens, knobs=knobs)


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
    """:func:`xshare.selection.select` through the fused kernels where they apply (see module doc).

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
    res = fused_route(router_logits, top_k, None, config, placement=placement, num_tokens=num_tokens, knobs=knobs)
    physical = None
    if placement is not None and placement.has_replicas:
        if num_tokens is None and knobs is None and not config.applies_to(num_rows):
            strategy = get_policy("topk").replica_strategy  # select() decides on the host here
        else:
            strategy = policy.replica_strategy
        physical = assign_replicas(res.topk_ids, res.active, placement, strategy)
    cap_bound = res.cap_bound if "target_mass" in policy.knobs else None
    return Routing(topk_ids=res.topk_ids, topk_weights=res.topk_weights, active=res.active, physical_ids=physical,
                   cap_bound=cap_bound)
