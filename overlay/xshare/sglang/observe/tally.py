"""The per-call bookkeeping of the routing hook, added on the device into preallocated accumulators.

One applied MoE layer call adds its figures into two buffers that :class:`xshare.sglang.observe.stats.SelectorStats`
allocates once per device (and window width) and never per call:

* ``sums``    int64 [slots, S]: one row per MoE layer, the running sums :data:`LAYER_SUMS` (calls,
  activated experts, vanilla activated experts, valid tokens, changed tokens, checksum, calls whose
  budget stopped a mass target short).
* ``window``  float32 [capacity, len(WINDOW_FIELDS) + 2 G] and ``window_idx`` int64 0-d: a ring of one
  row per call (:data:`WINDOW_FIELDS`, then activated experts per GPU, then tokens per GPU), written at
  ``window_idx % capacity``; the index then moves on by one. Only while the metrics are observed.

:func:`tally` does it with one Triton launch on CUDA (``xshare.sglang.observe._triton_tally``) and with
:func:`tally_torch` elsewhere (CPU, meta, CUDA without Triton): the same figures, integer ones
identical, float ones (mass kept) to float32 rounding. Neither reads a value back to the host, copies
from the host or allocates per call beyond the torch path's temporaries, so the call can be captured
in a CUDA graph: each replay adds again (the calls are counted on the device, in ``sums``).

Definitions, per call, over the valid (non-padding) rows, with SGLang's own ids ``old`` and the
policy's ids ``new`` (ids outside ``[0, E)`` count as no expert; the checksum takes them as they are):

* activated: experts in ``active``; vanilla activated: experts some valid row of ``old`` routes to;
* changed tokens: rows whose expert multiset differs between ``old`` and ``new``;
* checksum: sum over rows t and columns j of ``(new[t, j] + 1) * (t + 1) * (j + 1)`` (int64);
* mass cap bound: 1 when the call's ``cap_bound`` flag (``Routing.cap_bound``, a device bool) is set;
* mass kept: per row, the gate probability (softmax or sigmoid of the logits) of ``new`` over that of
  ``old`` (capped at 1), averaged; top-1 kept: the share of rows whose highest logit (first one on
  ties) is among ``new``;
* per GPU (``expert_gpu``): activated experts, and rows with at least one expert of ``new`` there;
  peak: their max; peak/mean ratio: peak x G / activated (1 when none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xshare._triton import interpreted

# Columns of one window row; then num_gpus columns of activated experts per GPU, then num_gpus of tokens per GPU.
WINDOW_FIELDS = ("layer", "active", "vanilla_active", "peak_gpu", "vanilla_peak_gpu", "peak_mean_ratio",
                 "mass_kept", "top1_kept", "tokens")
# Columns of a layer's sums row that tally() adds; a further per-layer counter goes after them (its own add).
LAYER_SUMS = ("calls", "activated", "vanilla_activated", "tokens", "changed_tokens", "checksum", "mass_cap_bound")
BACKENDS = ("auto", "torch", "triton")
MAX_KERNEL_EXPERTS = 1024  # larger layers use the torch path
MAX_KERNEL_GPUS = 1024
_TILE = 2048  # elements of a [rows, experts] (and [rows, GPUs]) tile of the kernel


@dataclass(frozen=True)
class Target:
    """Where one call's figures go: row ``slot`` of ``sums`` (int64 [slots, S], S >= len(LAYER_SUMS)),
    and, when observed, the ring ``window`` (float32 [capacity, len(WINDOW_FIELDS) + 2 G]) with its index
    ``window_idx`` (int64 0-d). ``layer_id`` is the window rows' first column: as a host number for the
    kernel, and in ``label`` (float32 0-d, on the device, written once) for the torch path."""

    sums: Tensor
    slot: int
    layer_id: int
    label: Tensor
    window: Tensor | None = None
    window_idx: Tensor | None = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (no buffer may be made or cached then)."""
    return device.type == "cuda" and torch.cuda.is_current_streamcapturing()


# -- cached device constants of the torch path (never made or cached under CUDA-graph capture) -------------
_ROWS: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}  # (device, K) -> (rows int64 [N], (t+1)(j+1) int64 [N, K])
_EXPERTS: dict[tuple[str, int], Tensor] = {}  # (device, E) -> int64 [E]
_GPUS: dict[int, tuple[Tensor, int, Tensor]] = {}  # id(expert_gpu) -> (expert_gpu, its version, float32 [E, G + 1])
_ONES: dict[tuple[str, torch.dtype], Tensor] = {}  # (device, dtype) -> [1] holding 1
_ZEROS: dict[str, Tensor] = {}  # device -> int64 [1] holding 0


