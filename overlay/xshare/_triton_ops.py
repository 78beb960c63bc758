# ruff: noqa: ANN001  (Triton parameters: their annotations are read by Triton; only constexprs carry one)
"""``@triton.jit`` helpers shared by the selector's kernels (:mod:`xshare.selection.kernels._triton_router`) and
the routing hook's bookkeeping kernel (:mod:`xshare.sglang._triton_tally`); imported only by those modules, so only
where Triton is. :func:`xshare._triton.interpreted` runs kernels calling them on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_count(T, nt_val, nt_ptr, NT_MODE: tl.constexpr):
    """The call's real rows n (int64 scalar), by ``NT_MODE``: 0 = all T rows, 1 = ``nt_val`` (SGLang's
    ``num_token_non_padded`` as a host int), 2 = the device scalar at ``nt_ptr`` (read on the device)."""
    if NT_MODE == 0:
        n = T.to(tl.int64)
    elif NT_MODE == 1:
        n = nt_val.to(tl.int64)
    else:
        n = tl.load(nt_ptr).to(tl.int64)
    return n
