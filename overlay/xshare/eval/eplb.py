"""DeepSeek's expert-parallel load balancer (EPLB), written from its published description.

Given the measured load of every logical expert per layer, EPLB decides how many replicas each
expert gets (the hottest ones get more) and which GPU every replica lives on, so that GPUs carry
similar loads. SGLang runs it with ``--enable-eplb`` (``--eplb-algorithm deepseek``); the result is a
physical-to-logical map in which slot p lives on GPU p // (P / G).

* :func:`balanced_packing`  - n weighted items into m packs of exactly n/m items each: heaviest
  first, each to the currently lightest pack that still has room (ties: lowest pack index).
* :func:`replicate_experts` - n logical experts into r >= n physical slots: one each, then every
  extra slot goes to the expert with the largest load per replica (ties: lowest expert index).
* :func:`rebalance_experts` - hierarchical mode (groups of experts packed onto nodes, replication
  inside each node, replicas packed onto the node's GPUs) when the number of groups is a multiple
  of the number of nodes, else global mode (the same with one group and one node).

Everything is numpy on the host; arrays have a leading layer dimension.
"""

from __future__ import annotations

import numpy as np


def _desc_order(w: np.ndarray) -> np.ndarray:
    """Indices of a 1-D array by descending value, ties by ascending index."""
    return np.argsort(-w, kind="stable")


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items per row into ``num_packs`` packs of n / num_packs items, balancing total weight.

    weight float [X, n]. Returns (pack_index int64 [X, n], rank_in_pack int64 [X, n]).
    """
    weight = np.asarray(weight, dtype=np.float64)
    rows, n = weight.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"balanced_packing: {n} items do not divide into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        ident = np.broadcast_to(np.arange(n), (rows, n)).copy()
        return ident, np.zeros((rows, n), dtype=np.int64)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    for x in range(rows):
        load = np.zeros(num_packs)
        count = np.zeros(num_packs, dtype=np.int64)
        for item in _desc_order(weight[x]):
            open_packs = np.flatnonzero(count < per_pack)
            pack = open_packs[np.argmin(load[open_packs])]  # argmin: first (lowest index) on ties
            pack_index[x, item] = pack
            rank_in_pack[x, item] = count[pack]
            load[pack] += weight[x, item]
            count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate n logical experts into ``num_physical`` slots, minimising the max load per replica.

    weight float [X, n]. Returns (phy2log int64 [X, P], replica rank int64 [X, P], logcnt int64 [X, n]).
    """
    weight = np.asarray(weight, dtype=np.float64)
    rows, n = weight.shape
    if num_physical < n:
        raise ValueError(f"replicate_experts: {num_physical} slots cannot hold {n} experts")
    phy2log = np.empty((rows, num_physical), dtype=np.int64)
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    all_rows = np.arange(rows)
    for slot in range(n, num_physical):
        hot = np.argmax(weight / logcnt, axis=1)  # first maximum on ties
        phy2log[:, slot] = hot
        rank[:, slot] = logcnt[all_rows, hot]
        logcnt[all_rows, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[-1]), perm.shape), axis=-1)
    return inv


def _rebalance_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, n = weight.shape
    if n % num_groups:
        raise ValueError(f"EPLB: {n} experts do not divide into {num_groups} groups")
    if num_groups % num_nodes:
        raise ValueError(f"EPLB: {num_groups} groups do not divide over {num_nodes} nodes")
    if num_gpus % num_nodes:
        raise ValueError(f"EPLB: {num_gpus} GPUs do not divide over {num_nodes} nodes")
    if num_physical % num_gpus:
        raise ValueError(f"EPLB: {num_physical} physical slots do not divide over {num_gpus} GPUs")
    group_size = n // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = n // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus
    gpus_per_node = num_gpus // num_nodes
    if slots_per_node < experts_per_node:
        raise ValueError(f"EPLB: {num_physical} slots are fewer than the {n} experts")

    # 1. Groups onto nodes; renumber logical experts ("mlog") so each node's groups are contiguous.
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    g_pack, g_rank = balanced_packing(group_load, num_nodes)
    first_mlog = (g_pack * groups_per_node + g_rank) * group_size  # [L, groups]
    log2mlog = (first_mlog[:, :, None] + np.arange(group_size)).reshape(layers, n)
    mlog2log = _inverse(log2mlog)

    # 2. Inside each node, replicate its experts into its slots.
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(layers * num_nodes, experts_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, slots_per_node)

    # 3. Replicas (load split evenly over an expert's replicas) onto the node's GPUs.
    replica_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, -1)
    pack, rank_in_pack = balanced_packing(replica_load, gpus_per_node)
    phy2pphy = pack * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)  # node-local mlog ids
    node_offset = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, slots_per_node) + node_offset).reshape(layers, num_physical)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, -1).reshape(layers, num_physical)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, n), log2mlog, -1)
    return phy2log, pphy_rank, logcnt


def rebalance_experts(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
                      mode: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB for every layer.

    weight        float [L, E]: measured load of each logical expert (e.g. tokens routed to it).
    num_physical  P >= E physical expert slots (E + redundant experts), divisible by num_gpus.
    num_groups    expert groups (the model's n_group; 1 for models without grouped routing).
    num_nodes     server nodes; num_gpus  GPUs in all (EP size).
    mode          'auto' (hierarchical iff num_groups % num_nodes == 0), 'hierarchical' or 'global'.

    Returns (phy2log int64 [L, P], log2phy int64 [L, E, maxcnt] (-1 padded), logcnt int64 [L, E]).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ValueError(f"EPLB: weight must be [layers, experts], got shape {weight.shape}")
    if mode not in ("auto", "hierarchical", "global"):
        raise ValueError(f"EPLB: mode must be auto|hierarchical|global, got {mode!r}")
    hierarchical = mode == "hierarchical" or (mode == "auto" and num_groups % num_nodes == 0)
    if hierarchical:
        phy2log, rank, logcnt = _rebalance_hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = _rebalance_hierarchical(weight, num_physical, 1, 1, num_gpus)
    layers, n = weight.shape
    maxcnt = int(logcnt.max())
    log2phy = np.full((layers, n * maxcnt), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * maxcnt + rank, np.broadcast_to(np.arange(num_physical), phy2log.shape), -1)
    return phy2log, log2phy.reshape(layers, n, maxcnt), logcnt