def _row_constants(device: torch.device, num_rows: int, k: int) -> tuple[Tensor, Tensor]:
    key = (str(device), k)
    hit = _ROWS.get(key)
    if hit is None or hit[0].shape[0] < num_rows:
        size = max(num_rows, 64 if hit is None else 2 * hit[0].shape[0])
        rows = torch.arange(size, device=device)
        hit = (rows, (rows + 1).unsqueeze(1) * torch.arange(1, k + 1, device=device))
        if capturing(device):
            return hit[0][:num_rows], hit[1][:num_rows]
        _ROWS[key] = hit
    return hit[0][:num_rows], hit[1][:num_rows]


def _experts(device: torch.device, num_experts: int) -> Tensor:
    key = (str(device), num_experts)
    out = _EXPERTS.get(key)
    if out is None:
        out = torch.arange(num_experts, device=device)
        if not capturing(device):
            _EXPERTS[key] = out
    return out


def _gpu_matrix(expert_gpu: Tensor, num_gpus: int) -> Tensor:
    """float32 [E, G + 1]: 1 where expert e lives on GPU g, and a last column of ones. Cached per tensor
    and its version (a placement rewritten in place, an EPLB rebalance, makes a new one); under capture
    made in the graph, so each replay reads the placement as it is then."""
    hit = _GPUS.get(id(expert_gpu))
    if hit is not None and hit[0] is expert_gpu and hit[1] == expert_gpu._version and \
            hit[2].shape[1] == num_gpus + 1:
        return hit[2]
    cols = torch.arange(num_gpus + 1, device=expert_gpu.device)
    out = ((expert_gpu.unsqueeze(1) == cols) | (cols == num_gpus)).to(torch.float32)
    if not capturing(expert_gpu.device):
        if len(_GPUS) > 256:
            _GPUS.clear()
        _GPUS[id(expert_gpu)] = (expert_gpu, expert_gpu._version, out)
    return out


