"""The selector's configuration: immutable, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SCORINGS = ("softmax", "sigmoid")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_budget(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {value!r}")
        return
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(f"{name} as a fraction of the experts must be in (0, 1], got {value!r}")
        return
    raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {type(value).__name__}")


def parse_count(text: str, name: str = "budget") -> int | float:
    """A budget written as text (a CLI flag): an int >= 1, or a fraction of E in (0, 1].

    Raises ValueError whose message starts with ``name`` and the text.
    """
    try:
        count = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            raise ValueError(f"{name} {text!r}: expected an int >= 1 or a fraction in (0, 1]") from None
        if not 0 < fraction <= 1:  # also rejects NaN
            raise ValueError(f"{name} {text}: a fraction must be in (0, 1]") from None
        return fraction
    if count < 1:
        raise ValueError(f"{name} {text}: must be >= 1")
    return count


def resolve_count(value: int | float, num_experts: int) -> int:
    """An absolute count (clamped to ``num_experts``) or a fraction of ``num_experts`` (rounded up)."""
    if _is_int(value):
        return min(int(value), num_experts)
    return max(1, min(num_experts, math.ceil(float(value) * num_experts - 1e-9)))


@dataclass(frozen=True)
class SelectorConfig:
    """How one MoE layer's experts are selected for one forward batch.

    policy        registered policy name (see :func:`xshare.selection.available_policies`).
    budget        m: max experts kept per layer and batch; an int >= 1, or a float in (0, 1] = a
                  fraction of the layer's experts E. Values above E are clamped to E.
    warmup_k      k0: every token's top-k0 experts are always kept (0 = no warm-up).
    group_budget  m_r: per-request budget of hierarchical policies (``xshare_spec``); None = top_k.
    gpu_cap       c: per-GPU cap of GPU-aware policies; None = ceil(m / G).
    scoring       'softmax' | 'sigmoid': how router logits become gate scores.
    renormalize   renormalise each token's kept weights to sum to 1 (the model's norm_topk_prob).
    min_tokens, max_tokens
                  batch-size range where the policy applies; outside it, routing is exactly 'topk'.
    extra         policy-specific numeric knobs (validated by the policy), e.g. Lynx's bins.
    """

    policy: str = "xshare"
    budget: int | float = 0.5
    warmup_k: int = 1
    group_budget: int | float | None = None
    gpu_cap: int | None = None
    scoring: str = "softmax"
    renormalize: bool = True
    min_tokens: int = 1
    max_tokens: int | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from xshare.selection.registry import get_policy  # late: policies import this module

        if not isinstance(self.policy, str):
            raise ValueError(f"policy must be a string, got {type(self.policy).__name__}")
        policy = get_policy(self.policy)  # raises ValueError naming 'policy'
        _check_budget("budget", self.budget, optional=False)
        _check_budget("group_budget", self.group_budget, optional=True)
        if not _is_int(self.warmup_k) or self.warmup_k < 0:
            raise ValueError(f"warmup_k must be an int >= 0, got {self.warmup_k!r}")
        if self.gpu_cap is not None and (not _is_int(self.gpu_cap) or self.gpu_cap < 1):
            raise ValueError(f"gpu_cap must be an int >= 1 or None, got {self.gpu_cap!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < self.min_tokens):
            raise ValueError(f"max_tokens must be None or an int >= min_tokens, got {self.max_tokens!r}")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"extra must be a mapping of str to number, got {type(self.extra).__name__}")
        for k, v in self.extra.items():
            if not isinstance(k, str) or not _is_real(v):
                raise ValueError(f"extra[{k!r}] must map a str to a number, got {v!r}")
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        policy.validate_config(self)

    def budget_for(self, num_experts: int) -> int:
        """m for a layer of ``num_experts`` experts."""
        return resolve_count(self.budget, num_experts)

    def group_budget_for(self, num_experts: int, top_k: int) -> int:
        """m_r for a layer of ``num_experts`` experts (default: top_k)."""
        if self.group_budget is None:
            return min(top_k, num_experts)
        return resolve_count(self.group_budget, num_experts)

    def applies_to(self, num_tokens: int) -> bool:
        """Whether a batch of ``num_tokens`` rows is inside [min_tokens, max_tokens]."""
        return num_tokens >= self.min_tokens and (self.max_tokens is None or num_tokens <= self.max_tokens)

    def replace(self, **changes: Any) -> SelectorConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectorConfig:
        """Build from a mapping; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown selector setting(s): {', '.join(unknown)}")
        return cls(**dict(data))
