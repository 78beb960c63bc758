"""The fused Triton backend (``Decision.backend == 'triton'``): every router family and the policies that
declare ``'triton'`` in ``Policy.kernels``, in two launches per layer call, CUDA-graph safe.

launch          the kernels' host side: why a call is not for them (``kernel_problem``), binding the
                arguments and outputs (``prepare_fused``), launching (``run_launch``, ``fused_route``).
route           the decision for a :class:`~xshare.selection.call.LayerCall` (``decide_fused``).
_triton_router  the Triton kernels themselves (imported only when Triton is).
cases           randomised kernel-vs-reference cases shared by the interpreter tests and ``xshare bench gpu``.
"""
