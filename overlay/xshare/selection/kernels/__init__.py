"""The selector's fast paths: the fused Triton kernels (every router family, the policies that declare
``'triton'`` in ``Policy.kernels``) and the C kernel for CPU serving.

    from xshare.selection.kernels import fused_select
    routing = fused_select(router_logits, top_k, config, placement=..., num_tokens=..., knobs=...)

``fused_select`` has the arguments and result of :func:`xshare.selection.select` (the torch reference,
used on the CPU and for every other policy), plus ``backend='auto' | 'torch' | 'triton'``; the served
path reaches the same kernels through :func:`xshare.selection.engine.decide`
(:mod:`~xshare.selection.kernels.fused_router`). Triton is optional: this package imports without it
(``triton_available()`` says whether the kernels can run).
"""

from xshare.selection.kernels.dispatch import (
    BACKENDS,
    fused_select,
    kernel_policies,
    kernel_supports,
    prepare_select,
    triton_available,
)
from xshare.selection.kernels.fused_router import MAX_EXPERTS, FusedLaunch, run_launch

__all__ = [
    "BACKENDS",
    "MAX_EXPERTS",
    "FusedLaunch",
    "fused_select",
    "kernel_policies",
    "kernel_supports",
    "prepare_select",
    "run_launch",
    "triton_available",
]
