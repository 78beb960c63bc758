# ruff: noqa: ANN001  (Triton kernel parameters: their annotations are read by Triton; only constexprs carry one)
"""The per-request steps of ``xshare_spec`` in the selector's Triton kernels (:mod:`._triton_router`): each row's
request leader (its first valid row) and the request's size, the request's fixed-point sums and warm-up union
(gate kernel), and each request's set S_r (route kernel). Named ``@triton.jit`` helpers, inlined when compiled."""

from __future__ import annotations

import triton
import triton.language as tl

_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_ADD = tl.standard._sum_combine


@triton.jit
def _request_leaders(groups_ptr, rows, r_ok, n, T, BT: tl.constexpr, BLOCK_T: tl.constexpr):
    """(leader, size), int32 [BT]: the first valid row of each row's request and the request's valid rows."""
    offs_t = tl.arange(0, BLOCK_T)
    g_all = tl.load(groups_ptr + offs_t, mask=offs_t < T, other=0).to(tl.int64)
    v_all = (offs_t < T) & (offs_t.to(tl.int64) < n)
    g_me = tl.load(groups_ptr + rows, mask=r_ok, other=0).to(tl.int64)
    same = (g_all[None, :] == g_me[:, None]) & v_all[None, :]
    leader = tl.reduce(tl.where(same, offs_t[None, :], BLOCK_T), 1, _MIN)
    return leader, tl.reduce(same.to(tl.int32), 1, _ADD)


@triton.jit
def _request_sums(leader, leader_ptr, lead_ptr, racc_ptr, rwarm_ptr, rows, r_ok, valid, q, warm0, offs_e,
                  e_ok, T, E: tl.constexpr):
    """Per request (its first valid row, ``leader``, leads it): marks the leader, adds the rows' fixed-point
    affinities ``q`` to the request's sums and their warm-up to its warm-up union."""
    tl.store(leader_ptr + rows, leader, mask=r_ok)
    mine = valid & (leader < T)
    tl.store(lead_ptr + leader, (leader * 0 + 1).to(tl.int8), mask=mine)
    roff = leader[:, None].to(tl.int64) * E + offs_e[None, :]
    tl.atomic_add(racc_ptr + roff, q, mask=mine[:, None] & e_ok[None, :])
    tl.atomic_max(rwarm_ptr + roff, warm0, mask=mine[:, None] & e_ok[None, :])


@triton.jit
def _request_sets(leader_ptr, lead_ptr, racc_ptr, rwarm_ptr, gbud_ptr, rows, r_ok, offs_e, e_ok, low, T,
                  E: tl.constexpr, BT: tl.constexpr, BLOCK_E: tl.constexpr, IB: tl.constexpr):
    """xshare_spec: each request's set S_r = its warm-up W_r and its best experts by the request's sums up to the
    per-request budget. Returns (the union of the S_r [BLOCK_E], W = the union of the W_r [BLOCK_E], int32
    [BT, BLOCK_E]: 1 where the expert is in the row's own request's set)."""
    union = e_ok & False
    forced = e_ok & False
    my_leader = tl.load(leader_ptr + rows, mask=r_ok, other=-1)
    own = tl.full([BT, BLOCK_E], 0, tl.int32)
    m_r = tl.load(gbud_ptr).to(tl.int64)
    for u in range(0, T):
        if tl.load(lead_ptr + u) != 0:
            q_r = tl.load(racc_ptr + u * E + offs_e, mask=e_ok, other=0)
            w_r = (tl.load(rwarm_ptr + u * E + offs_e, mask=e_ok, other=0) > 0) & e_ok
            key_r = tl.where(e_ok & ~w_r, (q_r << IB) | low, -1)
            s_r = w_r
            for _ in range(0, tl.maximum(m_r - tl.reduce(w_r.to(tl.int64), 0, _ADD), 0)):
                best_r = tl.reduce(key_r, 0, _MAX)
                hit_r = (key_r == best_r) & (key_r >= 0)
                s_r = s_r | hit_r
                key_r = tl.where(hit_r, -1, key_r)
            union = union | s_r
            forced = forced | w_r
            own = tl.where((my_leader == u)[:, None] & s_r[None, :], 1, own)
    return union, forced, own
