"""Runtime knobs as device tensors, for serving under CUDA graphs.

A captured decode graph replays the kernels it recorded with the tensors it recorded: a Python int
baked into the graph at capture never changes. :class:`SelectorKnobs` holds every numeric setting of
a :class:`~xshare.selection.SelectorConfig` in 0-d device tensors; :meth:`SelectorKnobs.update`
writes new values **in place** (``copy_``), so the next replay follows the change without
recapture. Pass them to :func:`xshare.selection.select` with ``knobs=``: the selector then reads
budget, target mass, warm-up, per-request budget, per-GPU cap, the batch-size range and the on/off switch from
these tensors only. The policy itself (which code runs) is a host decision: changing it needs a
new capture (or no graphs), which the serving adapter handles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xshare.selection.config import SelectorConfig

_NO_MAX = torch.iinfo(torch.int64).max
_DTYPES = {"enabled": torch.bool, "target_mass": torch.float32}


def _check(config: SelectorConfig, num_experts: int, top_k: int) -> None:
    """ValueError unless ``config`` fits a layer of ``num_experts`` experts and ``top_k``."""
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k = {top_k} must be in [1, E = {num_experts}]")
    if config.warmup_k > top_k:
        raise ValueError(f"warmup_k = {config.warmup_k} exceeds top_k = {top_k}")
    if config.anchor_k is not None and config.anchor_k > top_k:
        raise ValueError(f"anchor_k = {config.anchor_k} exceeds top_k = {top_k}")


def _values(config: SelectorConfig, num_experts: int, top_k: int, enabled: bool) -> dict[str, int | float | bool]:
    """The tensors' values for ``config`` (checked already: by :func:`_check`, or where it entered)."""
    return {
        "enabled": bool(enabled),
        "budget": config.budget_for(num_experts),
        "target_mass": 0.0 if config.target_mass is None else float(config.target_mass),
        "warmup_k": config.warmup_k,
        "group_budget": config.group_budget_for(num_experts, top_k),
        "anchor_k": config.anchor_k_for(top_k),
        "gpu_cap": 0 if config.gpu_cap is None else config.gpu_cap,
        "min_tokens": config.min_tokens,
        "max_tokens": _NO_MAX if config.max_tokens is None else config.max_tokens,
    }


@dataclass(frozen=True)
class SelectorKnobs:
    """0-d device tensors: enabled (bool), budget m, target_mass tau (float32, 0 = off), warmup_k,
    group_budget m_r, anchor_k (resolved: what the first row of a multi-row request keeps), gpu_cap
    (0 = ceil(m/G)), min_tokens, max_tokens (int64). Created once per (device, E, top_k); updated in place."""

    enabled: Tensor
    budget: Tensor
    target_mass: Tensor
    warmup_k: Tensor
    group_budget: Tensor
    anchor_k: Tensor
    gpu_cap: Tensor
    min_tokens: Tensor
    max_tokens: Tensor
    num_experts: int
    top_k: int

    @classmethod
    def create(
        cls,
        config: SelectorConfig,
        num_experts: int,
        top_k: int,
        device: torch.device | str = "cpu",
        *,
        enabled: bool = True,
    ) -> SelectorKnobs:
        _check(config, num_experts, top_k)
        vals = _values(config, num_experts, top_k, enabled)
        # filled on the device (torch.full), not copied from the host: creating them is capture safe too
        tensors = {k: torch.full((), v, dtype=_DTYPES.get(k, torch.int64), device=device) for k, v in vals.items()}
        return cls(**tensors, num_experts=num_experts, top_k=top_k)

    def check(self, config: SelectorConfig) -> None:
        """Raise ValueError if ``config`` cannot be written into these knobs: the one check of a config
        against a layer's knobs, made when the config is set (nothing changes on a refusal)."""
        _check(config, self.num_experts, self.top_k)

    def update(self, config: SelectorConfig, *, enabled: bool = True) -> None:
        """Write ``config``'s values into the tensors in place, all or nothing: the fit to this layer
        (:meth:`check`, two host comparisons) and every value come before any write."""
        _check(config, self.num_experts, self.top_k)
        vals = _values(config, self.num_experts, self.top_k, enabled)
        for k, v in vals.items():
            getattr(self, k).fill_(v)
