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
