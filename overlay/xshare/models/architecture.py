"""The tiny Qwen3-MoE architecture: the one builder (config and weight initialisation) of every tiny model.

Two models are built with it: the trained model (:func:`xshare.models.config.build_model`: the
library's initialisers under a seeded RNG, float32, then trained by :mod:`xshare.models.training`)
and the untrained serving-test model (:func:`xshare.models.tiny_moe.build_tiny_moe`: every weight
from one seeded generator, :class:`ScaledInit`, bfloat16 by default). Both are
``Qwen3MoeForCausalLM`` with every layer sparse, top-k weights renormalised and untied embeddings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

DTYPES = ("bfloat16", "float32", "float16")


@contextlib.contextmanager
def fork_rng(seed: int) -> Iterator[None]:
    """Torch's global CPU RNG seeded with ``seed`` inside the block, restored after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class ScaledInit:
    """Every parameter from one generator seeded with the model's seed, in name order (independent of
    the library's initialisers): norm weights 1, the others N(0, 1/fan_in) with the router's standard
    deviation times ``router_scale`` and the experts' down projections' times ``expert_scale``."""

    router_scale: float = 1.0
    expert_scale: float = 1.0

    def apply(self, model: torch.nn.Module, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") and p.ndim == 1:
                    p.fill_(1.0)
                    continue
                fan_in = p.shape[-1]
                std = 1.0 / math.sqrt(fan_in)
                if "mlp.gate.weight" in name:  # the router
                    std *= self.router_scale
                elif ".experts." in name and "down_proj" in name:
                    std *= self.expert_scale
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def qwen3_moe_config(  # noqa: ANN201 (transformers.Qwen3MoeConfig)
        *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
        num_kv_heads: int, head_dim: int, max_position_embeddings: int, moe_intermediate_size: int, num_experts: int,
        top_k: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, router_aux_loss_coef: float | None = None):
    """The Hugging Face config of a tiny model: every layer sparse (``intermediate_size`` unused by the
    layers), top-k weights renormalised, untied embeddings; ``router_aux_loss_coef`` None: the library's."""
    from transformers import Qwen3MoeConfig

    extra = {} if router_aux_loss_coef is None else {"router_aux_loss_coef": router_aux_loss_coef}
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **extra,
    )


def build_qwen3_moe(config, *, seed: int, init: ScaledInit | None = None,  # noqa: ANN001, ANN201 (transformers)
                    dtype: str = "float32"):
    """A freshly initialised ``Qwen3MoeForCausalLM`` of ``config`` in ``dtype``, deterministic in ``seed``.

    The library's initialisers run under torch's RNG seeded with ``seed`` (the caller's RNG is left
    as it was); ``init`` (a :class:`ScaledInit`) then redraws every parameter from its own generator."""
    from transformers import Qwen3MoeForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with fork_rng(seed):
        model = Qwen3MoeForCausalLM(config)
    if init is not None:
        init.apply(model, seed)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    return model
