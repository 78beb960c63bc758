# ruff: noqa: ANN001  (Triton kernel parameters: their annotations are read by Triton; only constexprs carry one)
"""Triton kernels of the GPU check's fused-MoE layer (see :mod:`xshare.bench._fused_moe`).

Both kernels run one program per (row block, column block); a row block holds BLOCK_M token-expert
pairs of one expert (``block_expert``), padding rows hold ``num_pairs`` and are masked. Only that
expert's weights are loaded. Like the selector's kernels they use Triton builtins (no ``tl.zeros``/
``tl.sigmoid``/``tl.cdiv``) and one ``@triton.jit`` helper (the pair block), so they also run in Triton's
interpreter (:func:`xshare._triton.interpreted`) in a process that imported Triton in compiled mode.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

from xshare._triton import interpreted


@triton.jit
def _pair_block(pairs_ptr, block_expert_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """The program's block of sorted (token, expert) pairs (grid axis 0): (its expert, int64; the pair indices
    [BLOCK_M]; which of them are real pairs, not padding)."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows)
    return e, pair, pair < num_pairs


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_up_kernel(
    x_ptr, w13_ptr, act_ptr, pairs_ptr, block_expert_ptr, num_pairs,
    H, INTER, stride_xt, stride_we, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    e, pair, valid = _pair_block(pairs_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    pid_n = tl.program_id(1)
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    w_base = w13_ptr + e * stride_we
    acc_g = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_u = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        wmask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None], mask=wmask, other=0.0)
        wu = tl.load(w_base + (INTER + offs_n)[None, :].to(tl.int64) * stride_wn + offs_k[:, None], mask=wmask,
                     other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out = act_ptr + pair[:, None].to(tl.int64) * INTER + offs_n[None, :]
    tl.store(out, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(
    act_ptr, w2_ptr, out_ptr, weights_ptr, pairs_ptr, block_expert_ptr, num_pairs,
    H, INTER, stride_we, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    e, pair, valid = _pair_block(pairs_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    pid_n = tl.program_id(1)
    prow = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    w_base = w2_ptr + e * stride_we
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < INTER
        a = tl.load(act_ptr + prow[:, None] * INTER + offs_k[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w)
    wt = tl.load(weights_ptr + prow, mask=valid, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    tl.store(out_ptr + prow[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


def kernels(interpret: bool) -> tuple[Any, Any]:
    """(up, down): compiled, or wrapped for Triton's interpreter (CPU tensors)."""
    ks = (_moe_up_kernel, _moe_down_kernel)
    if not interpret:
        return ks
    up, down = interpreted(*ks)
    return up, down
