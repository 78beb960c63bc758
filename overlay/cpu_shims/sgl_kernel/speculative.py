"""Pure-torch stand-ins for the ``sgl_kernel`` ops of SGLang's NGRAM speculative decoding on the CPU.

SGLang 0.5.23 calls these from ``sglang.kernels.ops.speculative`` when it runs on the CPU: the
tree-mask reconstruction of an NGRAM draft (``reconstruct_indices_from_tree_mask``, imported from
this submodule), greedy tree verification and the cache-location copies of the verify window (the
``*_cpu`` names, re-exported by the package). Each writes its outputs in place, as the compiled op
does; shapes are in the docstrings (``bs`` requests, ``n`` draft tokens per request).
"""

from __future__ import annotations

import torch


def pool_positions(req_pool_indices: torch.Tensor, start: torch.Tensor,
                   end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` of requests i, laid end to
    end: (pool row, column) of each element, both int64 [sum(end - start)]; inputs [bs]."""
    lengths = (end - start).to(torch.int64)
    total = int(lengths.sum()) if lengths.numel() else 0
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    seg_start = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, dtype=torch.int64, device=lengths.device) - seg_start[seg]
    return req_pool_indices.to(torch.int64)[seg], start.to(torch.int64)[seg] + within


def assign_extend_cache_locs_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor, start_offset: torch.Tensor,
                                 end_offset: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """The inverse copy of ``assign_req_to_token_pool_cpu``: ``out_cache_loc`` takes, request after
    request, ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` (:func:`pool_positions`);
    ``req_to_token``: [pool rows, pool_len]."""
    del pool_len  # the row length of req_to_token; implied by its shape here
    rows, cols = pool_positions(req_pool_indices, start_offset, end_offset)
    out_cache_loc[: rows.numel()] = req_to_token[rows, cols].to(out_cache_loc.dtype)


def fill_accept_out_cache_loc_cpu(
    accept_index: torch.Tensor, out_cache_loc: torch.Tensor, accept_out_cache_loc: torch.Tensor
) -> None:
    """Compacts the accepted slots: the j-th entry of ``accept_index`` (flattened, [bs, depth]) that
    is not -1 puts ``out_cache_loc[accept_index...]`` at ``accept_out_cache_loc[j']``, j' counting
    only the entries that are not -1; the rest of ``accept_out_cache_loc`` is left as it is."""
    flat = accept_index.reshape(-1).to(torch.int64)
    src = flat[flat != -1]
    accept_out_cache_loc[: src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


def verify_tree_greedy_cpu(
    predicts: torch.Tensor,
    accept_index: torch.Tensor,
    accept_token_num: torch.Tensor,
    candidates: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    target_predict: torch.Tensor,
) -> None:
    """Greedy verification of a draft tree, per request b, vectorised over the batch.

    ``candidates``, ``retrive_*``, ``target_predict``: [bs, n]; ``accept_index``: [bs, depth];
    ``accept_token_num``: [bs]; ``predicts``: [bs * n]. Starting at the root (node 0), each level
    follows ``retrive_next_token`` to the first child and walks ``retrive_next_sibling`` until a
    node's draft token equals the target's prediction at the last accepted node; the match is
    accepted (``predicts[last] = target``, its ``retrive_index`` appended to ``accept_index``) and
    becomes the last accepted node; a level without a match ends the walk. ``accept_token_num[b]``
    = accepted drafts (the root not counted); finally ``predicts[last] = target_predict[last]``
    (the bonus token). ``retrive_index[b, i]`` is the flat row ``b * n + i``-style index into
    ``predicts`` and ``target_predict``.
    """
    bs, n = candidates.shape
    depth = accept_index.shape[1]
    rows = torch.arange(bs, device=candidates.device)
    target = target_predict.reshape(-1)
    r_index = retrive_index.to(torch.int64)
    last = r_index[:, 0].clone()
    accept_index[:, 0] = last.to(accept_index.dtype)
    accepted = torch.zeros(bs, dtype=torch.int64, device=candidates.device)
    node = torch.zeros(bs, dtype=torch.int64, device=candidates.device)
    walking = torch.ones(bs, dtype=torch.bool, device=candidates.device)
    for _level in range(1, depth):
        node = torch.where(walking, retrive_next_token[rows, node.clamp(min=0)].to(torch.int64), -1)
        want = target[last]
        found = torch.zeros_like(walking)
        searching = node >= 0
        for _sibling in range(n):
            if not bool(searching.any()):
                break
            safe = node.clamp(min=0)
            match = searching & (candidates[rows, safe] == want)
            hit = r_index[rows, safe]
            predicts[last[match]] = want[match].to(predicts.dtype)
            accepted += match
            accept_index[rows[match], accepted[match]] = hit[match].to(accept_index.dtype)
            last = torch.where(match, hit, last)
            found |= match
            searching &= ~match
            node = torch.where(searching, retrive_next_sibling[rows, safe].to(torch.int64), node)
            searching &= node >= 0
        walking &= found
        if not bool(walking.any()):
            break
    accept_token_num.copy_(accepted.to(accept_token_num.dtype))
    predicts[last] = target[last].to(predicts.dtype)


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor,
    verified_seq_len: torch.Tensor,
    positions: torch.Tensor,
    retrive_index: torch.Tensor,
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
) -> None:
    """An NGRAM draft tree's verify metadata from its ancestor mask.

    ``tree_mask``: flat [bs * n * n], entry (b, i, j) true when node j is an ancestor of (or is)
    node i; ``verified_seq_len``: [bs]. Writes ``positions[: bs * n]`` = the node's depth (strict
    ancestors) + ``verified_seq_len[b]``; ``retrive_index[:bs]`` = ``b * n + i``;
    ``retrive_next_token[:bs]`` = the node's first child (smallest k > i with i among k's
    ancestors) or -1; ``retrive_next_sibling[:bs]`` = the next node with the same parent (the
    parent being the largest strict ancestor), or -1, and -1 for a root.
    """
    bs, n = int(batch_size), int(draft_token_num)
    if bs == 0:
        return
    dev = tree_mask.device
    node = torch.arange(n, device=dev)
    mask = tree_mask.reshape(-1)[: bs * n * n].reshape(bs, n, n).to(torch.bool)
    ancestors = mask & (node[None, :] < node[:, None])  # [b, i, j]: j is a strict ancestor of i
    depth = ancestors.sum(-1)
    positions[: bs * n] = (depth + verified_seq_len.reshape(bs, 1).to(torch.int64)).reshape(-1).to(positions.dtype)
    retrive_index[:bs] = torch.arange(bs * n, device=dev).reshape(bs, n).to(retrive_index.dtype)
    parent = torch.where(ancestors, node, -1).amax(-1)  # [b, i]
    first_child = torch.where(ancestors, node[None, :, None], n).amin(1)  # [b, t]: min k with t an ancestor of k
    retrive_next_token[:bs] = torch.where(first_child < n, first_child, -1).to(retrive_next_token.dtype)
    later = node[:, None] > node[None, :]  # [k, t]: k > t
    same_parent = (parent[:, :, None] == parent[:, None, :]) & later  # [b, k, t]
    first_sibling = torch.where(same_parent, node[None, :, None], n).amin(1)  # [b, t]
    sibling = torch.where((parent >= 0) & (first_sibling < n), first_sibling, -1)
    retrive_next_sibling[:bs] = sibling.to(retrive_next_sibling.dtype)
