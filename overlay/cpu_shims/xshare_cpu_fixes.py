"""Import-time fixes of the CPU test bed: PyPI's torchvision 0.28.0 (a CUDA build) beside a CPU torch,
and speculative verify batches in SGLang's torch-native attention backend.

SGLang imports ``torchvision.transforms`` unconditionally. torchvision's compiled ``_C`` extension
needs libtorch_cuda and does not load beside a CPU torch; its Python part then fails at
``torchvision/_meta_registrations.py`` (``register_fake("torchvision::nms")``) because the operator
schema was never defined. This module installs a ``sys.meta_path`` finder (from
``xshare_cpu_fixes.pth``) that, right before the first ``import torchvision`` and only with a CPU
build of torch, defines the two schemas it needs on a ``torch.library.Library`` kept alive for the
process. ``torchvision.transforms`` then works; torchvision's C ops (nms, roi_align) do not.

SGLang 0.5.23's ``TorchNativeAttnBackend`` (the CPU test bed's attention) runs extend and decode
batches but not the TARGET_VERIFY batches of speculative decoding: it reads ``extend_prefix_lens``,
which a verify batch does not have. When ``sglang.srt.layers.attention.torch_native_backend`` is
imported, the same finder wraps the backend's ``forward_extend`` so that a verify batch goes through
:func:`tree_verify_attention` (each request's draft tokens see the whole committed prefix and their
ancestors in the draft tree, ``spec_info.custom_mask``); every other batch goes to SGLang's code as
before.

It imports nothing heavy at interpreter start: torch is imported only when torchvision or SGLang is.
Installed by ``scripts/install_sglang_cpu.sh``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_LIBRARY = None  # the torch.library.Library holding the schemas (kept alive)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _define_torchvision_schemas() -> None:
    global _LIBRARY
    if _LIBRARY is not None:
        return
    import torch

    if torch.version.cuda is not None:  # a CUDA torch loads torchvision's own _C
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"):
            lib.define(schema)
    _LIBRARY = lib


def tree_verify_attention(
    query: Any,
    k_cache: Any,
    v_cache: Any,
    req_to_token: Any,
    req_pool_indices: Any,
    seq_lens: Any,
    tree_mask: Any,
    draft_tokens: int,
    scaling: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """Attention of a speculative verify batch, request by request.

    ``query``: [bs * n, heads, head_dim] (request b's n draft tokens at rows b*n .. b*n+n-1);
    ``k_cache``/``v_cache``: [pool tokens, kv heads, head_dim], the draft tokens' keys already
    written; ``req_to_token``: [pool rows, max context]; ``req_pool_indices``, ``seq_lens``: [bs]
    (committed tokens, before the drafts); ``tree_mask``: flat bool [bs * n * n], (b, i, j) true
    when draft j is visible to draft i. Returns [bs * n, heads, v_head_dim]: draft i of request b
    attends to the b's committed tokens and the drafts its mask row allows.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    n = int(draft_tokens)
    bs = int(seq_lens.shape[0])
    if tree_mask.numel() < bs * n * n or query.shape[0] != bs * n:
        raise ValueError(f"verify attention: expected {bs} requests x {n} draft rows and a draft-only tree mask of "
                         f"{bs * n * n} entries, got {query.shape[0]} rows and {tree_mask.numel()} mask entries")
    out = query.new_empty((query.shape[0], query.shape[1], v_cache.shape[-1]))
    tree = tree_mask.reshape(-1)[: bs * n * n].reshape(bs, n, n).to(torch.bool)
    for b in range(bs):
        committed = int(seq_lens[b])
        tokens = req_to_token[req_pool_indices[b], : committed + n].to(torch.int64)
        q = query[b * n : (b + 1) * n].movedim(0, 1).unsqueeze(0)  # [1, heads, n, d]
        k = k_cache[tokens].movedim(0, 1).unsqueeze(0).to(q.dtype)
        v = v_cache[tokens].movedim(0, 1).unsqueeze(0).to(q.dtype)
        visible = torch.cat([torch.ones((n, committed), dtype=torch.bool, device=q.device), tree[b]], dim=1)
        o = scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling, enable_gqa=enable_gqa)
        out[b * n : (b + 1) * n] = o.squeeze(0).movedim(0, 1)
    return out


def _add_target_verify(module: Any) -> None:
    """Wrap ``TorchNativeAttnBackend.forward_extend`` of SGLang's freshly imported module: TARGET_VERIFY
    batches go through :func:`tree_verify_attention`, everything else through SGLang's code."""
    backend = module.TorchNativeAttnBackend
    sglang_forward_extend = backend.forward_extend
    write_loc = module.KVWriteLoc

    def forward_extend(self: Any, q: Any, k: Any, v: Any, layer: Any, forward_batch: Any,
                       save_kv_cache: bool = True) -> Any:
        if not forward_batch.forward_mode.is_target_verify() or layer.is_cross_attention:
            return sglang_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache)
        if getattr(layer, "sliding_window_size", None) not in (None, -1):
            raise ValueError("verify attention on the CPU test bed: sliding-window layers are not supported")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, write_loc(forward_batch.out_cache_loc, self.swa_out_cache_loc),
                                                k, v)
        spec = forward_batch.spec_info
        out = tree_verify_attention(
            q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.req_to_token_pool.req_to_token,
            forward_batch.req_pool_indices,
            forward_batch.seq_lens,
            spec.custom_mask,
            spec.draft_token_num,
            scaling=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        )
        return out.reshape(out.shape[0], -1)

    forward_extend.__doc__ = sglang_forward_extend.__doc__
    forward_extend.xshare_target_verify = True
    backend.forward_extend = forward_extend


_TORCH_NATIVE_BACKEND = "sglang.srt.layers.attention.torch_native_backend"


class _ImportFixes(importlib.abc.MetaPathFinder):
    """Runs the fixes around the imports they concern; finds no module itself (the normal finders do),
    except that it hands the torch-native backend's spec on with a loader that adds the verify path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> Any:
        if fullname == "torchvision":
            try:
                _define_torchvision_schemas()
            except Exception as exc:  # never break the import itself
                print(f"xshare_cpu_fixes: could not pre-define torchvision schemas: {exc}", file=sys.stderr)
        elif fullname == _TORCH_NATIVE_BACKEND:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                sglang_exec = spec.loader.exec_module

                def exec_module(module: Any) -> None:
                    sglang_exec(module)
                    try:
                        _add_target_verify(module)
                    except Exception as exc:  # never break the import itself
                        print(f"xshare_cpu_fixes: no verify path in the torch-native backend: {exc}",
                              file=sys.stderr)

                spec.loader.exec_module = exec_module
                return spec
        return None  # the normal finders import the module


def install() -> None:
    if any(isinstance(f, _ImportFixes) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _ImportFixes())
