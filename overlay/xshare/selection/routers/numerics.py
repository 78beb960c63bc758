"""Numerics of SGLang's compiled gates, reproduced in eager torch so the reference gates are bitwise
SGLang's on the CPU (float32 tensors in, float32 out).

Bitwise equality with SGLang (``allowed`` None or all True): ids, column order and weights are
equal for fp32 and bf16 logits, ties included, on the CPU (tests/selection/test_gates_sglang.py). Three
things make that possible and are done here on purpose:

* the ``torch.compile``'d gates compute their float32 reductions the way Inductor's CPU code does:
  one vector accumulator of ``L`` lanes (8 with AVX2, 16 with AVX-512) over the row, zero-padded
  tail, then a halving tree over the lanes (:func:`inductor_row_sum`); a plain ``torch.sum``
  differs in the last bit;
* sigmoid inside a compiled gate is the vectorised (Sleef) sigmoid for every element;
  :func:`vector_sigmoid` makes eager ATen take its vector path everywhere (no scalar tail);
* softmax inside the compiled ``grouped`` gate uses Inductor's exp (Sleef) while eager
  ``torch.softmax`` uses MKL's; with ``exact=True`` (default) that one softmax is itself
  ``torch.compile``'d (a few seconds on first use per dtype), with ``exact=False`` it is eager
  (then weights may differ from SGLang's in the last bit, and near-ties may resolve differently).

For bf16 logits the compiled biased gate ranks on the float32 sigmoid (plus bias) but gathers its
weights from the bf16-rounded sigmoid; the eager ``plain`` gate with a bias ranks on the
bf16 scores; both are reproduced. On CUDA the same functions run, but the bitwise claim is only
for the CPU: SGLang's CUDA paths mostly use other kernels (Triton ``moe_fused_gate``, flashinfer),
see docs/routers.md.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import torch.nn.functional as F
from torch import Tensor

# Eager ATen runs an elementwise op on one thread below this many elements (at::internal::GRAIN_SIZE
# is 32768; a chunk of exactly that size may still be split), and its vector loop handles
# 2 x Vectorized<float>::size() elements per step (<= 32 with AVX-512): chunks that are multiples of
# 64 never reach the scalar tail.
_VECTOR_CHUNK = 16384
_VECTOR_UNIT = 64


def inductor_lanes(device: torch.device) -> int | None:
    """float32 lanes of the vector accumulator Inductor's CPU code reduces with (8 AVX2, 16 AVX-512),
    or None where it is not emulated (other devices or ISAs)."""
    if device.type != "cpu":
        return None
    return _cpu_lanes()


@functools.cache
def _cpu_lanes() -> int | None:
    """The CPU's lanes for :func:`inductor_lanes` (asked once: the capability query is slow)."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability())


def inductor_row_sum(w: Tensor) -> Tensor:
    """float32 [T, 1]: the sum of each row of ``w`` [T, k] in the order Inductor's CPU reduction adds.

    One vector accumulator of L lanes over the row (the tail chunk zero-padded), then a halving tree
    over the lanes (lane i + lane i + L/2, ...), as ``at::vec::vec_reduce_all`` does. Where that is
    not emulated (:func:`inductor_lanes` is None) this is ``torch.sum``.
    """
    w = w.to(torch.float32)
    lanes = inductor_lanes(w.device)
    if lanes is None or w.shape[-1] == 0:
        return w.sum(dim=-1, keepdim=True, dtype=torch.float32)
    pad = (-w.shape[-1]) % lanes
    if pad:
        w = F.pad(w, (0, pad))
    acc = w[:, :lanes]
    for start in range(lanes, w.shape[-1], lanes):
        acc = acc + w[:, start:start + lanes]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc


def vector_sigmoid(x: Tensor) -> Tensor:
    """sigmoid of float32 ``x`` (any shape) through ATen's vectorised kernel for every element.

    Eager ATen computes the last few elements of a chunk with the scalar formula (glibc exp), which
    can differ in the last bit from the vector (Sleef) one Inductor uses everywhere; chunks of a
    multiple of 64 elements, each small enough for one thread, never reach that tail.
    """
    if x.device.type != "cpu":
        return torch.sigmoid(x)
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % _VECTOR_UNIT
    if pad:
        flat = F.pad(flat, (0, pad))
    if flat.numel() <= _VECTOR_CHUNK:  # one chunk: one op
        return torch.sigmoid(flat)[:n].view(x.shape)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _VECTOR_CHUNK):
        torch.sigmoid(flat[start:start + _VECTOR_CHUNK], out=out[start:start + _VECTOR_CHUNK])
    return out[:n].view(x.shape)


def _softmax_lastdim(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=-1)


_compiled_softmax = None


def compiled_softmax(x: Tensor) -> Tensor:
    """``torch.softmax(x, -1)`` as a ``torch.compile``'d kernel computes it (Inductor's exp and
    reduction order): the softmax inside SGLang's compiled ``grouped_topk_gpu``. Compiled on first use."""
    global _compiled_softmax
    if _compiled_softmax is None:
        _compiled_softmax = torch.compile(_softmax_lastdim, dynamic=True)
    return _compiled_softmax(x)


def eager_score(x: Tensor, scoring: str) -> Tensor:
    """The scoring of SGLang's eager fused_topk_torch_native, in x's dtype."""
    if scoring == "softmax":
        return x.softmax(dim=-1)
    if scoring == "sigmoid":
        return x.sigmoid()
    return F.softplus(x).sqrt()


def compiled_score(x: Tensor, scoring: str, exact: bool) -> Tensor:
    """The scoring inside a compiled SGLang gate (float32 math, rounded once to x's dtype)."""
    if scoring == "softmax":
        if exact and x.device.type == "cpu":
            return compiled_softmax(x)
        return x.softmax(dim=-1)
    return vector_sigmoid(x.to(torch.float32)).to(x.dtype)


def rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` as ``torch.tensor(value, dtype=dtype)`` rounds it (to float32 first,
    then to nearest even): a host constant computed in Python, never through a tensor (no tensor read
    inside a captured call, even the first time)."""
    return _rounded(float(value), math.copysign(1.0, value), dtype)


def _float32(value: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # beyond float32's range: a cast gives infinity
        return math.copysign(math.inf, value)


@functools.lru_cache(maxsize=64)
def _rounded(value: float, sign: float, dtype: torch.dtype) -> float:
    """:func:`rounded` (``sign`` keys -0.0 apart from 0.0 in the cache)."""
    if dtype == torch.float64:
        return value
    single = _float32(value)
    if dtype == torch.float32 or math.isnan(single) or math.isinf(single):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return single
    elif dtype == torch.float16:
        try:
            return struct.unpack("<e", struct.pack("<e", single))[0]
        except OverflowError:
            return math.copysign(math.inf, single)
    elif dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", single))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]
    raise ValueError(f"rounded: unsupported dtype {dtype}")
