# ruff: noqa: ANN001  (Triton kernel parameters: their annotations are read by Triton; only constexprs carry one)
# Rounding to bfloat16 is written out on the bits (round to nearest even): Triton's interpreter truncates
# in ``.to(tl.bfloat16)``, and the kernels must round the same way compiled and interpreted.
"""Triton kernels of the served selector: every router family, the batch's expert set and each token's
routing inside it in two launches per MoE layer call (imported only when Triton is).

``_gate_kernel``   a grid over blocks of rows. Each program computes its rows' gate as the router
    family defines it (softmax / sigmoid / sqrtsoftplus scores, correction bias, expert groups kept
    per token, Llama-4's raw-logit choice; dtype rounding as the engine holds the tensors), each
    row's preference key, its warm-up (top-k0 by choice score, ties by the engine's own picks, then
    index; exact rows add their whole top_k), and adds its valid rows' affinities to the batch's
    column sums. The sums are fixed point (``floor(affinity * 2**30)`` as int64): integer
    additions in any order give the same bits, so every device, grid and TP rank ranks experts
    alike, and the torch reference (``Batch.column_sums``) computes the same numbers.
``_route_kernel``  a grid over blocks of rows. Each program derives the expert set S from the
    column sums and the warm-up union (redundantly, deterministically: no third launch, no grid
    barrier): S = W ∪ the best candidates by column sum up to the budget, per-GPU caps by rank
    within each GPU (``xshare_ep``), the mass target by the mass of the better candidates; ranks
    by pairwise comparison of unique int64 keys (no sort, no serial greedy). Then each row is
    routed: ``MODE`` 0 (plain layers, the ``select`` contract) takes its top_k by (tier, key) with
    tier 2 = inside S; ``MODE`` 1 (router specs, the ``decide_router`` contract) routes a row
    whose allowed experts are restricted by S to its top_k candidates by choice score (index
    ascending on ties), keeps the engine's ids on every other row, and counts the short rows.

Every runtime setting is loaded from a device pointer (no host sync, CUDA-graph capturable); shapes
are static. Keys: ``[usable:1][choice:32][engine pick:PB][E-1-index:IB]`` with the float's bits mapped
to an order-preserving unsigned integer, so one max-reduction finds the next expert and ties resolve
identically everywhere. Each kernel is a sequence of named ``@triton.jit`` helpers (inlined when compiled;
Triton's own reduce combiners only), which :func:`xshare._triton.interpreted` runs on CPU tensors too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from xshare._triton_ops import ordered, pop_best, round_as, routed_weights, row_count
from xshare.selection.backends.triton._triton_requests import _request_leaders, _request_sets, _request_sums

_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_ADD = tl.standard._sum_combine


# -- the gate kernel's pieces ------------------------------------------------------------------------------------
@triton.jit
def _scores(x, fin, SCORING: tl.constexpr, SP_ROUND: tl.constexpr):
    """float32 [BT, BLOCK_E] scores of logits ``x``: 0 = softmax over the finite logits, 1 = sigmoid,
    2 = sqrt(softplus) (softplus rounded by ``SP_ROUND`` first, as an eager gate in that dtype does)."""
    if SCORING == 0:
        xs = tl.where(fin, x, float("-inf"))
        mx = tl.reduce(xs, 1, _MAX)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        ex = tl.where(fin, tl.exp(xs - mx[:, None]), 0.0)
        den = tl.reduce(ex, 1, _ADD)
        p = ex / tl.where(den > 0, den, 1.0)[:, None]
    elif SCORING == 1:
        z = tl.exp(-tl.abs(x))
        p = tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    else:  # sqrt(softplus(x)), softplus = x above 20 (torch's threshold), else log1p(exp(x)) done accurately
        y = tl.exp(tl.minimum(x, 20.0))
        u = 1.0 + y
        lp = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
        sp = tl.where(x > 20.0, x, lp)
        p = tl.sqrt(round_as(sp, SP_ROUND))
    return p


@triton.jit
def _affinity_and_choice(x, p, fin, bias_ptr, offs_e, e_ok, MODE: tl.constexpr, GATE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, AFF_ROUND: tl.constexpr, CHOICE_ROUND: tl.constexpr):
    """(affinity, choice score), float32 [BT, BLOCK_E]: the weight a routed expert gets and the score experts are
    chosen by (plain layers: both the score; router specs: the score in the logits' dtype, and Llama-4's raw
    logit or the score plus the correction bias, rounded as the family's gate rounds it)."""
    if MODE == 0:
        p = tl.where(fin, p, 0.0)
        aff = p
        choice = p
    else:
        aff = round_as(p, AFF_ROUND)
        if GATE == 3:  # llama4: ranks on the raw logits
            choice = x
        elif HAS_BIAS:
            b = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
            if GATE == 2:
                c = p + b[None, :]  # float32 sigmoid + bias
            else:
                c = aff + b[None, :]  # the score in the logits' dtype + bias
            choice = round_as(c, CHOICE_ROUND)
        else:
            choice = aff
    return aff, choice


@triton.jit
def _kept_groups(choice, m2, offs_e, BT: tl.constexpr, BLOCK_E: tl.constexpr, GATE: tl.constexpr,
                 CHOICE_ROUND: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr):
    """int32 [BT, BLOCK_E]: 1 where the expert's group is one of the token's ``TOPK_GROUP`` best groups (by the
    best choice score in the group, or the sum of its two best; lower group index on ties)."""
    gid = offs_e // GROUP_SIZE
    offs_g = tl.arange(0, BLOCK_G)
    gscore = tl.full([BT, BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        cg = tl.where((gid == g)[None, :] & m2, choice, float("-inf"))
        m1 = tl.reduce(cg, 1, _MAX)
        if GATE == 1:
            s = m1
        else:  # the sum of the group's two best choice scores (float32), in the choice dtype
            first = tl.reduce(tl.where(cg == m1[:, None], offs_e[None, :], BLOCK_E), 1, _MIN)
            m2nd = tl.reduce(tl.where(offs_e[None, :] == first[:, None], float("-inf"), cg), 1, _MAX)
            s = round_as(m1 + m2nd, CHOICE_ROUND)
        gscore = tl.where(offs_g[None, :] == g, s[:, None], gscore)
    gscore = gscore + 0.0
    gkey = tl.where(offs_g[None, :] < NUM_GROUPS, (ordered(gscore) << 8) | (255 - offs_g[None, :]), -1)
    keep = tl.full([BT, BLOCK_G], 0, tl.int32)
    for _ in tl.static_range(TOPK_GROUP):  # the kept groups: best group scores, lower index on ties
        best = tl.reduce(gkey, 1, _MAX)
        hit = gkey == best[:, None]
        keep = tl.where(hit, 1, keep)
        gkey = tl.where(hit, -1, gkey)
    kept_e = tl.full([BT, BLOCK_E], 0, tl.int32)
    for g in tl.static_range(NUM_GROUPS):
        kg = tl.reduce(tl.where(offs_g[None, :] == g, keep, 0), 1, _MAX)
        kept_e = tl.where((gid == g)[None, :], kg[:, None], kept_e)
    return kept_e


@triton.jit
def _preference_keys(eids_ptr, stride_it, stride_ie, rows, r_ok, offs_e, usable, cord, m2, E: tl.constexpr,
                     BT: tl.constexpr, BLOCK_E: tl.constexpr, PREF_W: tl.constexpr, IB: tl.constexpr,
                     PB: tl.constexpr):
    """int64 [BT, BLOCK_E] keys ``[usable:1][choice:32][engine pick:PB][E-1-index:IB]`` (-1 off the block)."""
    pref = tl.full([BT, BLOCK_E], 0, tl.int64)
    for j in tl.static_range(PREF_W):
        idj = tl.load(eids_ptr + rows.to(tl.int64) * stride_it + j * stride_ie, mask=r_ok, other=-1).to(tl.int32)
        pref = tl.where(offs_e[None, :] == idj[:, None], PREF_W - j, pref)
    low = (E - 1 - offs_e).to(tl.int64)
    key = (pref << IB) | low[None, :]
    key = tl.where(usable, key | (cord << (PB + IB)) | (tl.full([BT, BLOCK_E], 1, tl.int64) << (32 + PB + IB)), key)
    return tl.where(m2, key, -1)


@triton.jit
def _warm_up(key, usable, ex_row, k_row, BT: tl.constexpr, BLOCK_E: tl.constexpr, TOP_K: tl.constexpr):
    """(warm-up, top-k0 alone), int32 [BT, BLOCK_E]: each row's top-``k_row`` experts by key (``k_row`` int32
    [BT]: k0, or a request's first row's anchor; an exact row: its whole top_k), and those alone (a request's
    warm-up)."""
    kk = key
    warm = tl.full([BT, BLOCK_E], 0, tl.int32)
    warm0 = tl.full([BT, BLOCK_E], 0, tl.int32)
    for i in tl.static_range(TOP_K):
        best = tl.reduce(kk, 1, _MAX)
        hit = (kk == best[:, None]) & (best[:, None] >= 0)
        first = (k_row > i)[:, None]
        warm = tl.where(hit & (ex_row[:, None] | first) & usable, 1, warm)
        warm0 = tl.where(hit & first & usable, 1, warm0)
        kk = tl.where(hit, -1, kk)
    return warm, warm0


@triton.jit(do_not_specialize=["T", "nt_val"])
def _gate_kernel(
    logits_ptr, stride_lt, stride_le, bias_ptr, eids_ptr, stride_it, stride_ie, exact_ptr,
    nt_ptr, nt_val, warmup_ptr, anchor_ptr,
    aff_ptr, key_ptr, acc_ptr, warm_ptr, groups_ptr, leader_ptr, lead_ptr, racc_ptr, rwarm_ptr,
    T,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr, TOP_K: tl.constexpr, PREF_W: tl.constexpr,
    IB: tl.constexpr, PB: tl.constexpr, MODE: tl.constexpr, SCORING: tl.constexpr, GATE: tl.constexpr,
    HAS_BIAS: tl.constexpr, AFF_ROUND: tl.constexpr, CHOICE_ROUND: tl.constexpr,
    NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    NT_MODE: tl.constexpr, HAS_EXACT: tl.constexpr, SP_ROUND: tl.constexpr, SPEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    rows = pid * BT + tl.arange(0, BT)
    r_ok = rows < T
    m2 = r_ok[:, None] & e_ok[None, :]
    n = row_count(T, nt_val, nt_ptr, NT_MODE)
    valid = r_ok & (rows.to(tl.int64) < n)
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + offs_e[None, :] * stride_le,
                mask=m2, other=float("-inf")).to(tl.float32)
    fin = m2 & (x == x) & (tl.abs(x) != float("inf"))

    # ---- scores (float32), as the family's gate computes them; the affinity and the choice score
    p = _scores(x, fin, SCORING, SP_ROUND)
    aff, choice = _affinity_and_choice(x, p, fin, bias_ptr, offs_e, e_ok, MODE, GATE, HAS_BIAS, AFF_ROUND,
                                       CHOICE_ROUND)
    choice = choice + 0.0  # -0.0 -> +0.0: equal values get equal keys
    cord = ordered(choice)  # order-preserving, unsigned

    # ---- usable experts: finite choice, and (grouped gates) inside the token's kept groups
    if MODE == 0:
        usable = fin
    else:
        usable = m2 & (choice == choice) & (tl.abs(choice) != float("inf"))
        if NUM_GROUPS > 1 and TOPK_GROUP < NUM_GROUPS:
            kept_e = _kept_groups(choice, m2, offs_e, BT, BLOCK_E, GATE, CHOICE_ROUND, NUM_GROUPS, TOPK_GROUP,
                                  GROUP_SIZE, BLOCK_G)
            usable = usable & (kept_e > 0)

    # ---- preference key: usable, choice, the engine's own pick order, lower index
    key = _preference_keys(eids_ptr, stride_it, stride_ie, rows, r_ok, offs_e, usable, cord, m2, E, BT, BLOCK_E,
                           PREF_W, IB, PB)
    off2 = rows[:, None].to(tl.int64) * E + offs_e[None, :]
    tl.store(key_ptr + off2, key, mask=m2)
    tl.store(aff_ptr + off2, tl.where(usable, aff, 0.0), mask=m2)

    # ---- warm-up union (valid rows' top-k0; exact rows' whole top_k; xshare_spec: the first row of a
    # multi-row request its top anchor_k) and the column sums
    k_row = rows * 0 + tl.load(warmup_ptr).to(tl.int32)
    if SPEC:
        leader, size = _request_leaders(groups_ptr, rows, r_ok, n, T, BT, BLOCK_T)
        k_row = tl.where(valid & (leader == rows) & (size > 1), tl.load(anchor_ptr).to(tl.int32), k_row)
    if HAS_EXACT:
        ex_row = (tl.load(exact_ptr + rows, mask=r_ok, other=0) != 0) & r_ok
    else:
        ex_row = rows < 0
    warm, warm0 = _warm_up(key, usable, ex_row, k_row, BT, BLOCK_E, TOP_K)
    warm_col = tl.reduce(tl.where(valid[:, None], warm, 0), 0, _MAX).to(tl.int64)
    tl.atomic_max(warm_ptr + offs_e, warm_col, mask=e_ok)
    q = (tl.where(usable & valid[:, None], aff, 0.0) * 1073741824.0).to(tl.int64)
    tl.atomic_add(acc_ptr + offs_e, tl.reduce(q, 0, _ADD), mask=e_ok)
    if SPEC:  # per request (its first valid row leads it): its sums and its warm-up union
        _request_sums(leader, leader_ptr, lead_ptr, racc_ptr, rwarm_ptr, rows, r_ok, valid, q, warm0, offs_e, e_ok,
                      T, E)


# -- the route kernel's pieces ----------------------------------------------------------------------------------
@triton.jit
def _expert_set(acc_ptr, warm_ptr, gpu_ptr, budget_ptr, tau_ptr, cap_ptr, q, forced, cand, offs_e, e_ok, low,
                E: tl.constexpr, BLOCK_E: tl.constexpr, IB: tl.constexpr, CH: tl.constexpr, CAPPED: tl.constexpr,
                NUM_GPUS: tl.constexpr, BLOCK_G: tl.constexpr, SPEC: tl.constexpr):
    """(S [BLOCK_E], the budget stopped S short of the mass target): the forced experts, then the candidates in
    order of their column sums up to the budget, within per-GPU caps (``CAPPED``) and while the better ones'
    mass is short of the target; an expert's rank is the number of admitted candidates that beat it."""
    skey = tl.where(e_ok, (q << IB) | low, -1)
    budget = tl.load(budget_ptr).to(tl.int64)
    fill = tl.maximum(budget - tl.reduce(forced.to(tl.int64), 0, _ADD), 0)
    tau = tl.load(tau_ptr).to(tl.float64)
    whole = tl.reduce(q, 0, _ADD)
    have = tl.reduce(tl.where(forced, q, 0), 0, _ADD)
    one_minus_rtol = 1.0 - tl.full([], 1e-6, tl.float64)
    goal = tau * (whole.to(tl.float64) / 1073741824.0) * one_minus_rtol
    if CAPPED:
        grp = tl.load(gpu_ptr + offs_e, mask=e_ok, other=-1).to(tl.int32)
        offs_g = tl.arange(0, BLOCK_G)
        onehot = (grp[None, :] == offs_g[:, None]) & e_ok[None, :]  # [G, E]
        forced_g = tl.reduce((onehot & forced[None, :]).to(tl.int64), 1, _ADD)
        cap = tl.load(cap_ptr).to(tl.int64)
        cap = tl.where(cap > 0, cap, (budget + NUM_GPUS - 1) // NUM_GPUS)
        spare_g = tl.maximum(cap, forced_g) - forced_g
        spare_e = tl.reduce(tl.where(onehot, spare_g[:, None], 0), 0, _ADD)
        within_e = tl.full([BLOCK_E], 0, tl.int64)
    pos_e = tl.full([BLOCK_E], 0, tl.int64)
    before_e = tl.full([BLOCK_E], 0, tl.int64)
    for f0 in range(0, BLOCK_E, CH):  # a runtime loop: unrolled, large E takes long to compile
        offs_f = f0 + tl.arange(0, CH)
        f_ok = offs_f < E
        q_f = tl.load(acc_ptr + offs_f, mask=f_ok, other=0)
        if SPEC:  # the chunk's candidacy, from the registers (a [CH, E] selection)
            cand_f = tl.reduce(((offs_f[:, None] == offs_e[None, :]) & cand[None, :]).to(tl.int32), 1, _MAX) > 0
        else:
            cand_f = f_ok & (tl.load(warm_ptr + offs_f, mask=f_ok, other=1) == 0)
        skey_f = tl.where(f_ok, (q_f << IB) | (E - 1 - offs_f).to(tl.int64), -1)
        beats = skey_f[:, None] > skey[None, :]  # [CH, E]: f ranks before e
        if CAPPED:
            grp_f = tl.load(gpu_ptr + offs_f, mask=f_ok, other=-1).to(tl.int32)
            same = grp_f[:, None] == grp[None, :]
            within_e += tl.reduce((cand_f[:, None] & same & beats).to(tl.int64), 0, _ADD)
            within_f = tl.reduce((cand[None, :] & same & (skey[None, :] > skey_f[:, None])).to(tl.int64), 1, _ADD)
            spare_f = tl.reduce(tl.where(grp_f[:, None] == offs_g[None, :], spare_g[None, :], 0), 1, _ADD)
            adm_f = cand_f & (within_f < spare_f)
        else:
            adm_f = cand_f
        ahead = adm_f[:, None] & beats
        pos_e += tl.reduce(ahead.to(tl.int64), 0, _ADD)
        before_e += tl.reduce(tl.where(ahead, q_f[:, None], 0), 0, _ADD)
    if CAPPED:
        adm_e = cand & (within_e < spare_e)
    else:
        adm_e = cand
    no_target = (tl.full([BLOCK_E], 0.0, tl.float64) + tau) <= 0  # (scalars broadcast before a logical op)
    mass_ok = no_target | ((have + before_e).to(tl.float64) / 1073741824.0 < goal)
    in_set = forced | (adm_e & (pos_e < fill) & mass_ok)
    # the budget stopped the set short of a mass target: more candidates needed than it left room for
    need = tl.reduce((adm_e & mass_ok).to(tl.int64), 0, _ADD)
    bound = (tau > 0) & (need > fill)
    return in_set, bound


@triton.jit
def _route_in_set(key, aff, inside, own, m2, cols, E: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
                  TOP_K: tl.constexpr, IB: tl.constexpr, PB: tl.constexpr, SPEC: tl.constexpr):
    """``MODE`` 0 (plain layers): each row's top_k by (tier, key), tier 2 = inside S (and, ``SPEC``, inside its
    request's set too). Returns (ids int32 [BT, BLOCK_K], weights float32 [BT, BLOCK_K])."""
    out_ids = tl.full([BT, BLOCK_K], 0, tl.int32)
    out_w = tl.full([BT, BLOCK_K], 0.0, tl.float32)
    tier = inside.to(tl.int64)
    if SPEC:  # inside its request's set too: preferred first
        tier = tier + (inside & (own > 0)).to(tl.int64)
    kk = tl.where(m2, key | (tier << (33 + PB + IB)), -1)
    for i in tl.static_range(TOP_K):
        kk, idx, w = pop_best(kk, aff, E, IB)
        out_ids = tl.where(cols[None, :] == i, idx[:, None], out_ids)
        out_w = tl.where(cols[None, :] == i, w[:, None], out_w)
    return out_ids, out_w


@triton.jit
def _route_restricted(key, aff, inside, usable, app, m2, cols, low, offs_e, eids_ptr, stride_it, stride_ie, rows,
                      r_ok, E: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr, TOP_K: tl.constexpr,
                      IB: tl.constexpr, PB: tl.constexpr):
    """``MODE`` 1 (router specs): a row whose usable experts S restricts is routed to its top_k candidates inside
    S by choice score (index ascending on ties); every other row keeps the engine's ids. Returns (ids int32
    [BT, BLOCK_K], weights float32 [BT, BLOCK_K], rows rerouted [BT], rows left short of top_k or empty [BT])."""
    out_ids = tl.full([BT, BLOCK_K], 0, tl.int32)
    out_w = tl.full([BT, BLOCK_K], 0.0, tl.float32)
    ncand = tl.reduce(inside.to(tl.int32), 1, _ADD)
    cut = app & (ncand < tl.reduce(usable.to(tl.int32), 1, _ADD))  # S drops an expert the row can use
    empty = cut & (ncand == 0)
    restricted = cut & (ncand > 0)
    short = restricted & (ncand < TOP_K)
    repl = restricted & (ncand >= TOP_K)
    cord = (key >> (PB + IB)) & 0xFFFFFFFF
    kk = tl.where(inside & m2, (cord << IB) | low[None, :], -1)
    for i in tl.static_range(TOP_K):
        kk, new_id, new_w = pop_best(kk, aff, E, IB)
        eng = tl.load(eids_ptr + rows.to(tl.int64) * stride_it + i * stride_ie, mask=r_ok, other=-1).to(tl.int32)
        eng_w = tl.reduce(tl.where(offs_e[None, :] == eng[:, None], aff, 0.0), 1, _ADD)
        idx = tl.where(repl, new_id, eng)
        w = tl.where(repl, new_w, eng_w)
        out_ids = tl.where(cols[None, :] == i, idx[:, None], out_ids)
        out_w = tl.where(cols[None, :] == i, w[:, None], out_w)
    return out_ids, out_w, repl, short | empty


@triton.jit(do_not_specialize=["T", "nt_val", "rsf"])
def _route_kernel(
    aff_ptr, key_ptr, acc_ptr, warm_ptr, gpu_ptr, eids_ptr, stride_it, stride_ie, exact_ptr,
    nt_ptr, nt_val, enabled_ptr, budget_ptr, tau_ptr, cap_ptr, min_ptr, max_ptr, rsf,
    ids_ptr, w_ptr, repl_ptr, set_ptr, active_ptr, short_ptr, bound_ptr,
    leader_ptr, lead_ptr, racc_ptr, rwarm_ptr, gbud_ptr,
    T,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
    IB: tl.constexpr, PB: tl.constexpr, CH: tl.constexpr, MODE: tl.constexpr, VANILLA: tl.constexpr,
    CAPPED: tl.constexpr, NUM_GPUS: tl.constexpr, BLOCK_G: tl.constexpr, RENORM: tl.constexpr,
    SCALE: tl.constexpr, SCALE_ROUND: tl.constexpr, NT_MODE: tl.constexpr, HAS_EXACT: tl.constexpr,
    SPEC: tl.constexpr,
):
    # ---- the batch's set S (every program computes the same one; program 0 stores it)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    low = (E - 1 - offs_e).to(tl.int64)
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    r_ok = rows < T
    q = tl.load(acc_ptr + offs_e, mask=e_ok, other=0)
    if SPEC:  # the batch set is chosen inside the union of the requests' sets, W = the union of their warm-ups
        union, forced, own = _request_sets(leader_ptr, lead_ptr, racc_ptr, rwarm_ptr, gbud_ptr, rows, r_ok,
                                           offs_e, e_ok, low, T, E, BT, BLOCK_E, IB)
        cand = union & ~forced
    else:
        forced = (tl.load(warm_ptr + offs_e, mask=e_ok, other=0) > 0) & e_ok
        cand = e_ok & ~forced
        own = tl.full([BT, BLOCK_E], 0, tl.int32)  # (read only by xshare_spec)
    in_set, bound = _expert_set(acc_ptr, warm_ptr, gpu_ptr, budget_ptr, tau_ptr, cap_ptr, q, forced, cand, offs_e,
                                e_ok, low, E, BLOCK_E, IB, CH, CAPPED, NUM_GPUS, BLOCK_G, SPEC)

    # ---- each row's routing
    m2 = r_ok[:, None] & e_ok[None, :]
    n = row_count(T, nt_val, nt_ptr, NT_MODE)
    valid = r_ok & (rows.to(tl.int64) < n)
    n_valid = tl.minimum(tl.maximum(n, 0), T)
    enabled = tl.load(enabled_ptr).to(tl.int32) != 0
    apply = enabled & (n_valid >= tl.load(min_ptr).to(tl.int64)) & (n_valid <= tl.load(max_ptr).to(tl.int64))
    if pid == 0:
        tl.store(set_ptr + offs_e, in_set.to(tl.int8), mask=e_ok)
        tl.store(bound_ptr, (bound & apply).to(tl.int8))
    app = valid & ((rows * 0 + apply.to(tl.int32)) != 0)
    if HAS_EXACT:
        app = app & (tl.load(exact_ptr + rows, mask=r_ok, other=0) == 0)
    if VANILLA:  # the engine's own routing: no row is restricted
        app = rows < 0
    off2 = rows[:, None].to(tl.int64) * E + offs_e[None, :]
    key = tl.load(key_ptr + off2, mask=m2, other=-1)
    aff = tl.load(aff_ptr + off2, mask=m2, other=0.0)
    usable = (key >= 0) & (((key >> (32 + PB + IB)) & 1) == 1)
    inside = usable & in_set[None, :] & app[:, None]
    cols = tl.arange(0, BLOCK_K)
    if MODE == 0:
        out_ids, out_w = _route_in_set(key, aff, inside, own, m2, cols, E, BT, BLOCK_K, TOP_K, IB, PB, SPEC)
    else:
        out_ids, out_w, repl, short = _route_restricted(key, aff, inside, usable, app, m2, cols, low, offs_e,
                                                        eids_ptr, stride_it, stride_ie, rows, r_ok, E, BT, BLOCK_K,
                                                        TOP_K, IB, PB)
        tl.store(repl_ptr + rows, repl.to(tl.int8), mask=r_ok)
        tl.atomic_add(short_ptr, tl.reduce((short & valid).to(tl.int64), 0, _ADD))
    out_w = routed_weights(out_w, rsf, RENORM, SCALE, SCALE_ROUND)
    kmask = r_ok[:, None] & (cols[None, :] < TOP_K)
    out_off = rows[:, None].to(tl.int64) * TOP_K + cols[None, :]
    tl.store(ids_ptr + out_off, out_ids, mask=kmask)
    tl.store(w_ptr + out_off, out_w, mask=kmask)
    routed = kmask & valid[:, None] & (out_ids >= 0) & (out_ids < E)
    tl.store(active_ptr + out_ids, tl.full([BT, BLOCK_K], 1, tl.int8), mask=routed)
