"""DeepSeek EPLB (balanced packing, replication, hierarchical / global placement)."""

import itertools

import numpy as np
import pytest

from xshare.eval.eplb import balanced_packing, rebalance_experts, replicate_experts
from xshare.selection import Placement

README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log[0].tolist() == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    assert phy2log.shape == (2, 16) and logcnt.shape == (2, 12)


@pytest.mark.parametrize("layer", [0, 1])
def test_readme_example_structure(layer):
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    p = phy2log[layer]
    # replica counts and the inverse map agree with phy2log
    assert np.array_equal(np.bincount(p, minlength=12), logcnt[layer])
    for e in range(12):
        slots = sorted(s for s in log2phy[layer, e] if s >= 0)
        assert slots == sorted(np.flatnonzero(p == e).tolist())
        assert (log2phy[layer, e, logcnt[layer, e]:] == -1).all()
    # hierarchical: each node (8 slots) holds whole groups of 3 consecutive experts, 2 groups per node
    for node in range(2):
        experts = set(p[node * 8:(node + 1) * 8].tolist())
        groups = {e // 3 for e in experts}
        assert len(groups) == 2 and experts == {3 * g + i for g in groups for i in range(3)}
    # the hottest expert of the layer is replicated
    assert logcnt[layer, README_WEIGHT[layer].argmax()] == 2


def test_balanced_packing_hand_example():
    pack, rank = balanced_packing(np.array([[10, 9, 8, 1, 1, 1]]), 2)
    # 10 -> p0; 9 -> p1; 8 -> p1 (9 < 10); 1 -> p0 (10 < 17); 1 -> p0 (11 < 17); 1 -> p1 (p0 full)
    assert pack.tolist() == [[0, 1, 1, 0, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_balanced_packing_invariants():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 100, size=(5, 24))
    pack, rank = balanced_packing(w, 6)
    for x in range(5):
        assert np.bincount(pack[x], minlength=6).tolist() == [4] * 6
        for g in range(6):
            assert sorted(rank[x][pack[x] == g].tolist()) == [0, 1, 2, 3]
    ident, zero = balanced_packing(w, 24)
    assert (ident == np.arange(24)).all() and (zero == 0).all()
    with pytest.raises(ValueError):
        balanced_packing(w, 5)


def _best_max_load(w, slots):
    best = np.inf
    n = len(w)
    for extra in itertools.product(range(slots - n + 1), repeat=n):
        if sum(extra) == slots - n:
            best = min(best, max(w[i] / (1 + extra[i]) for i in range(n)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_replication_minimises_the_max_load_per_replica(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    slots = n + int(rng.integers(0, 4))
    w = rng.integers(1, 50, size=n).astype(float)
    phy2log, rank, logcnt = replicate_experts(w[None], slots)
    assert phy2log[0, :n].tolist() == list(range(n))
    assert np.array_equal(np.bincount(phy2log[0], minlength=n), logcnt[0])
    for e in range(n):
        assert sorted(rank[0][phy2log[0] == e].tolist()) == list(range(logcnt[0, e]))
    assert max(w / logcnt[0]) == pytest.approx(_best_max_load(w, slots))


def test_global_mode_when_groups_do_not_divide_over_nodes():
    w = np.random.default_rng(1).integers(1, 200, size=(3, 12))
    auto, _, _ = rebalance_experts(w, 16, 3, 2, 8)  # 3 % 2 != 0 -> global
    glob, _, _ = rebalance_experts(w, 16, 1, 1, 8)
    forced, _, _ = rebalance_experts(w, 16, 3, 2, 8, mode="global")
    assert np.array_equal(auto, glob) and np.array_equal(forced, glob)
    with pytest.raises(ValueError, match="groups"):
        rebalance_experts(w, 16, 3, 2, 8, mode="hierarchical")


def _gpu_loads(weight, placement):
    se = placement.slot_expert.numpy()
    per_slot = weight[se] / np.bincount(se, minlength=weight.size)[se]
    return np.bincount(placement.slot_gpu.numpy(), weights=per_slot, minlength=placement.num_gpus)


def test_eplb_balances_skewed_loads_better_than_contiguous():
    rng = np.random.default_rng(7)
    w = (1000.0 / np.arange(1, 33) ** 1.1)[rng.permutation(32)][None].repeat(2, 0)
    phy2log, _, _ = rebalance_experts(w, 40, 1, 1, 8)
    for layer in range(2):
        eplb = _gpu_loads(w[layer], Placement.from_physical(phy2log[layer], 8, num_experts=32))
        contiguous = _gpu_loads(w[layer], Placement.contiguous(32, 8))
        assert eplb.sum() == pytest.approx(w[layer].sum())
        assert eplb.max() < 0.8 * contiguous.max()
        assert eplb.max() / eplb.mean() < 1.15


def test_bad_sizes_are_errors():
    w = np.ones((1, 12))
    with pytest.raises(ValueError, match="divide"):
        rebalance_experts(w, 15, 1, 1, 4)
    with pytest.raises(ValueError, match="fewer"):
        rebalance_experts(w, 8, 1, 1, 4)
    with pytest.raises(ValueError, match="mode"):
        rebalance_experts(w, 12, 1, 1, 4, mode="x")
