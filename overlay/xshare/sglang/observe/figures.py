"""The definitions of the figures of one applied MoE layer call, op by op: the routing checksum compared
across tensor-parallel ranks and the metrics window row (activated experts with and without the
selector, per-GPU peaks, mass and top-1 kept, tokens). Serving adds them in one fused step
(:func:`xshare.sglang.observe.tally.tally`) or, for the C kernel's calls, in one C pass
(:func:`cpu_call_figures`); the tests compare those with these definitions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xshare.selection.backends.c.kernel import kernel_error, library
from xshare.sglang.observe.tally import WINDOW_FIELDS


def routing_checksum(ids: Tensor, valid: Tensor) -> Tensor:
    """int64: sum over valid rows t and columns j of (id + 1) * (t + 1) * (j + 1): an order-sensitive
    digest of a layer's routing, compared across tensor-parallel ranks (the CPU kernel computes the
    same number in its routing pass). The definition, op by op; serving adds it with
    :func:`xshare.sglang.observe.tally.tally`."""
    rows = torch.arange(1, ids.shape[0] + 1, device=ids.device).unsqueeze(1)
    cols = torch.arange(1, ids.shape[1] + 1, device=ids.device).unsqueeze(0)
    return ((ids.to(torch.int64) + 1) * rows * cols * valid.unsqueeze(1)).sum()


def cpu_call_figures(out: Any, layer_id: int, expert_gpu: Tensor, num_gpus: int, row: Tensor | None = None) -> Tensor:
    """The window row of :func:`call_figures` for one CPU-kernel routing (``CpuRouting``), computed
    by the C library in one pass (float32 [len(WINDOW_FIELDS) + 2 * num_gpus]); written into ``row``
    when given (a contiguous float32 CPU view, e.g. the window ring's next row)."""
    lib = library()
    num_rows, num_experts = out.scores.shape
    top_k = out.routing.topk_ids.shape[1]
    if out.engine_ids is None:
        raise ValueError("cpu_call_figures needs the engine's own top-k (engine_ids)")
    gpu = expert_gpu.to(torch.int64).contiguous()
    width = len(WINDOW_FIELDS) + 2 * num_gpus
    if row is None:
        row = torch.empty(width, dtype=torch.float32)
    elif row.shape != (width,) or row.dtype != torch.float32 or row.device.type != "cpu" or not row.is_contiguous():
        raise ValueError(f"cpu_call_figures: row must be a contiguous float32 CPU tensor [{width}], got "
                         f"{row.dtype} {tuple(row.shape)} on {row.device}")
    ptr = (lambda t: None if t is None else t.data_ptr())  # noqa: E731
    rc = lib.xshare_cpu_figures(num_rows, num_experts, top_k, out.engine_ids.shape[1], num_gpus, int(layer_id),
                                ptr(out.logits), ptr(out.scores), ptr(out.routing.topk_ids), ptr(out.engine_ids),
                                ptr(out.routing.active), ptr(out.vanilla_active), out.num_valid, ptr(gpu), ptr(row))
    if rc != 0:
        raise RuntimeError(kernel_error(rc))
    return row


def call_figures(layer_id: int, logits: Tensor, vanilla_ids: Tensor, chosen_ids: Tensor, active: Tensor,
                 vanilla_active: Tensor, valid: Tensor, expert_gpu: Tensor, num_gpus: int,
                 scoring: str = "softmax") -> Tensor:
    """One window row (float32 [len(WINDOW_FIELDS) + 2 * num_gpus], on the logits' device) for one applied call:
    the definition of the figures, op by op (serving adds them with :func:`xshare.sglang.observe.tally.tally`,
    one fused step; the tests compare the two).

    ``vanilla_ids``/``chosen_ids`` int [T, k]: SGLang's own top-k and the policy's; ``active`` /
    ``vanilla_active`` bool [E]; ``valid`` bool [T] (non-padded rows); ``expert_gpu`` int64 [E]: the
    GPU of each logical expert. Mass kept: per token, the gate probability of its chosen experts over
    that of its own top-k, averaged over valid tokens; top-1 kept: the share of valid tokens whose
    highest-scoring expert is among their chosen ones. Pure tensor ops, no host synchronisation.
    """
    dev = logits.device
    lg = logits.float()
    probs = torch.softmax(lg, dim=-1) if scoring == "softmax" else torch.sigmoid(lg)
    chosen = chosen_ids.to(torch.int64).clamp(0, lg.shape[1] - 1)
    vanilla = vanilla_ids.to(torch.int64).clamp(0, lg.shape[1] - 1)
    validf = valid.to(torch.float32)
    n_valid = validf.sum().clamp_min(1.0)
    kept = probs.gather(1, chosen).sum(1) / probs.gather(1, vanilla).sum(1).clamp_min(1e-30)
    mass_kept = (kept.clamp(max=1.0) * validf).sum() / n_valid
    top1 = lg.argmax(1, keepdim=True)
    top1_kept = ((chosen == top1).any(1).to(torch.float32) * validf).sum() / n_valid
    gpu = expert_gpu.to(device=dev, dtype=torch.int64)
    gpu_active = torch.zeros(num_gpus, device=dev).index_add_(0, gpu, active.to(torch.float32))
    gpu_vanilla = torch.zeros(num_gpus, device=dev).index_add_(0, gpu, vanilla_active.to(torch.float32))
    hits = torch.zeros(lg.shape[0], num_gpus, device=dev).scatter_(1, gpu[chosen], 1.0)
    gpu_tokens = (hits * validf.unsqueeze(1)).sum(0)
    n_active = gpu_active.sum()
    peak = gpu_active.max()
    ratio = torch.where(n_active > 0, peak * num_gpus / n_active.clamp_min(1.0), torch.ones((), device=dev))
    head = torch.stack([torch.full((), float(layer_id), device=dev), n_active, vanilla_active.to(torch.float32).sum(),
                        peak, gpu_vanilla.max(), ratio, mass_kept, top1_kept, validf.sum()])
    return torch.cat([head, gpu_active, gpu_tokens])
