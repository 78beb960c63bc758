"""DeepEP 'global' mode: the per-layer all-reduce of the batch statistics, on 2 CPU processes over
gloo (real torch.distributed, no sglang). Each rank routes only its own rows; with the group's
statistics the result must equal one selection over all ranks' rows together, also when a rank has
zero tokens (it joins the all-reduce with zeros) and over several layers in a row."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xshare.selection import Placement, SelectorConfig, select
from xshare.selection.group_stats import global_select, join_empty

E, K, LAYERS = 16, 4, 3


def _logits(layer: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + layer)
    return torch.randn(rows, E, generator=g) * 2


def _worker(rank: int, world: int, init_file: str, rows: list[int], policy: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = SelectorConfig(policy=policy, budget=5, warmup_k=1)
        placement = Placement.contiguous(E, 2) if policy == "xshare_ep" else None
        calls = []

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(t.shape))
            dist.all_reduce(t)
            return t

        results = []
        for layer in range(LAYERS):
            if rows[rank] == 0:
                join_empty(E, all_reduce)  # the TopK.empty_topk_output path
                results.append(None)
            else:
                r = global_select(_logits(layer, rows[rank], rank), K, config, all_reduce, placement=placement)
                results.append((r.topk_ids, r.topk_weights))
        torch.save({"results": results, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, rows, policy):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), rows, policy, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize(("rows", "policy"), [([7, 5], "xshare"), ([6, 0], "xshare"), ([5, 4], "xshare_ep")])
def test_global_mode_equals_one_selection_over_all_ranks(tmp_path, rows, policy):
    outs = _run(tmp_path, rows, policy)
    config = SelectorConfig(policy=policy, budget=5, warmup_k=1)
    placement = Placement.contiguous(E, 2) if policy == "xshare_ep" else None
    for out in outs:  # one all-reduce of 2E floats per layer on every rank, zero-token ranks included
        assert out["calls"] == [(2 * E,)] * LAYERS
    for layer in range(LAYERS):
        parts = [_logits(layer, n, r) for r, n in enumerate(rows) if n]
        ref = select(torch.cat(parts), K, config, placement=placement)
        start = 0
        for r, n in enumerate(rows):
            got = outs[r]["results"][layer]
            if n == 0:
                assert got is None
                continue
            assert torch.equal(got[0], ref.topk_ids[start:start + n]), (layer, r)
            assert torch.allclose(got[1], ref.topk_weights[start:start + n], atol=1e-6)
            start += n
        # the group activates at most max(budget, |warm-up|): the warm-up (every token's top-1) is global
        warmup = torch.unique(torch.cat(parts).argmax(-1)).numel()
        assert ref.active.sum() <= max(5, warmup)
        # and local selection differs: each rank would pick its own set
        if all(rows):
            local = [select(p, K, config, placement=placement) for p in parts]
            union = torch.stack([x.active for x in local]).any(0).sum()
            assert union >= ref.active.sum()
