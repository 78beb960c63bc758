"""``select``: the selection core's function for one batch of router logits, a thin wrapper over
:func:`xshare.selection.decide.decide` (the torch reference by default; the fused Triton kernels with
``backend='auto'`` on CUDA or ``backend='triton'``)."""

from __future__ import annotations

from torch import Tensor

from xshare.selection.backends.triton.launch import MAX_EXPERTS
from xshare.selection.backends.triton.route import kernel_policies
from xshare.selection.call import LayerCall, LayerRouting
from xshare.selection.config import SelectorConfig
from xshare.selection.decide import decide
from xshare.selection.knobs import SelectorKnobs
from xshare.selection.types import Placement, Routing, as_placement, check_router_logits

BACKENDS = ("auto", "torch", "triton")


def _check_backend(backend: str, config: object, router_logits: Tensor) -> None:
    """ValueError naming ``backend`` or ``config`` when the call cannot be made as asked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(config, SelectorConfig):
        raise ValueError(f"config must be a SelectorConfig, got {type(config).__name__}")
    if backend != "triton":
        return
    if config.policy not in kernel_policies():
        raise ValueError(f"backend='triton' implements policies {kernel_policies()}, not {config.policy!r}")
    num_experts = router_logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"backend='triton' supports 1..{MAX_EXPERTS} experts, got E = {num_experts}")


def select(
    router_logits: Tensor,
    top_k: int,
    config: SelectorConfig,
    *,
    groups: Tensor | None = None,
    placement: Placement | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    knobs: SelectorKnobs | None = None,
    engine_ids: Tensor | None = None,
    validate: bool = True,
    exact: Tensor | None = None,
    backend: str = "torch",
) -> Routing:
    """Select the experts of one MoE layer for one forward batch.

    router_logits  float [T, E]; ``-inf`` marks an expert a token cannot use.
    top_k          experts per token (each token keeps exactly top_k distinct experts whenever at
                   least top_k are usable).
    config         a :class:`SelectorConfig` (its scoring and renormalisation are the layer's).
    groups         int [T]: the request of each token (speculative verify batches), or None.
    placement      int [E] (GPU of each expert), an int [E, R] replica table of GPUs (-1 padded),
                   or a :class:`Placement`; required by GPU-aware policies.
    num_tokens     rows >= num_tokens are padding (CUDA graphs): they do not count in the batch's
                   statistics and are routed like 'topk'. An int, or a 0-d device tensor.
    knobs          :class:`SelectorKnobs` (device tensors, updated in place): when given, the
                   numeric settings and the on/off switch are read from them instead of ``config``
                   (``config`` still names the policy and the scoring), so a captured CUDA graph
                   follows runtime changes. Implies the device-side batch-size gate.
    engine_ids     int [T, k] (-1 = none): among experts with exactly equal scores, these come
                   first (in this order) instead of the lower index; the serving adapter passes the
                   engine's own top-k so ties resolve as the engine resolved them.
    validate       check values too (NaN/+inf logits, placement ids); this synchronises with the
                   host, so the serving hot path passes False (shapes and types are always checked,
                   and non-finite logits are then treated as unusable).
    exact          bool [T] or None: rows routed exactly as vanilla top-k (with ``engine_ids``, the
                   engine's own ids, order and weights); their experts join the warm-up W, so the
                   sets built on W (xshare, xshare_ep, oea) contain them within the budget.
    backend        'torch' (the reference), 'triton' (the fused kernels; on CPU tensors Triton's
                   interpreter: tests) or 'auto' (the kernels for CUDA tensors and a policy they
                   implement, else torch). The kernels reproduce the reference exactly (same ids, same
                   tie-breaking, weights to float32 rounding) and never synchronise with the host.

    Raises ValueError naming the bad argument.
    """
    check_router_logits(router_logits)
    _check_backend(backend, config, router_logits)
    if router_logits.shape[0] == 0:
        backend = "torch"  # nothing to launch
    if isinstance(placement, Tensor):
        placement = as_placement(placement, router_logits.shape[1])
    call = LayerCall(router_logits, top_k, LayerRouting(config.scoring, config.renormalize), engine_ids=engine_ids,
                     num_tokens=num_tokens, groups=groups, placement=placement, knobs=knobs, exact=exact,
                     validate=validate)
    decision = decide(call, config, backend=backend)
    if backend == "triton" and decision.backend != "triton":
        raise ValueError(f"backend='triton' cannot route this call: {decision.reason}")
    return decision.routing