def _one(device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (str(device), dtype)
    out = _ONES.get(key)
    if out is None:
        out = torch.ones(1, dtype=dtype, device=device)
        if not capturing(device):
            _ONES[key] = out
    return out


def _zero(device: torch.device) -> Tensor:
    out = _ZEROS.get(str(device))
    if out is None:
        out = torch.zeros(1, dtype=torch.int64, device=device)
        if not capturing(device):
            _ZEROS[str(device)] = out
    return out


def _valid(rows: Tensor, num_tokens: int | Tensor | None, num_rows: int) -> Tensor:
    if num_tokens is None:
        return rows < num_rows
    if isinstance(num_tokens, Tensor):
        return rows < num_tokens.to(rows.device).reshape(())
    return rows < int(num_tokens)


def tally_torch(target: Target, *, logits: Tensor, engine_ids: Tensor, chosen_ids: Tensor, active: Tensor,
                num_tokens: int | Tensor | None = None, expert_gpu: Tensor | None = None, num_gpus: int = 1,
                scoring: str = "softmax", cap_bound: Tensor | None = None) -> None:
    """Add one call's figures (module docstring) into ``target`` with torch ops, in place.

    ``logits`` float [T, E]; ``engine_ids`` / ``chosen_ids`` int [T, K] (SGLang's own top-k, the
    policy's); ``active`` bool [E]; ``num_tokens``: rows at and beyond it are padding (int, 0-d device
    tensor or None); ``expert_gpu`` int64 [E] (GPU of each expert, in ``[0, num_gpus)``) is needed
    when ``target.window`` is set; ``cap_bound`` bool 0-d or None (no mass target). No host read; the
    only allocations are this call's temporaries.
    """
    num_rows, num_experts = logits.shape
    k = chosen_ids.shape[1]
    rows, weights = _row_constants(logits.device, num_rows, k)
    valid = _valid(rows, num_tokens, num_rows)
    validf = valid.to(torch.float32)
    ids = torch.cat((engine_ids, chosen_ids), 1).unsqueeze(2) == _experts(logits.device, num_experts)
    # per row and expert: how often SGLang's routing [:, 0] and the policy's [:, 1] pick it; 0 on padding
    cnt = ids.view(num_rows, 2, k, num_experts).sum(2, dtype=torch.float32) * validf.view(-1, 1, 1)
    old_cnt, new_cnt = cnt.unbind(1)
    changed = (old_cnt != new_cnt).any(1)
    vanilla = old_cnt.amax(0).clamp_(max=1.0)  # float [E]
    checksum = ((chosen_ids + 1) * weights * valid.unsqueeze(1)).sum().view(1)
    window, window_idx = target.window, target.window_idx
    if window is None or window_idx is None:
        counts = torch.stack((active.sum(), vanilla.sum().to(torch.int64), valid.sum(), changed.sum()))
    else:
        if expert_gpu is None:
            raise ValueError("tally: expert_gpu is required to write the window row")
        g = num_gpus
        lg = logits.float()
        probs = torch.softmax(lg, dim=-1) if scoring == "softmax" else torch.sigmoid(lg)
        mass = torch.bmm(cnt, probs.unsqueeze(2)).view(num_rows, 2)  # gate mass of SGLang's picks, the policy's
        # capped at 1 on valid rows, 0 on padding (fmin also drops a NaN of garbage padding logits)
        kept = torch.fmin(mass[:, 1] / mass[:, 0].clamp_min(1e-30), validf)
        top1 = new_cnt.gather(1, lg.argmax(1, keepdim=True))
        hits = torch.mm(new_cnt, _gpu_matrix(expert_gpu, g)).clamp_max_(1.0)  # [T, G + 1]: a pick on GPU g
        # summed over rows: mass kept, top-1 kept, tokens, changed, tokens per GPU [G] (and one unused column)
        per_row = torch.cat((kept.unsqueeze(1), top1, validf.unsqueeze(1), changed.unsqueeze(1), hits), 1).sum(0)
        loads = torch.mm(torch.stack((active.to(torch.float32), vanilla)), _gpu_matrix(expert_gpu, g))  # [2, G + 1]
        peaks = loads[:, :g].amax(1)
        totals = loads[:, g]  # activated experts: selected, vanilla
        n_tok = per_row[2:3]
        # peak x G >= activated, so the ratio is >= 1 whenever experts are active; fmax gives 1 for 0 / 0
        ratio = torch.fmax(peaks[:1] * g / totals[:1], _one(logits.device, torch.float32))
        means = per_row[:2] / n_tok.clamp_min(1.0)
        row = torch.cat((target.label.view(1), totals, peaks, ratio, means, n_tok, loads[0, :g], per_row[4:4 + g]))
        window.index_copy_(0, window_idx.remainder(window.shape[0]).view(1), row.view(1, -1))
        window_idx.add_(1)
        counts = torch.cat((totals, per_row[2:4])).to(torch.int64)  # activated, vanilla, tokens, changed
    bound = _zero(logits.device) if cap_bound is None else cap_bound.view(1)
    target.sums[target.slot, :len(LAYER_SUMS)].add_(torch.cat((_one(logits.device, torch.int64), counts, checksum,
                                                               bound)))


def _kernel() -> Any | None:
    try:
        from xshare.sglang.observe import _triton_tally
    except (ImportError, AttributeError):  # no Triton, or one without the combine functions used: torch serves
        return None
    return _triton_tally._tally_kernel


def kernel_available() -> bool:
    """Whether the Triton kernel can be imported here."""
    return _kernel() is not None


def _use_kernel(backend: str, logits: Tensor, num_gpus: int) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"tally: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    fits = logits.shape[1] <= MAX_KERNEL_EXPERTS and num_gpus <= MAX_KERNEL_GPUS
    if backend == "auto":
        return logits.is_cuda and fits and kernel_available()
    if not fits:
        raise ValueError(f"tally: backend='triton' supports up to {MAX_KERNEL_EXPERTS} experts and "
                         f"{MAX_KERNEL_GPUS} GPUs, got E = {logits.shape[1]}, G = {num_gpus}")
    if not kernel_available():
        raise ValueError("tally: backend='triton' needs Triton (pip install triton)")
    return True


def tally(target: Target, *, logits: Tensor, engine_ids: Tensor, chosen_ids: Tensor, active: Tensor,
          num_tokens: int | Tensor | None = None, expert_gpu: Tensor | None = None, num_gpus: int = 1,
          scoring: str = "softmax", cap_bound: Tensor | None = None, backend: str = "auto") -> None:
    """Add one applied call's figures into ``target`` (arguments: :func:`tally_torch`).

    ``backend``: ``"auto"`` the Triton kernel on CUDA where Triton imports, else torch; ``"torch"``;
    ``"triton"`` always the kernel (on CPU tensors in Triton's interpreter: for tests). Raises
    ValueError naming the argument for inputs that do not fit.
    """
    if logits.ndim != 2:
        raise ValueError(f"tally: logits must be [T, E], got shape {tuple(logits.shape)}")
    if engine_ids.ndim != 2 or engine_ids.shape != chosen_ids.shape or engine_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"tally: engine_ids and chosen_ids must both be [T, K] with T = {logits.shape[0]}, "
                         f"got {tuple(engine_ids.shape)} and {tuple(chosen_ids.shape)}")
    if active.shape != (logits.shape[1],):
        raise ValueError(f"tally: active must be [E = {logits.shape[1]}], got {tuple(active.shape)}")
    if target.window is not None:
        if expert_gpu is None or expert_gpu.shape != (logits.shape[1],):
            raise ValueError("tally: expert_gpu must be int64 [E] when the window is written")
        if target.window.shape[1] != len(WINDOW_FIELDS) + 2 * num_gpus:
            raise ValueError(f"tally: the window has {target.window.shape[1]} columns, num_gpus = {num_gpus} "
                             f"needs {len(WINDOW_FIELDS) + 2 * num_gpus}")
    if cap_bound is not None and cap_bound.shape != ():
        raise ValueError(f"tally: cap_bound must be a 0-d tensor, got shape {tuple(cap_bound.shape)}")
    if target.sums.shape[1] < len(LAYER_SUMS):
        raise ValueError(f"tally: a sums row needs {len(LAYER_SUMS)} columns, got {target.sums.shape[1]}")
    kw = {"logits": logits, "engine_ids": engine_ids, "chosen_ids": chosen_ids, "active": active,
          "num_tokens": num_tokens, "expert_gpu": expert_gpu, "num_gpus": num_gpus, "scoring": scoring,
          "cap_bound": cap_bound}
    if not _use_kernel(backend, logits, num_gpus):
        tally_torch(target, **kw)
        return
    launch_kernel(target, **kw)


