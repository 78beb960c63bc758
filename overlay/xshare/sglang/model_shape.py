"""The MoE shape of a served model from its Hugging Face config: the one probe of the config names
model families use for the experts per layer and the experts per token."""

from __future__ import annotations

from typing import Any

EXPERT_COUNT_NAMES = ("num_experts", "n_routed_experts", "num_local_experts")
TOP_K_NAMES = ("num_experts_per_tok", "moe_top_k", "top_k")


def _first_positive(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def moe_shape(hf_config: Any) -> tuple[int | None, int | None]:
    """(top_k, E) of a model config (``hf_text_config``), None where the config does not say."""
    return _first_positive(hf_config, TOP_K_NAMES), _first_positive(hf_config, EXPERT_COUNT_NAMES)


def moe_layer_ids(hf_config: Any) -> tuple[int, ...]:
    """The decoder layer ids with an MoE block, from the config names SGLang's models read
    (DeepSeek: ``first_k_dense_replace`` / ``moe_layer_freq``; Qwen-MoE: ``mlp_only_layers`` /
    ``decoder_sparse_step``; otherwise every layer); empty when the config does not say."""
    n = _first_positive(hf_config, ("num_hidden_layers", "num_layers"))
    if n is None or moe_shape(hf_config)[1] is None:
        return ()
    first_dense = getattr(hf_config, "first_k_dense_replace", None)
    if isinstance(first_dense, int) and not isinstance(first_dense, bool):
        freq = _first_positive(hf_config, ("moe_layer_freq",)) or 1
        return tuple(i for i in range(n) if i >= first_dense and i % freq == 0)
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = _first_positive(hf_config, ("decoder_sparse_step",)) or 1
    return tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
