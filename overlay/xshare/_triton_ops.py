# ruff: noqa: ANN001  (Triton parameters: their annotations are read by Triton; only constexprs carry one)
"""``@triton.jit`` helpers of the selector's kernels (:mod:`xshare.selection.backends.triton._triton_router`) and
the routing hook's bookkeeping kernel (:mod:`xshare.sglang.observe._triton_tally`): the call's real row count,
float32 values rounded as the engine holds them, floats as order-preserving integers, the best remaining key of
each row, the routed weights renormalised and scaled. Imported only by those modules, so only where Triton is;
:func:`xshare._triton.interpreted` runs kernels calling them on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

_MAX = tl.standard._elementwise_max
_ADD = tl.standard._sum_combine


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


@triton.jit
def round_as(x, ROUND: tl.constexpr):
    """float32 ``x`` rounded as the engine holds it: 1 = bfloat16 (to nearest even, on the bits), 2 = float16,
    0 = as it is (float32)."""
    if ROUND == 1:
        _rb = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        x = ((_rb + 0x7FFF + ((_rb >> 16) & 1)) & 0xFFFF0000).to(tl.int32).to(tl.float32, bitcast=True)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def ordered(x):
    """float32 -> int64 in [0, 2**32): the float's bits mapped so that integer order is float order."""
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def pop_best(kk, aff, E: tl.constexpr, IB: tl.constexpr):
    """Each row's best remaining key: (the keys without it, its expert id int32 [BT], its affinity float32 [BT])."""
    best = tl.reduce(kk, 1, _MAX)
    hit = kk == best[:, None]
    idx = (E - 1 - (best & ((1 << IB) - 1))).to(tl.int32)
    w = tl.reduce(tl.where(hit, aff, 0.0), 1, _ADD)
    return tl.where(hit, -1, kk), idx, w


@triton.jit
def routed_weights(out_w, rsf, RENORM: tl.constexpr, SCALE: tl.constexpr, SCALE_ROUND: tl.constexpr):
    """The routed weights renormalised (``RENORM``) and scaled by the routed scaling factor (``SCALE``, rounded
    as the engine holds the result)."""
    if RENORM:
        out_w = out_w / (tl.reduce(out_w, 1, _ADD) + 1e-20)[:, None]
    if SCALE:
        out_w = round_as(out_w * rsf, SCALE_ROUND)
    return out_w
