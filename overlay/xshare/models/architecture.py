"""The tiny MoE architectures: the one builder (config and weight initialisation) of every tiny model.

Two kinds of models are built with it: the trained models (:func:`xshare.models.config.build_model`: the
library's initialisers under a seeded RNG, float32, then trained by :mod:`xshare.models.training`; the
Qwen3-MoE model and the aux-loss-free GLM-4.5-architecture model)
and the untrained serving-test models (:func:`xshare.models.tiny_moe.build_tiny_moe`: every weight
from one seeded generator, :class:`ScaledInit`, bfloat16 by default). The trained model is
``Qwen3MoeForCausalLM`` with every layer sparse, top-k weights renormalised and untied embeddings;
the serving-test models are that (the default) or one of the other router families SGLang serves:
``Glm4MoeForCausalLM`` (GLM-4.5: sigmoid router with ``e_score_correction_bias``, expert groups,
a shared expert, a routed scaling factor; also configured with DeepSeek-V3's grouped router) and
``MixtralForCausalLM`` (softmax top-2, always renormalised).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = ("bfloat16", "float32", "float16")
#: The router correction bias buffer of GLM-4.5 / DeepSeek-V3 routers (kept in float32, as transformers keeps it).
CORRECTION_BIAS = "e_score_correction_bias"
#: Hugging Face ``model_type`` -> the ``transformers`` model class of each architecture built here.
MODEL_CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


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
    deviation times ``router_scale`` and the experts' down projections' times ``expert_scale``.

    Then, with ``bias_scale`` > 0, every router correction bias (the buffer ``e_score_correction_bias``
    of GLM-4.5 / DeepSeek-V3 routers) from the same generator, in name order: N(0, bias_scale^2)."""

    router_scale: float = 1.0
    expert_scale: float = 1.0
    bias_scale: float = 0.0

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
            if self.bias_scale > 0:
                for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
                    if name.endswith(CORRECTION_BIAS):
                        b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32) * self.bias_scale)


def _decoder_fields(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                    head_dim: int, max_position_embeddings: int, top_k: int, bos_token_id: int, eos_token_id: int,
                    pad_token_id: int) -> dict[str, Any]:
    """The Hugging Face config fields every tiny architecture shares (untied embeddings)."""
    return {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
            "max_position_embeddings": max_position_embeddings, "num_experts_per_tok": top_k,
            "tie_word_embeddings": False, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id}


def qwen3_moe_config(  # noqa: ANN201 (transformers.Qwen3MoeConfig)
        *, intermediate_size: int, moe_intermediate_size: int, num_experts: int,
        router_aux_loss_coef: float | None = None, **decoder: int):
    """The Hugging Face config of a tiny model: every layer sparse (``intermediate_size`` unused by the
    layers), top-k weights renormalised, untied embeddings; ``router_aux_loss_coef`` None: the library's;
    ``decoder``: the fields every tiny architecture shares (:func:`_decoder_fields`)."""
    from transformers import Qwen3MoeConfig

    extra = {} if router_aux_loss_coef is None else {"router_aux_loss_coef": router_aux_loss_coef}
    return Qwen3MoeConfig(
        **_decoder_fields(**decoder),
        intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        num_experts=num_experts,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        **extra,
    )


def glm4_moe_config(  # noqa: ANN201 (transformers.Glm4MoeConfig)
        *, intermediate_size: int, moe_intermediate_size: int, num_experts: int, n_group: int, topk_group: int,
        routed_scaling_factor: float, norm_topk_prob: bool, n_shared_experts: int, first_k_dense_replace: int,
        **decoder: int):
    """The Hugging Face config of a tiny GLM-4.5-architecture model (``Glm4MoeForCausalLM``): the first
    ``first_k_dense_replace`` layers dense (``intermediate_size``), the rest sparse; sigmoid router with a
    correction bias, ``num_experts`` experts in ``n_group`` groups of which ``topk_group`` are kept, top-k
    weights renormalised if ``norm_topk_prob`` and scaled by ``routed_scaling_factor``; ``n_shared_experts``
    shared experts of ``moe_intermediate_size`` each; no multi-token-prediction layer; untied embeddings;
    ``decoder``: the fields every tiny architecture shares (:func:`_decoder_fields`)."""
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **_decoder_fields(**decoder),
        intermediate_size=intermediate_size,
        moe_intermediate_size=moe_intermediate_size,
        n_routed_experts=num_experts,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
        norm_topk_prob=norm_topk_prob,
        n_shared_experts=n_shared_experts,
        first_k_dense_replace=first_k_dense_replace,
        num_nextn_predict_layers=0,
        attention_bias=False,
        use_qk_norm=False,
    )


def mixtral_config(  # noqa: ANN201 (transformers.MixtralConfig)
        *, moe_intermediate_size: int, num_experts: int, **decoder: int):
    """The Hugging Face config of a tiny Mixtral (``MixtralForCausalLM``): every layer sparse, experts of
    width ``moe_intermediate_size`` (Mixtral's ``intermediate_size``), softmax top-k renormalised (always,
    in Mixtral), no sliding window, untied embeddings; ``decoder``: the fields every tiny architecture shares
    (:func:`_decoder_fields`)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        **_decoder_fields(**decoder),
        intermediate_size=moe_intermediate_size,
        num_local_experts=num_experts,
        sliding_window=None,
    )


def build_moe(config, *, seed: int, init: ScaledInit | None = None,  # noqa: ANN001, ANN201 (transformers)
              dtype: str = "float32"):
    """A freshly initialised model of ``config`` (one of :data:`MODEL_CLASSES`, by ``config.model_type``) in
    ``dtype``, deterministic in ``seed``.

    The library's initialisers run under torch's RNG seeded with ``seed`` (the caller's RNG is left
    as it was); ``init`` (a :class:`ScaledInit`) then redraws every parameter from its own generator.
    Router correction biases stay float32 in every ``dtype`` (transformers keeps them so)."""
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cls_name = MODEL_CLASSES.get(config.model_type)
    if cls_name is None:
        raise ValueError(f"no tiny builder for model_type {config.model_type!r}; known: {', '.join(MODEL_CLASSES)}")
    with fork_rng(seed):
        model = getattr(transformers, cls_name)(config)
    if init is not None:
        init.apply(model, seed)
    model = model.to(getattr(torch, dtype))
    for module in model.modules():
        bias = getattr(module, CORRECTION_BIAS, None)
        if isinstance(bias, torch.Tensor) and bias.dtype != torch.float32:
            setattr(module, CORRECTION_BIAS, bias.float())  # a registered buffer: replaced in place of the name
    model.config.dtype = dtype
    return model


def build_qwen3_moe(config, *, seed: int, init: ScaledInit | None = None,  # noqa: ANN001, ANN201 (transformers)
                    dtype: str = "float32"):
    """A freshly initialised ``Qwen3MoeForCausalLM`` of ``config`` in ``dtype``, deterministic in ``seed``
    (:func:`build_moe` of a Qwen3-MoE config)."""
    if config.model_type != "qwen3_moe":
        raise ValueError(f"build_qwen3_moe needs a Qwen3-MoE config, got model_type {config.model_type!r}")
    return build_moe(config, seed=seed, init=init, dtype=dtype)
