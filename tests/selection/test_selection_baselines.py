"""The baseline policies against their papers' definitions, restated with plain Python loops."""

import math

import pytest
import torch

from xshare.selection import SelectorConfig, select
from xshare.selection.backends.reference import prepare_batch
from xshare.selection.call import LayerCall
from xshare.selection.policies.lynx import lynx_scores


def _logits(t, e, seed):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2


def _active(r):
    return set(torch.nonzero(r.active).flatten().tolist())


def _own_top(logits, k):
    return [set(torch.topk(row, k).indices.tolist()) for row in logits]


@pytest.mark.parametrize("seed", range(4))
def test_oea_is_union_of_top_k0_with_piggyback(seed):
    logits = _logits(12, 32, seed)
    r = select(logits, 4, SelectorConfig(policy="oea", budget=1, warmup_k=1))
    base = set().union(*_own_top(logits, 1))
    assert _active(r) <= base | set().union(*(
        _own_top(logits, 4)[t] for t in range(12) if len(base) < 4))
    if len(base) >= 4:
        assert _active(r) == base  # no expert added to the batch set
        for t in range(12):  # each token's top-4 inside S_base, by its own score
            order = [e for e in torch.argsort(logits[t], descending=True).tolist() if e in base][:4]
            assert r.topk_ids[t].tolist() == order


def test_des_seq_blocks_are_requests():
    logits = _logits(8, 32, 1)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r = select(logits, 4, SelectorConfig(policy="des_seq", budget=1, warmup_k=2), groups=groups)
    for g in (0, 1):
        rows = (groups == g).nonzero().flatten().tolist()
        core = set().union(*(_own_top(logits[rows], 2)))
        for t in rows:
            inside = [e for e in torch.argsort(logits[t], descending=True).tolist() if e in core][:4]
            if len(core) >= 4:
                assert r.topk_ids[t].tolist() == inside
    # without groups the block is the whole batch, i.e. OEA's rule
    a = select(logits, 4, SelectorConfig(policy="des_seq", budget=1, warmup_k=2))
    b = select(logits, 4, SelectorConfig(policy="oea", budget=1, warmup_k=2))
    assert torch.equal(a.topk_ids, b.topk_ids)


@pytest.mark.parametrize("seed", range(4))
def test_des_vote_coreset_is_top_m_votes(seed):
    logits = _logits(16, 64, seed)
    m = 12
    r = select(logits, 4, SelectorConfig(policy="des_vote", budget=m, warmup_k=0))
    p = torch.softmax(logits, -1)
    votes = [0.0] * 64
    for t in range(16):
        for e in _own_top(logits, 4)[t]:
            votes[e] += float(p[t, e])
    ranked = sorted(range(64), key=lambda e: (-votes[e], e))
    core = {e for e in ranked[:m] if votes[e] > 0}
    assert _active(r) == core


def test_lynx_scores_follow_confidence_bins():
    # token 0: very confident in expert 0; token 1: unsure between 1 and 2
    logits = torch.tensor([[10.0, 0.0, 0.0, -5.0, -5.0, -5.0, -5.0, -5.0],
                           [0.0, 3.0, 2.9, 2.8, -5.0, -5.0, -5.0, -5.0]])
    cfg = SelectorConfig(policy="lynx", budget=2, extra={"lynx_alpha": 1.0, "lynx_beta": 3.0})
    batch = prepare_batch(LayerCall(logits, 2), cfg)
    score, forced = lynx_scores(batch)
    b = 2.0  # batch size
    # token 0 votes expert 0 at bin 0 and its second (expert 1, r = -10) at bin -3
    # token 1 votes expert 1 at bin 0 and expert 2 (r = -0.1 -> floor = -1) at bin -1
    want = torch.zeros(8)
    want[0] += 1
    want[1] += b ** -3 + 1
    want[2] += b ** -1
    torch.testing.assert_close(score, want)
    assert forced.tolist() == [True] + [False] * 7  # only token 0 is confident
    r = select(logits, 2, cfg)
    # S = forced {0} + the best other by score (expert 1, 1.125); both tokens route inside it
    assert _active(r) == {0, 1}
    assert r.topk_ids.tolist() == [[0, 1], [1, 0]]


def test_lynx_default_bins_from_sparsity():
    e, k = 64, 6
    logits = _logits(16, e, 3)
    batch = prepare_batch(LayerCall(logits, k), SelectorConfig(policy="lynx", budget=16))
    score, _ = lynx_scores(batch)
    alpha = 1 / math.log(e / k)
    z = logits
    ref = torch.zeros(e)
    for t in range(16):
        top = torch.topk(z[t], k).indices
        for e_ in top.tolist():
            bin_ = max(-3.0, min(0.0, math.floor((z[t, e_] - z[t, top[0]]).item() * alpha)))
            ref[e_] += 16.0 ** bin_
    torch.testing.assert_close(score, ref)
