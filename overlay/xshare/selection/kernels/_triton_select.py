# ruff: noqa: ANN001  (Triton kernel parameters: their annotations are read by Triton; only constexprs carry one)
"""Triton kernels of the fused ``xshare`` / ``xshare_ep`` selector (imported only when Triton is).

Two launches per MoE layer call, static shapes, every runtime knob loaded from a device pointer
(no host synchronisation, CUDA-graph capturable):

``_batch_set_kernel``  (one program) for each block of rows: gate scores (softmax or sigmoid, 0
    where unusable) written to a scratch [T, E] (-1 marks "unusable"), the batch column sums G and
    the warm-up union W over the valid rows; then the expert set S = W ∪ the best non-W experts by
    (G desc, index asc) up to max(m, |W|), with per-GPU caps for ``xshare_ep``; zeroes ``active``.
``_route_kernel``  (a grid over blocks of rows) each token's top_k by (tier desc, score desc,
    index asc) with tiers 2 = usable ∩ S (valid rows of an applied batch), 1 = usable, 0 = unusable;
    weights renormalised w / (sum + 1e-20); marks the routed experts of valid rows in ``active``.

Orders are exact: every ranking uses an int64 key ``(tier, float bits of the score, E-1-index)``,
unique per row, so a single max-reduction finds the next expert and ties go to the lower index.
For a non-negative float the IEEE bit pattern orders like the value. The budgeted top-m (and the
per-GPU top-spare) is a radix select on these keys: D bits per step, the k-th largest key is found
in ceil(KEY_BITS / D) counting passes, without a sort and without a loop over experts.

The kernels use only Triton builtins (no ``tl.zeros``/``tl.sort``/helper ``@jit`` functions), so
:func:`xshare._triton.interpreted` can run them with Triton's interpreter on CPU tensors in any process.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Reductions go through tl.reduce with Triton's own combine functions (what tl.max / tl.sum use):
# the interpreter maps exactly these to numpy, so the kernels also run interpreted in a process that
# imported Triton in compiled mode (where tl.max / tl.sum themselves are not callable by it).
_MAX = tl.standard._elementwise_max
_ADD = tl.standard._sum_combine


# Runtime integers the kernels convert with .to(): never specialised into constexprs (Triton would turn
# a 1 into a constant; T = 1 is common in decode). Each kernel lists only its own parameters.
@triton.jit(do_not_specialize=["T", "nt_val", "budget_val", "warmup_val", "cap_val"])
def _batch_set_kernel(
    logits_ptr, stride_t, stride_e,
    scores_ptr, set_ptr, active_ptr, group_ptr,
    nt_ptr, nt_val, budget_ptr, budget_val, warmup_ptr, warmup_val, cap_ptr, cap_val,
    T,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, IDX_BITS: tl.constexpr,
    KEY_BITS: tl.constexpr, D_FILL: tl.constexpr, D_CAP: tl.constexpr,
    NT_MODE: tl.constexpr, KNOBS: tl.constexpr, SIGMOID: tl.constexpr, CAPPED: tl.constexpr,
    NUM_GPUS: tl.constexpr, BLOCK_G: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    low = (E - 1 - offs_e).to(tl.int64)  # index part of every key: lower index = larger key
    if NT_MODE == 0:
        n = T.to(tl.int64)
    elif NT_MODE == 1:
        n = nt_val.to(tl.int64)
    else:
        n = tl.load(nt_ptr).to(tl.int64)
    if KNOBS:
        k0 = tl.load(warmup_ptr).to(tl.int32)
        budget = tl.load(budget_ptr).to(tl.int64)
        cap = tl.load(cap_ptr).to(tl.int64)
    else:
        k0 = warmup_val.to(tl.int32)
        budget = budget_val.to(tl.int64)
        cap = cap_val.to(tl.int64)

    colsum = tl.full([BLOCK_E], 0.0, tl.float32)
    warm = tl.full([BLOCK_E], 0, tl.int32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        r_ok = rows < T
        m2 = r_ok[:, None] & e_ok[None, :]
        x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + offs_e[None, :] * stride_e,
                    mask=m2, other=float("-inf")).to(tl.float32)
        usable = m2 & (x == x) & (tl.abs(x) != float("inf"))
        xu = tl.where(usable, x, float("-inf"))
        if SIGMOID:
            z = tl.exp(-tl.abs(xu))  # in (0, 1]; 0 where unusable
            p = tl.where(xu >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
        else:
            mx = tl.reduce(xu, 1, _MAX)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            ex = tl.where(usable, tl.exp(xu - mx[:, None]), 0.0)
            den = tl.reduce(ex, 1, _ADD)
            p = ex / tl.where(den > 0, den, 1.0)[:, None]
        p = tl.where(usable, p, 0.0)
        tl.store(scores_ptr + rows[:, None].to(tl.int64) * E + offs_e[None, :], tl.where(usable, p, -1.0), mask=m2)
        valid = r_ok & (rows < n)
        colsum += tl.reduce(tl.where(valid[:, None], p, 0.0), 0, _ADD)
        # warm-up: each valid token's k0 best usable experts (score desc, index asc)
        key = tl.where(usable, (p.to(tl.int32, bitcast=True).to(tl.int64) << IDX_BITS) | low[None, :], -1)
        hit_any = tl.full([BLOCK_T, BLOCK_E], 0, tl.int32)
        for _ in range(0, k0):
            best = tl.reduce(key, 1, _MAX)
            hit = (key == best[:, None]) & (best[:, None] >= 0)
            hit_any = tl.where(hit, 1, hit_any)
            key = tl.where(hit, -1, key)
        warm = tl.maximum(warm, tl.reduce(tl.where(valid[:, None], hit_any, 0), 0, _MAX))

    forced = (warm > 0) & e_ok
    cand = e_ok & (warm == 0)
    gkey = tl.where(e_ok, (colsum.to(tl.int32, bitcast=True).to(tl.int64) << IDX_BITS) | low, -1)
    fill = tl.maximum(budget - tl.reduce(forced.to(tl.int64), 0, _ADD), 0)

    if CAPPED:
        # xshare_ep: per GPU g at most max(c, |W ∩ g|) experts. A candidate is admissible iff it is
        # among its GPU's best `spare` candidates (truncated partition matroid: greedy is exact).
        grp = tl.load(group_ptr + offs_e, mask=e_ok, other=-1).to(tl.int32)
        offs_g = tl.arange(0, BLOCK_G)
        onehot = (grp[None, :] == offs_g[:, None]) & e_ok[None, :]  # [G, E]
        forced_g = tl.reduce((onehot & forced[None, :]).to(tl.int64), 1, _ADD)  # [G]
        cap = tl.where(cap > 0, cap, (budget + NUM_GPUS - 1) // NUM_GPUS)
        spare = tl.maximum(cap, forced_g) - forced_g  # [G]
        member_g = onehot & cand[None, :]
        digits_c = tl.arange(0, 1 << D_CAP).to(tl.int64)
        prefix_g = tl.full([BLOCK_G], 0, tl.int64)
        for it in range(KEY_BITS // D_CAP):
            shift = KEY_BITS - (it + 1) * D_CAP
            trial = prefix_g[:, None] | (digits_c[None, :] << shift)  # [G, 2^D]
            ok = member_g[:, None, :] & (gkey[None, None, :] >= trial[:, :, None])
            cnt = tl.reduce(ok.to(tl.int64), 2, _ADD)  # [G, 2^D]
            pick = tl.reduce(tl.where(cnt >= spare[:, None], digits_c[None, :], 0), 1, _MAX)
            prefix_g = prefix_g | (pick << shift)
        thr_e = tl.reduce(tl.where(onehot, prefix_g[:, None], -1), 0, _MAX)  # [E]: threshold of e's GPU
        allowed = cand & (gkey >= thr_e)
    else:
        allowed = cand

    # the fill: the `fill` best allowed experts (k-th largest key by radix select)
    digits = tl.arange(0, 1 << D_FILL).to(tl.int64)
    prefix = tl.full([1], 0, tl.int64)
    for it in range(KEY_BITS // D_FILL):
        shift = KEY_BITS - (it + 1) * D_FILL
        trial = prefix[:, None] | (digits[None, :] << shift)  # [1, 2^D]
        ok = allowed[None, None, :] & (gkey[None, None, :] >= trial[:, :, None])
        cnt = tl.reduce(ok.to(tl.int64), 2, _ADD)  # [1, 2^D]
        pick = tl.reduce(tl.where(cnt >= fill, digits[None, :], 0), 1, _MAX)
        prefix = prefix | (pick << shift)
    chosen = forced | (allowed & (gkey >= tl.reduce(prefix, 0, _MAX)))
    tl.store(set_ptr + offs_e, chosen.to(tl.int8), mask=e_ok)
    tl.store(active_ptr + offs_e, tl.full([BLOCK_E], 0, tl.int8), mask=e_ok)


@triton.jit(do_not_specialize=["T", "nt_val", "enabled_val", "min_val", "max_val"])
def _route_kernel(
    scores_ptr, set_ptr, ids_ptr, weights_ptr, active_ptr,
    nt_ptr, nt_val, enabled_ptr, enabled_val, min_ptr, min_val, max_ptr, max_val,
    T,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, IDX_BITS: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NT_MODE: tl.constexpr, KNOBS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    low = (E - 1 - offs_e).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    m2 = r_ok[:, None] & e_ok[None, :]
    if NT_MODE == 0:
        n = T.to(tl.int64)
    elif NT_MODE == 1:
        n = nt_val.to(tl.int64)
    else:
        n = tl.load(nt_ptr).to(tl.int64)
    valid = r_ok & (rows < n)
    n_valid = tl.minimum(tl.maximum(n, 0), T)
    if KNOBS:
        enabled = tl.load(enabled_ptr) != 0
        lo = tl.load(min_ptr).to(tl.int64)
        hi = tl.load(max_ptr).to(tl.int64)
    else:
        enabled = enabled_val != 0
        lo = min_val.to(tl.int64)
        hi = max_val.to(tl.int64)
    apply = enabled & (n_valid >= lo) & (n_valid <= hi)

    s = tl.load(scores_ptr + rows[:, None].to(tl.int64) * E + offs_e[None, :], mask=m2, other=-1.0)
    usable = s >= 0
    p = tl.maximum(s, 0.0)
    in_set = tl.load(set_ptr + offs_e, mask=e_ok, other=0) != 0
    boosted = usable & in_set[None, :] & (valid & apply)[:, None]
    tier = usable.to(tl.int64) + boosted.to(tl.int64)
    key = (tier << (31 + IDX_BITS)) | (p.to(tl.int32, bitcast=True).to(tl.int64) << IDX_BITS) | low[None, :]
    key = tl.where(m2, key, -1)

    cols = tl.arange(0, BLOCK_K)
    out_ids = tl.full([BLOCK_T, BLOCK_K], 0, tl.int32)
    out_w = tl.full([BLOCK_T, BLOCK_K], 0.0, tl.float32)
    total = tl.full([BLOCK_T], 0.0, tl.float32)
    for i in range(TOP_K):
        best = tl.reduce(key, 1, _MAX)
        idx = (E - 1 - (best & ((1 << IDX_BITS) - 1))).to(tl.int32)
        w = ((best >> IDX_BITS) & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        key = tl.where(key == best[:, None], -1, key)
        out_ids = tl.where(cols[None, :] == i, idx[:, None], out_ids)
        out_w = tl.where(cols[None, :] == i, w[:, None], out_w)
        total += w
        tl.store(active_ptr + idx, tl.full([BLOCK_T], 1, tl.int8), mask=valid)
    if RENORMALIZE:
        out_w = out_w / (total + 1e-20)[:, None]
    out_off = rows[:, None].to(tl.int64) * TOP_K + cols[None, :]
    out_mask = r_ok[:, None] & (cols[None, :] < TOP_K)
    tl.store(ids_ptr + out_off, out_ids, mask=out_mask)
    tl.store(weights_ptr + out_off, out_w, mask=out_mask)
