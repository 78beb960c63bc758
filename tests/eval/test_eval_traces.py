"""Trace loading, validation, mixing, logits, and batch construction of ``xshare eval``."""

import json

import numpy as np
import pytest
import torch

from xshare.eval.batching import decode_batches, recorded_batches
from xshare.eval.synth import synthetic_trace, write_synthetic_trace
from xshare.eval.traces import UNKNOWN_LOGIT, TraceError, load_trace, load_traces, parse_layers


def _save(path, arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_valid_trace_and_logits(tmp_path):
    arrays = synthetic_trace(num_layers=2, num_experts=12, top_k=3, seed=1)
    path = _save(tmp_path / "t.npz", arrays)
    tr = load_trace(path)
    assert (tr.num_layers, tr.num_tokens, tr.num_experts, tr.top_k) == (2, arrays["seq_ids"].size, 12, 3)
    z = tr.layer_logits(1)
    ids = torch.from_numpy(arrays["topk_ids"][1].astype(np.int64))
    w = torch.from_numpy(arrays["topk_weights"][1])
    stored = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
    # stored experts: log-probabilities; the others: the finite "unknown" logit
    assert torch.allclose(z.gather(1, ids), w.log(), atol=1e-6)
    assert bool((z[~stored] == UNKNOWN_LOGIT).all())
    # softmax over the row gives back the stored probabilities renormalised over the top-K, 0 elsewhere
    p = torch.softmax(z, -1)
    assert torch.allclose(p.gather(1, ids), w / w.sum(-1, keepdim=True), atol=1e-5)
    assert float(p[~stored].max()) == 0.0
    probs = tr.layer_probs(1)
    assert torch.allclose(probs.gather(1, ids), w)
    assert float(probs[~stored].abs().max()) == 0.0


def test_sigmoid_trace_logits_invert_the_probabilities(tmp_path):
    path = write_synthetic_trace(tmp_path / "s.npz", scoring="sigmoid", num_experts=10, top_k=2)
    tr = load_trace(path)
    z = tr.layer_logits(0)
    ids = torch.from_numpy(tr.topk_ids[0])
    assert torch.allclose(torch.sigmoid(z.gather(1, ids)), torch.from_numpy(tr.topk_weights[0]), atol=1e-5)


def test_router_logits_are_used_when_present(tmp_path):
    arrays = synthetic_trace(router_logits=True, num_experts=8, top_k=2)
    tr = load_trace(_save(tmp_path / "r.npz", arrays))
    assert tr.describe()["files"][0]["router_logits"]
    z = arrays["router_logits"][0].astype(np.float32)
    assert np.allclose(tr.layer_logits(0).numpy(), z)
    assert np.allclose(tr.layer_probs(0).numpy(), torch.softmax(torch.from_numpy(z), -1).numpy(), atol=1e-6)


def test_unsorted_topk_is_sorted_by_weight(tmp_path):
    arrays = synthetic_trace(num_experts=8, top_k=3, seed=3)
    arrays["topk_ids"] = arrays["topk_ids"][..., ::-1].copy()
    arrays["topk_weights"] = arrays["topk_weights"][..., ::-1].copy()
    tr = load_trace(_save(tmp_path / "u.npz", arrays))
    assert bool((np.diff(tr.topk_weights, axis=-1) <= 0).all())
    assert np.array_equal(tr.topk_ids[..., 0], arrays["topk_ids"][..., -1])


@pytest.mark.parametrize("key", ["topk_ids", "topk_weights", "seq_ids", "meta"])
def test_missing_key_names_file_and_key(tmp_path, key):
    arrays = synthetic_trace()
    del arrays[key]
    path = _save(tmp_path / "m.npz", arrays)
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    assert path in str(ei.value) and repr(key) in str(ei.value)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda a: a.update(topk_weights=a["topk_weights"][:, :-1]), "topk_weights"),
        (lambda a: a.update(seq_ids=a["seq_ids"][:-1]), "seq_ids"),
        (lambda a: a.update(positions=a["positions"][:-2]), "positions"),
        (lambda a: a.update(topk_ids=a["topk_ids"][0]), "topk_ids"),
        (lambda a: a.update(topk_ids=a["topk_ids"][..., :3], topk_weights=a["topk_weights"][..., :3]), "topk_ids"),
        (lambda a: a.update(topk_ids=a["topk_ids"] + 100), "topk_ids"),
        (lambda a: a.update(topk_ids=np.repeat(a["topk_ids"][..., :1], 4, -1)), "topk_ids"),
        (lambda a: a.update(topk_weights=a["topk_weights"] * np.nan), "topk_weights"),
        (lambda a: a.update(seq_ids=a["seq_ids"].astype(np.float32)), "seq_ids"),
        (lambda a: a.update(router_logits=np.zeros((2, 5, 16), np.float16)), "router_logits"),
        (lambda a: a.update(meta=np.array("not json")), "meta"),
        (lambda a: a.update(meta=np.array(json.dumps({"num_experts": 16}))), "meta"),
    ],
)
def test_bad_arrays_name_file_and_key(tmp_path, mutate, key):
    arrays = synthetic_trace(num_experts=16, top_k=4)
    mutate(arrays)
    path = _save(tmp_path / "bad.npz", arrays)
    with pytest.raises(TraceError) as ei:
        load_trace(path)
    assert ei.value.path == path and ei.value.key == key
    assert path in str(ei.value)


