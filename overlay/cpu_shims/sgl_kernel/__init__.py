"""A pure-torch stand-in for ``sgl_kernel`` so that SGLang's CPU engine runs without the AMX build.

SGLang 0.5.23 imports a few ``*_cpu`` functions from ``sgl_kernel`` at module level when it runs
on the CPU (``SGLANG_USE_CPU_ENGINE=1``). PyPI has no CPU build of that package, so this module
provides the ones a plain server and NGRAM speculative decoding call, written in torch
(``sgl_kernel.speculative`` holds the speculative ones), and placeholders that raise
``NotImplementedError`` for the ops only EAGLE-style (draft model) speculative decoding calls.
A placeholder carries ``XSHARE_UNSUPPORTED`` (what it would serve), so that
``xshare.sglang.cpu_check`` can name it before a server that needs it starts.

It deliberately registers no ``torch.ops.sgl_kernel.*`` operator: SGLang's ``cpu_has_amx_support()``
then stays False and the engine takes its torch-native code paths.

Installed into site-packages by ``scripts/install_sglang_cpu.sh`` (never on a CUDA machine's
import path by this repo). ``xshare.sglang.cpu_check`` lists what a given sglang needs from it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from sgl_kernel.speculative import (
    assign_extend_cache_locs_cpu,
    fill_accept_out_cache_loc_cpu,
    pool_positions,
    verify_tree_greedy_cpu,
)

__version__ = "0.0.0+xshare.cpu.stand.in"
XSHARE_STAND_IN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For each request i: ``req_to_token[req_pool_indices[i], start[i]:end[i]]`` takes the next
    ``end[i] - start[i]`` entries of ``out_cache_loc`` (consumed in request order)."""
    del pool_len  # the row length of req_to_token; implied by its shape here
    rows, cols = pool_positions(req_pool_indices, start_offset, end_offset)
    req_to_token[rows, cols] = out_cache_loc[: rows.numel()].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer b (raw address ``data_ptrs[b]``, row stride ``strides[b]`` bytes): row
    ``tgt_loc[j]`` takes row ``src_loc[j]``; all source rows are read before any is written."""
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64).cpu().numpy()
    src = src_loc.to(torch.int64).cpu().numpy()
    num_rows = int(max(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        buf = (ctypes.c_uint8 * (num_rows * int(stride))).from_address(int(ptr))
        rows = np.ctypeslib.as_array(buf).reshape(num_rows, int(stride))
        rows[tgt] = rows[src]  # fancy indexing copies the sources first


def _unsupported(name: str, what: str):  # noqa: ANN202
    def fn(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"sgl_kernel.{name}: {what} is not supported by the xshare CPU stand-in")

    fn.__name__ = name
    fn.XSHARE_UNSUPPORTED = what
    return fn


def _draft_model_only(name: str):  # noqa: ANN202
    return _unsupported(name, "speculative decoding with a draft model (EAGLE, MTP)")


rotate_input_ids_cpu = _draft_model_only("rotate_input_ids_cpu")
fill_bonus_tokens_cpu = _draft_model_only("fill_bonus_tokens_cpu")
assign_draft_cache_locs_contiguous_cpu = _draft_model_only("assign_draft_cache_locs_contiguous_cpu")
build_draft_decode_metadata_cpu = _draft_model_only("build_draft_decode_metadata_cpu")
build_tree_kernel_efficient_cpu = _draft_model_only("build_tree_kernel_efficient_cpu")

__all__ = [
    "XSHARE_STAND_IN",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_draft_decode_metadata_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
]
