# ruff: noqa: ANN001  (Triton kernel parameters: their annotations are read by Triton; only constexprs carry one)
"""The Triton kernel of the routing hook's per-call bookkeeping (imported only when Triton is).

``_tally_kernel``: one program per applied MoE layer call. It reads the call's logits [T, E], SGLang's
own ids and the policy's ids [T, K], the selected experts [E] and (``OBSERVE``) each expert's GPU [E];
it adds the call's layer sums into one row of the int64 sums page and (``OBSERVE``) writes the call's
window row into the float32 ring at the ring's device index, then advances the index. Static shapes,
no host value (``num_tokens`` may be a device scalar), so a captured CUDA graph replays it and every
replay adds. The figures and their definitions are :func:`xshare.sglang.observe.tally.tally_torch`'s; this is
the same arithmetic in one launch.

Like the selector's kernels it is built from named ``@triton.jit`` helpers (with Triton's own reduce
combiners), which :func:`xshare._triton.interpreted` runs on CPU tensors too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from xshare._triton_ops import row_count

_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_ADD = tl.standard._sum_combine


@triton.jit
def _mass_and_top1(logits_ptr, stride_lt, stride_le, rows64, valid, offs_e, e_ok, cnt_old, cnt_new,
                   BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr):
    """For one block of rows: (the gate mass the policy's ids keep over SGLang's own, capped at 1 on valid rows,
    0 on padding; 1 where the row's policy ids include its top-1 expert), float32 [BLOCK_T] each."""
    m2 = valid[:, None] & e_ok[None, :]  # padding rows are read as zeros: their figures count for nothing
    x = tl.load(logits_ptr + rows64[:, None] * stride_lt + offs_e[None, :] * stride_le,
                mask=m2, other=0.0).to(tl.float32)
    x = tl.where(e_ok[None, :], x, float("-inf"))
    mx = tl.reduce(x, 1, _MAX)
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        ex = tl.exp(x - mx[:, None])
        p = ex / tl.reduce(ex, 1, _ADD)[:, None]
    p = tl.where(m2, p, 0.0)
    m_new = tl.reduce(p * cnt_new.to(tl.float32), 1, _ADD)
    m_old = tl.reduce(p * cnt_old.to(tl.float32), 1, _ADD)
    # torch.fmin(share, valid): capped at 1 on valid rows, 0 on padding; a NaN share gives the other
    share = m_new / tl.maximum(m_old, 1e-30)
    v = tl.where(valid, 1.0, 0.0)
    mass = tl.where(share != share, v, tl.where(share < v, share, v))
    best = tl.reduce(tl.where(m2 & (x == mx[:, None]), offs_e[None, :], BLOCK_E), 1, _MIN)  # first argmax
    on_best = tl.reduce(tl.where(offs_e[None, :] == best[:, None], cnt_new, 0), 1, _ADD)
    return mass, on_best.to(tl.float32)


@triton.jit
def _add_sums(sums_ptr, sums_off, bound_ptr, n_act, n_van, n_tok, changed, checksum, HAS_BOUND: tl.constexpr):
    """Adds the call to the layer's sums: calls, activated, vanilla_activated, tokens, changed_tokens, checksum,
    mass_cap_bound."""
    offs_s = tl.arange(0, 8)
    add = tl.where(offs_s == 0, 1, 0).to(tl.int64)
    add = tl.where(offs_s == 1, n_act, add)
    add = tl.where(offs_s == 2, n_van, add)
    add = tl.where(offs_s == 3, n_tok, add)
    add = tl.where(offs_s == 4, tl.reduce(changed, 0, _ADD), add)
    add = tl.where(offs_s == 5, tl.reduce(checksum, 0, _ADD), add)
    if HAS_BOUND:
        add = tl.where(offs_s == 6, (tl.load(bound_ptr) != 0).to(tl.int64), add)
    s_ok = offs_s < 7
    cur = tl.load(sums_ptr + sums_off + offs_s, mask=s_ok, other=0)
    tl.store(sums_ptr + sums_off + offs_s, cur + add, mask=s_ok)


@triton.jit
def _write_window(window_ptr, widx_ptr, cap, layer_val, gpu_ptr, act, vanilla, n_act, n_van, n_tok, mass, top1,
                  gpu_tokens, offs_e, e_ok, offs_g, NUM_GPUS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Writes the call's window row at the ring's device index and advances it. WINDOW_FIELDS: layer, active,
    vanilla_active, peak_gpu, vanilla_peak_gpu, peak_mean_ratio, mass_kept, top1_kept, tokens; then activated
    experts per GPU, then tokens per GPU."""
    # experts per GPU: histograms of the experts' GPUs (bin BLOCK_G collects the experts not counted)
    gpu = tl.load(gpu_ptr + offs_e, mask=e_ok, other=BLOCK_G).to(tl.int32)
    offs_h2 = tl.arange(0, 2 * BLOCK_G)
    h_ok = offs_h2 < NUM_GPUS
    gpu_act = tl.histogram(tl.where(act > 0, gpu, BLOCK_G), 2 * BLOCK_G).to(tl.float32)
    gpu_van = tl.histogram(tl.where(vanilla > 0, gpu, BLOCK_G), 2 * BLOCK_G).to(tl.float32)
    peak = tl.reduce(tl.where(h_ok, gpu_act, 0.0), 0, _MAX)
    vpeak = tl.reduce(tl.where(h_ok, gpu_van, 0.0), 0, _MAX)
    n_act_f = n_act.to(tl.float32)
    ratio = tl.where(n_act > 0, peak * NUM_GPUS / tl.maximum(n_act_f, 1.0), 1.0)
    n_tok_f = n_tok.to(tl.float32)
    denom = tl.maximum(n_tok_f, 1.0)
    offs_h = tl.arange(0, 16)
    head = tl.where(offs_h == 0, layer_val, 0.0)
    head = tl.where(offs_h == 1, n_act_f, head)
    head = tl.where(offs_h == 2, n_van.to(tl.float32), head)
    head = tl.where(offs_h == 3, peak, head)
    head = tl.where(offs_h == 4, vpeak, head)
    head = tl.where(offs_h == 5, ratio, head)
    head = tl.where(offs_h == 6, tl.reduce(mass, 0, _ADD) / denom, head)
    head = tl.where(offs_h == 7, tl.reduce(top1, 0, _ADD) / denom, head)
    head = tl.where(offs_h == 8, n_tok_f, head)
    idx = tl.load(widx_ptr)
    row = window_ptr + (idx % cap) * (9 + 2 * NUM_GPUS)
    tl.store(row + offs_h, head, mask=offs_h < 9)
    tl.store(row + 9 + offs_h2, gpu_act, mask=h_ok)
    tl.store(row + 9 + NUM_GPUS + offs_g, gpu_tokens, mask=offs_g < NUM_GPUS)
    tl.store(widx_ptr, idx + 1)


@triton.jit(do_not_specialize=["T", "nt_val", "sums_off", "cap", "layer_val"])
def _tally_kernel(
    logits_ptr, stride_lt, stride_le,
    old_ptr, stride_ot, stride_ok,
    new_ptr, stride_nt, stride_nk,
    active_ptr, gpu_ptr,
    nt_ptr, nt_val, bound_ptr,
    sums_ptr, sums_off,
    window_ptr, widx_ptr, cap, layer_val,
    T,
    E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
    NUM_GPUS: tl.constexpr, BLOCK_G: tl.constexpr, NT_MODE: tl.constexpr, SIGMOID: tl.constexpr,
    OBSERVE: tl.constexpr, HAS_BOUND: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    offs_g = tl.arange(0, BLOCK_G)
    n = row_count(T, nt_val, nt_ptr, NT_MODE)

    vanilla = tl.full([BLOCK_E], 0, tl.int32)  # experts SGLang's own routing activates (valid rows)
    tokens = tl.full([BLOCK_T], 0, tl.int64)  # per lane, summed over the row blocks
    changed = tl.full([BLOCK_T], 0, tl.int64)
    checksum = tl.full([BLOCK_T], 0, tl.int64)
    mass = tl.full([BLOCK_T], 0.0, tl.float32)
    top1 = tl.full([BLOCK_T], 0.0, tl.float32)
    gpu_tokens = tl.full([BLOCK_G], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        r_ok = rows < T
        valid = r_ok & (rows < n)
        rows64 = rows.to(tl.int64)
        cnt_old = tl.full([BLOCK_T, BLOCK_E], 0, tl.int32)
        cnt_new = tl.full([BLOCK_T, BLOCK_E], 0, tl.int32)
        hits = tl.full([BLOCK_T, BLOCK_G], 0, tl.int32)
        for j in range(K):
            old = tl.load(old_ptr + rows64 * stride_ot + j * stride_ok, mask=r_ok, other=-1).to(tl.int32)
            new = tl.load(new_ptr + rows64 * stride_nt + j * stride_nk, mask=r_ok, other=-1).to(tl.int32)
            cnt_old += (old[:, None] == offs_e[None, :]).to(tl.int32)
            cnt_new += (new[:, None] == offs_e[None, :]).to(tl.int32)
            checksum += tl.where(valid, (new.to(tl.int64) + 1) * (rows64 + 1) * (j + 1), 0)
            if OBSERVE:
                g = tl.load(gpu_ptr + new, mask=r_ok & (new >= 0) & (new < E), other=-1).to(tl.int32)
                hits = tl.maximum(hits, (g[:, None] == offs_g[None, :]).to(tl.int32))
        keep = valid[:, None] & e_ok[None, :]
        cnt_old = tl.where(keep, cnt_old, 0)
        cnt_new = tl.where(keep, cnt_new, 0)
        tokens += valid.to(tl.int64)
        changed += tl.reduce((cnt_old != cnt_new).to(tl.int64), 1, _MAX)
        vanilla = tl.maximum(vanilla, tl.reduce((cnt_old > 0).to(tl.int32), 0, _MAX))
        if OBSERVE:
            m_add, t_add = _mass_and_top1(logits_ptr, stride_lt, stride_le, rows64, valid, offs_e, e_ok, cnt_old,
                                          cnt_new, BLOCK_E, SIGMOID)
            mass += m_add
            top1 += t_add
            gpu_tokens += tl.reduce(tl.where(valid[:, None], hits, 0).to(tl.float32), 0, _ADD)

    act = tl.load(active_ptr + offs_e, mask=e_ok, other=0).to(tl.int32)
    act = tl.where(act != 0, 1, 0)
    n_act = tl.reduce(act.to(tl.int64), 0, _ADD)
    n_van = tl.reduce(vanilla.to(tl.int64), 0, _ADD)
    n_tok = tl.reduce(tokens, 0, _ADD)
    _add_sums(sums_ptr, sums_off, bound_ptr, n_act, n_van, n_tok, changed, checksum, HAS_BOUND)
    if OBSERVE:
        _write_window(window_ptr, widx_ptr, cap, layer_val, gpu_ptr, act, vanilla, n_act, n_van, n_tok, mass, top1,
                      gpu_tokens, offs_e, e_ok, offs_g, NUM_GPUS, BLOCK_G)