def test_empty_trace_is_an_error(tmp_path):
    arrays = synthetic_trace()
    for k in ("topk_ids", "topk_weights"):
        arrays[k] = arrays[k][:, :0]
    for k in ("seq_ids", "positions"):
        arrays[k] = arrays[k][:0]
    path = _save(tmp_path / "empty.npz", arrays)
    with pytest.raises(TraceError, match="empty"):
        load_trace(path)


def test_top_k_flag_must_agree(tmp_path):
    path = write_synthetic_trace(tmp_path / "k.npz", top_k=4)
    assert load_trace(path, top_k=4).top_k == 4
    with pytest.raises(TraceError) as ei:
        load_trace(path, top_k=6)
    assert "meta" in str(ei.value) and "top_k = 4" in str(ei.value) and path in str(ei.value)


def test_not_a_trace_file(tmp_path):
    p = tmp_path / "x.npz"
    p.write_text("hello")
    with pytest.raises(TraceError, match="x.npz"):
        load_trace(str(p))
    with pytest.raises(TraceError, match="not found"):
        load_trace(str(tmp_path / "missing.npz"))


def test_mixing_makes_sequences_disjoint(tmp_path):
    a = write_synthetic_trace(tmp_path / "a.npz", num_seqs=10, seed=1)
    b = write_synthetic_trace(tmp_path / "b.npz", num_seqs=7, seed=2, router_logits=True)
    ta, tb = load_trace(a), load_trace(b)
    mixed = load_traces([a, b])
    assert mixed.num_tokens == ta.num_tokens + tb.num_tokens
    assert mixed.num_sequences == 17
    assert not set(mixed.seq_ids[: ta.num_tokens]) & set(mixed.seq_ids[ta.num_tokens:])
    # each part keeps its own logits: b's are the full router logits, a's come from top-K
    z = mixed.layer_logits(0)
    assert torch.equal(z[: ta.num_tokens], ta.layer_logits(0))
    assert torch.equal(z[ta.num_tokens:], tb.layer_logits(0))
    assert np.array_equal(mixed.source, np.repeat([0, 1], [ta.num_tokens, tb.num_tokens]))


@pytest.mark.parametrize("kw, key", [({"num_experts": 12}, "meta"), ({"top_k": 3}, "meta"), ({"num_layers": 3},
                                                                                                "topk_ids"),
                                     ({"batch_size": 4}, "batch_ids")])
def test_mixing_incompatible_traces_names_the_file(tmp_path, kw, key):
    a = write_synthetic_trace(tmp_path / "a.npz")
    b = write_synthetic_trace(tmp_path / "b.npz", **kw)
    with pytest.raises(TraceError) as ei:
        load_traces([a, b])
    assert ei.value.key == key and b in str(ei.value)


def test_parse_layers():
    assert parse_layers(None, 5) == [0, 1, 2, 3, 4]
    assert parse_layers("3,0-1,1", 5) == [0, 1, 3]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7", 5)
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("a", 5)


# -- batches -----------------------------------------------------------------------------------------
def test_decode_batches_are_decode_like_and_deterministic():
    arrays = synthetic_trace(num_seqs=30, tokens_per_seq=(3, 40), seed=5)
    seq, pos = arrays["seq_ids"].astype(np.int64), arrays["positions"].astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(seq.size)  # token order in the file must not matter
    seq, pos = seq[perm], pos[perm]
    b = decode_batches(seq, pos, 8, seed=3)
    toks = b.tokens
    assert toks.shape[1] == 8 and b.mode == "decode"
    # B different sequences per batch, every token at most once, used + dropped = all
    assert all(len(set(seq[row])) == 8 for row in toks)
    assert len(set(toks.ravel())) == toks.size
    assert toks.size + b.dropped_tokens == seq.size
    # each sequence is decoded in position order, one token per step
    step_of = {int(t): i for i, row in enumerate(toks) for t in row}
    for s in np.unique(seq):
        used = [t for t in np.flatnonzero(seq == s) if t in step_of]
        used.sort(key=lambda t: step_of[t])
        assert list(pos[used]) == sorted(pos[used])
        assert sorted(pos[used]) == sorted(pos[seq == s])[: len(used)]
    assert np.array_equal(decode_batches(seq, pos, 8, seed=3).tokens, toks)
    assert not np.array_equal(decode_batches(seq, pos, 8, seed=4).tokens, toks)


def test_decode_batches_need_enough_sequences():
    with pytest.raises(ValueError, match="only 3 sequences"):
        decode_batches(np.array([0, 1, 2, 0]), np.array([0, 0, 0, 1]), 4, seed=0)


def test_recorded_batches_are_replayed_exactly():
    ids = np.array([2, 0, 2, 1, 0, 2, 5])
    b = recorded_batches(ids)
    assert b.mode == "recorded" and b.num_batches == 4
    assert [sorted(b.row(i).tolist()) for i in range(4)] == [[1, 4], [3], [0, 2, 5], [6]]
    assert b.sizes.tolist() == [2, 1, 3, 1]
