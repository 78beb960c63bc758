"""A fused-MoE layer for the GPU check: the project's own grouped-GEMM Triton kernel and a torch reference.

SGLang's fused MoE Triton kernel cannot serve here: its module imports SGLang's runtime
(``sglang.srt.*``, ``sglang.kernels.jit``) and its alignment step is a compiled ``sgl_kernel`` op,
none of which exist on the GPU machine (only torch, triton and numpy), and its code may not be
copied into this repository. So this is a minimal kernel written for the check, in the same
structure (docs/kernel.md, "GPU check"):

* :func:`align` (torch, outside the timed region, like SGLang's ``moe_align_block_size``): the
  token-expert pairs routed to this GPU's experts, sorted by expert, each expert's run padded to
  ``BLOCK_M`` rows; one block of rows = one expert.
* ``_moe_up_kernel``: per (row block, column block) of the expert intermediate, the gate and up
  projections of the block's tokens against **that block's expert only** (``w13[e]`` [2I, H]),
  SiLU(gate) * up, stored per pair. Weights of experts nobody routed to are never read.
* ``_moe_down_kernel``: the down projection (``w2[e]`` [H, I]) times the routing weight, stored
  per pair; the per-token sum over its top-k pairs is one torch ``sum``.

Grids are sized from the alignment (host ints): one program per (expert row block, column block).
The reference :func:`moe_reference` loops over the routed experts in torch with the same
roundings (the activation is rounded to the input dtype between the two GEMMs).

Interpreter note: Triton 3.9's interpreter multiplies bf16 ``tl.dot`` operands wrongly, so when the
kernels run interpreted (CPU tensors, the CPU mode of ``xshare bench gpu`` and the tests) the
operands are widened to float32 first (``UPCAST``); compiled on a GPU they are multiplied natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


@dataclass(frozen=True)
class Aligned:
    """The pairs (token t, slot j) -> p = t * top_k + j routed to local experts, grouped by expert.

    sorted_pairs int32 [num_blocks * BLOCK_M] (padding = num_pairs), block_expert int32 [num_blocks]
    (local expert of each row block), counts int64 [num_local] (pairs per local expert).
    """

    sorted_pairs: Tensor
    block_expert: Tensor
    counts: Tensor
    num_pairs: int
    top_k: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_expert.numel())

    @property
    def active(self) -> int:
        """Local experts with at least one pair (the ones whose weights are read)."""
        return int((self.counts > 0).sum())


def align(topk_ids: Tensor, num_local: int, *, first: int = 0, block_m: int = BLOCK_M) -> Aligned:
    """Group the routed pairs by local expert (``first <= id < first + num_local``), padded per expert.

    topk_ids int [T, k] (global expert ids). Host synchronising: call it outside timed regions.
    """
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, top_k], got shape {tuple(topk_ids.shape)}")
    if num_local < 1 or block_m < 1:
        raise ValueError("num_local and block_m must be >= 1")
    device = topk_ids.device
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    flat = topk_ids.reshape(-1).long() - first
    pairs = torch.nonzero((flat >= 0) & (flat < num_local)).reshape(-1)
    experts = flat[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    counts = torch.bincount(experts, minlength=num_local)
    blocks = (counts + block_m - 1) // block_m
    padded_start = torch.cumsum(blocks * block_m, 0) - blocks * block_m
    run_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pairs.numel(), device=device) - run_start[experts]
    total = int(blocks.sum()) * block_m
    sorted_pairs = torch.full((total,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[experts] + rank] = pairs.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(num_local, device=device), blocks).to(torch.int32)
    return Aligned(sorted_pairs, block_expert, counts, num_pairs, top_k)


def moe_reference(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor, *,
                  first: int = 0) -> Tensor:
    """The MoE layer's routed experts in torch: sum_j w[t, j] * down(SiLU(gate(x_t)) * up(x_t)) over
    the pairs routed to local experts ``first .. first + E_local - 1``.

    x [T, H]; topk_ids int [T, k]; topk_weights float [T, k]; w13 [E_local, 2I, H] (gate rows then up
    rows); w2 [E_local, H, I]. Returns [T, H] in x's dtype (float32 math; the activation rounded to
    x's dtype between the GEMMs, as the kernel stores it).
    """
    num_local, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long() - first
    wflat = topk_weights.reshape(-1).float()
    k = topk_ids.shape[1]
    for e in torch.unique(flat[(flat >= 0) & (flat < num_local)]).tolist():
        pairs = torch.nonzero(flat == e).reshape(-1)
        tok = pairs // k
        h = x[tok].float() @ w13[e].float().t()
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype).float()
        y = (act @ w2[e].float().t()) * wflat[pairs, None]
        out.index_add_(0, tok, y.to(x.dtype).float())
    return out.to(x.dtype)


class FusedMoE:
    """The Triton fused-MoE layer for one weight set; :meth:`__call__` is the timed part.

    w13 [E_local, 2I, H], w2 [E_local, H, I] (contiguous, the activations' dtype).
    """

    def __init__(self, w13: Tensor, w2: Tensor) -> None:
        if w13.ndim != 3 or w2.ndim != 3 or w13.shape[0] != w2.shape[0] or w13.shape[1] != 2 * w2.shape[2] \
                or w13.shape[2] != w2.shape[1]:
            raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)}, {tuple(w2.shape)}")
        self.w13, self.w2 = w13.contiguous(), w2.contiguous()
        self.num_local, self.hidden, self.inter = w2.shape[0], w2.shape[1], w2.shape[2]
        from xshare.bench import _fused_moe_kernels as kern  # needs Triton

        interpret = not w13.is_cuda
        self._up, self._down = kern.kernels(interpret)
        self._upcast = interpret

    def buffers(self, num_tokens: int, top_k: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Scratch for one call: per-pair activation [T*k, I] and output [T*k, H]."""
        dev = self.w13.device
        return {"act": torch.empty(num_tokens * top_k, self.inter, dtype=dtype, device=dev),
                "out": torch.empty(num_tokens * top_k, self.hidden, dtype=dtype, device=dev)}

    def __call__(self, x: Tensor, al: Aligned, topk_weights: Tensor, bufs: dict[str, Tensor]) -> Tensor:
        """x [T, H] -> [T, H]: the local experts' contribution (zero for tokens routed elsewhere)."""
        out = bufs["out"]
        out.zero_()
        if al.num_blocks:
            common: dict[str, Any] = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K,
                                      "TOP_K": al.top_k, "UPCAST": self._upcast}
            grid_up = (al.num_blocks, -(-self.inter // BLOCK_N))
            self._up[grid_up](x, self.w13, bufs["act"], al.sorted_pairs, al.block_expert, al.num_pairs,
                              self.hidden, self.inter, x.stride(0), self.w13.stride(0), self.w13.stride(1),
                              **common, num_warps=4, num_stages=3, enable_fp_fusion=True)
            grid_down = (al.num_blocks, -(-self.hidden // BLOCK_N))
            self._down[grid_down](bufs["act"], self.w2, out, topk_weights, al.sorted_pairs, al.block_expert,
                                  al.num_pairs, self.hidden, self.inter, self.w2.stride(0), self.w2.stride(1),
                                  **common, num_warps=4, num_stages=3, enable_fp_fusion=True)
        return out.view(-1, al.top_k, self.hidden).sum(1)
