"""The experts' forward used for training: a sorted per-expert loop (the computation of SGLang's
``moe_forward_native``), faster on the CPU than the library's default loop and the same function;
while training, padding rows skip the experts (:func:`skip_padding`).

:func:`experts_implementation` switches a model's experts between ``"eager"`` (the library's) and
:data:`SORTED_EXPERTS` for a block of code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

SORTED_EXPERTS = "xshare_sorted"

_TRAIN_TOKEN_MASK: list[torch.Tensor | None] = [None]  # flat bool [B*T] of the batch being trained


@contextlib.contextmanager
def skip_padding(attention_mask: torch.Tensor) -> Iterator[None]:
    """Padding rows skip the experts while the block runs. Right padding and causal attention: no
    real token ever reads a padding row, and padding carries no label, so the loss and every
    gradient are those of the full computation; only the wasted expert work goes."""
    _TRAIN_TOKEN_MASK[0] = attention_mask.reshape(-1).bool()
    try:
        yield
    finally:
        _TRAIN_TOKEN_MASK[0] = None


def sorted_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Same function as transformers' eager ``Qwen3MoeExperts.forward``, fewer ops on the CPU
    (and, while training, no expert work on padding rows: :func:`skip_padding`)."""
    num_tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1)
    token = torch.arange(num_tokens * k, device=flat.device) // k
    mask = _TRAIN_TOKEN_MASK[0]
    if mask is not None and mask.shape[0] == num_tokens:
        keep = mask.repeat_interleave(k)
        flat, weights, token = flat[keep], weights[keep], token[keep]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token = token[order]
    x = hidden_states[token]
    # unbind once: indexing the stacked parameter per expert would make autograd build a full-size
    # zero gradient for every expert (quadratic in the number of experts)
    w13, w2 = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    outs = []
    for e, xs in enumerate(x.split(counts)):
        if xs.shape[0] == 0:
            continue
        gate, up = F.linear(xs, w13[e]).chunk(2, dim=-1)
        outs.append(F.linear(self.act_fn(gate) * up, w2[e]))
    y = torch.cat(outs) * weights[order, None].to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, token, y)


def _register_sorted_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(SORTED_EXPERTS, sorted_experts_forward)


@contextlib.contextmanager
def experts_implementation(model: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Temporarily run the model's experts with ``name`` (``"eager"``, :data:`SORTED_EXPERTS`, ...)."""
    if name is None:
        yield
        return
    if name == SORTED_EXPERTS:
        _register_sorted_experts()
    old = model.config._experts_implementation
    model.config._experts_implementation = name
    try:
        yield
    finally:
        model.config._experts_implementation = old