def kernel_args(target: Target, *, logits: Tensor, engine_ids: Tensor, chosen_ids: Tensor, active: Tensor,
                num_tokens: int | Tensor | None, expert_gpu: Tensor | None, num_gpus: int,
                scoring: str, cap_bound: Tensor | None = None) -> dict[str, Any]:
    """The kernel's keyword arguments for one call (``num_warps`` included). Host work only: no value
    read, no copy, no allocation; every tensor is passed as it is (strides, not ``contiguous()``)."""
    num_rows, num_experts = logits.shape
    if num_tokens is None:
        nt_mode, nt_ptr, nt_val = 0, None, 0
    elif isinstance(num_tokens, Tensor):
        nt_mode, nt_ptr, nt_val = 2, num_tokens.to(logits.device).reshape(()), 0
    else:
        nt_mode, nt_ptr, nt_val = 1, None, max(-1, min(int(num_tokens), num_rows))
    observe = target.window is not None and target.window_idx is not None
    block_e = _next_pow2(num_experts)
    block_g = _next_pow2(num_gpus if observe else 1)
    block_t = max(1, min(_next_pow2(max(num_rows, 1)), _TILE // block_e, _TILE // block_g))
    return {
        "logits_ptr": logits, "stride_lt": logits.stride(0), "stride_le": logits.stride(1),
        "old_ptr": engine_ids, "stride_ot": engine_ids.stride(0), "stride_ok": engine_ids.stride(1),
        "new_ptr": chosen_ids, "stride_nt": chosen_ids.stride(0), "stride_nk": chosen_ids.stride(1),
        "active_ptr": active.view(torch.int8) if active.dtype == torch.bool else active,
        "gpu_ptr": expert_gpu if observe else None, "nt_ptr": nt_ptr, "nt_val": nt_val,
        "bound_ptr": None if cap_bound is None else
        cap_bound.view(torch.int8) if cap_bound.dtype == torch.bool else cap_bound,
        "sums_ptr": target.sums, "sums_off": target.slot * target.sums.stride(0),
        "window_ptr": target.window if observe else None, "widx_ptr": target.window_idx if observe else None,
        "cap": target.window.shape[0] if observe else 0, "layer_val": float(target.layer_id), "T": num_rows,
        "E": num_experts, "BLOCK_E": block_e, "K": engine_ids.shape[1], "BLOCK_T": block_t,
        "NUM_GPUS": num_gpus if observe else 1, "BLOCK_G": block_g, "NT_MODE": nt_mode,
        "SIGMOID": scoring != "softmax", "OBSERVE": observe, "HAS_BOUND": cap_bound is not None,
        "num_warps": 4 if block_e <= 256 else 8,
    }


def launch_kernel(target: Target, **kw: Any) -> None:
    """One launch of the Triton kernel with :func:`kernel_args` (interpreted on CPU tensors)."""
    kernel = _kernel()
    if kernel is None:
        raise ValueError("tally: backend='triton' needs Triton (pip install triton)")
    if not kw["logits"].is_cuda:
        (kernel,) = interpreted(kernel)
    kernel[(1,)](**kernel_args(target, **kw))
