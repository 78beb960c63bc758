"""The selector's fast path: a fused Triton kernel for the policies that declare it
(``Policy.kernels``: ``xshare`` and ``xshare_ep``).

    from xshare.selection.kernels import fused_select
    routing = fused_select(router_logits, top_k, config, placement=..., num_tokens=..., knobs=...)

Same arguments and result as :func:`xshare.selection.select` (the torch reference, used on the CPU
and for every other policy), plus ``backend='auto' | 'torch' | 'triton'``. Triton is optional: this
package imports without it (``triton_available()`` says whether the kernel can run).
"""

from xshare.selection.kernels.dispatch import (
    BACKENDS,
    MAX_EXPERTS,
    KernelLaunch,
    LaunchConfig,
    fused_select,
    kernel_policies,
    kernel_supports,
    launch_config,
    prepare_launch,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "MAX_EXPERTS",
    "KernelLaunch",
    "LaunchConfig",
    "fused_select",
    "kernel_policies",
    "kernel_supports",
    "launch_config",
    "prepare_launch",
    "triton_available",
]
