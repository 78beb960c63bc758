"""Run by tests/sglang/test_speculative_cpu.py in a subprocess under ``TRITON_INTERPRET=1``: SGLang 0.5.23's own Triton
kernels of the speculative ops (their definition, run by Triton's interpreter on CPU tensors) against the CPU
stand-ins of ``overlay/cpu_shims/sgl_kernel``, on random small inputs. Prints one JSON object: per op, the
number of cases compared and the cases that differ (empty when every output matches)."""

from __future__ import annotations

import json
import sys

import torch
from sgl_kernel.speculative import (
    assign_extend_cache_locs_cpu,
    fill_accept_out_cache_loc_cpu,
    reconstruct_indices_from_tree_mask,
    verify_tree_greedy_cpu,
)
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs
from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc
from sglang.kernels.ops.speculative.reconstruct_tree import _reconstruct_tree_mask_kernel
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_kernel_triton
from sglang.srt.utils import next_power_of_2


def random_trees(g: torch.Generator, bs: int, n: int) -> torch.Tensor:
    """bool [bs, n, n]: (b, i, j) true when node j is node i or one of its ancestors; node 0 is the root
    and every other node's parent is an earlier node (as SGLang's draft trees are laid out)."""
    masks = torch.zeros(bs, n, n, dtype=torch.bool)
    for b in range(bs):
        parent = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
        for i in range(n):
            p = i
            while p >= 0:
                masks[b, i, p] = True
                p = parent[p]
    return masks


def tree_links(masks: torch.Tensor, seq_lens: torch.Tensor, fn: str) -> tuple[torch.Tensor, ...]:
    bs, n, _ = masks.shape
    outs = (torch.full((bs * n,), -7, dtype=torch.int64), *(torch.full((bs, n), -7, dtype=torch.int64)
                                                             for _ in range(3)))
    if fn == "sglang":
        _reconstruct_tree_mask_kernel[(bs,)](masks.flatten(), seq_lens, *outs, n, next_power_of_2(n))
    else:
        reconstruct_indices_from_tree_mask(masks.flatten(), seq_lens, *outs, bs, n)
    return outs


def check_reconstruct(g: torch.Generator) -> tuple[int, list]:
    bad, cases = [], 0
    for bs, n in [(1, 1), (1, 4), (3, 4), (4, 8), (2, 6)]:
        masks = random_trees(g, bs, n)
        seq_lens = torch.randint(1, 50, (bs,), generator=g)
        ref, got = tree_links(masks, seq_lens, "sglang"), tree_links(masks, seq_lens, "stand-in")
        cases += 1
        if not all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)):
            bad.append({"bs": bs, "n": n, "sglang": [t.tolist() for t in ref], "stand_in": [t.tolist() for t in got]})
    return cases, bad


ACCEPTED = [0]  # drafts the verify cases accepted in all (the cases must exercise acceptance)


def check_verify(g: torch.Generator) -> tuple[int, list]:
    bad, cases = [], 0
    for bs, n, depth, vocab in [(1, 4, 4, 3), (3, 4, 4, 2), (4, 8, 5, 3), (2, 6, 6, 2), (5, 4, 2, 2)]:
        for _ in range(4):
            masks = random_trees(g, bs, n)
            _pos, r_index, r_next, r_sib = tree_links(masks, torch.zeros(bs, dtype=torch.int64), "sglang")
            candidates = torch.randint(0, vocab, (bs, n), generator=g)
            target = torch.randint(0, vocab, (bs, n), generator=g)
            outs = {}
            for fn in ("sglang", "stand-in"):
                predicts = torch.full((bs * n,), -3, dtype=torch.int32)
                accept_index = torch.full((bs, depth), -1, dtype=torch.int32)
                accept_num = torch.full((bs,), -5, dtype=torch.int32)
                args = (predicts, accept_index, accept_num, candidates, r_index, r_next, r_sib, target)
                if fn == "sglang":
                    verify_tree_greedy_kernel_triton[(bs,)](*args, batch_size=bs, num_speculative_tokens=depth,
                                                            num_draft_tokens=n)
                else:
                    verify_tree_greedy_cpu(*args)
                outs[fn] = (predicts, accept_index, accept_num)
            cases += 1
            ACCEPTED[0] += int(outs["sglang"][2].sum())
            if not all(torch.equal(a, b) for a, b in zip(outs["sglang"], outs["stand-in"], strict=True)):
                bad.append({"bs": bs, "n": n, "sglang": [t.tolist() for t in outs["sglang"]],
                            "stand_in": [t.tolist() for t in outs["stand-in"]]})
    return cases, bad


def check_extend_cache_locs(g: torch.Generator) -> tuple[int, list]:
    bad, cases = [], 0
    for bs, pool_len in [(1, 16), (3, 40), (6, 64)]:
        req_to_token = torch.randint(0, 10_000, (8, pool_len), generator=g, dtype=torch.int32)
        req_pool = torch.randperm(8, generator=g)[:bs]
        start = torch.randint(0, pool_len // 2, (bs,), generator=g)
        end = start + torch.randint(0, pool_len // 2, (bs,), generator=g)
        total = int((end - start).sum())
        ref = torch.full((total + 3,), -1, dtype=torch.int64)
        got = ref.clone()
        assign_extend_cache_locs[(bs,)](req_pool, req_to_token, start, end, ref, pool_len, next_power_of_2(bs))
        assign_extend_cache_locs_cpu(req_pool, req_to_token, start, end, got, pool_len)
        cases += 1
        if not torch.equal(ref, got):
            bad.append({"bs": bs, "sglang": ref.tolist(), "stand_in": got.tolist()})
    return cases, bad


def check_accept_cache_locs(g: torch.Generator) -> tuple[int, list]:
    bad, cases = [], 0
    for bs, depth in [(1, 4), (3, 4), (5, 6)]:
        out_cache_loc = torch.randint(0, 10_000, (bs * depth * 2,), generator=g)
        accept_index = torch.randint(0, bs * depth * 2, (bs, depth), generator=g).to(torch.int32)
        accept_index[torch.rand(bs, depth, generator=g) < 0.4] = -1
        size = bs * depth
        ref = torch.full((size,), -9, dtype=torch.int64)
        got = ref.clone()
        fill_accept_out_cache_loc[(size,)](accept_index, out_cache_loc, ref, next_power_of_2(size))
        fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, got)
        cases += 1
        if not torch.equal(ref, got):
            bad.append({"bs": bs, "sglang": ref.tolist(), "stand_in": got.tolist()})
    return cases, bad


def main() -> int:
    g = torch.Generator().manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    checks = {"reconstruct_indices_from_tree_mask": check_reconstruct, "verify_tree_greedy_cpu": check_verify,
              "assign_extend_cache_locs_cpu": check_extend_cache_locs,
              "fill_accept_out_cache_loc_cpu": check_accept_cache_locs}
    result = {}
    for name, check in checks.items():
        cases, bad = check(g)
        result[name] = {"cases": cases, "mismatches": bad}
    result["verify_tree_greedy_cpu"]["accepted"] = ACCEPTED[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
